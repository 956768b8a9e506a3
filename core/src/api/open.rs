//! Deserializing "open" objects: structs with known fields plus a `rest` map that keeps every
//! field Weir does not model.
//!
//! `#[serde(flatten)]` does this too, but serde implements it by first buffering the whole
//! object into its private `Content` tree and then deserializing the known fields out of that
//! buffer, which copies every string (the prompt included) and roughly doubles the cost of a
//! request parse. [`open_object!`](crate::open_object) generates a `visit_map` that reads
//! each known field directly and collects the others into `rest`, once. Serializing keeps
//! `#[serde(flatten)]`, which has no such cost.
//!
//! Semantics match the derived implementation with `#[serde(default)]` on optional fields,
//! except that a repeated key keeps its last value instead of being an error (as
//! `serde_json::Value` does).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// An object key, borrowed from the input when it has no escapes.
pub struct Key<'de>(Cow<'de, str>);

impl Key<'_> {
    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key, owned.
    pub fn into_string(self) -> String {
        self.0.into_owned()
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// A required field: missing is an error.
pub fn required<T, E: de::Error>(v: Option<T>, key: &'static str) -> Result<T, E> {
    v.ok_or_else(|| E::missing_field(key))
}

/// An optional field: missing and `null` are `None`.
pub fn optional<T, E: de::Error>(v: Option<Option<T>>, _key: &'static str) -> Result<Option<T>, E> {
    Ok(v.flatten())
}

/// A field with a default when missing.
pub fn defaulted<T: Default, E: de::Error>(v: Option<T>, _key: &'static str) -> Result<T, E> {
    Ok(v.unwrap_or_default())
}

/// Implements `Deserialize` for an open struct (see the module docs): each field is listed
/// with its JSON key and one of `required`, `optional` (an `Option` field) or `defaulted`;
/// every other key goes into the struct's `rest` map.
#[macro_export]
macro_rules! open_object {
    ($ty:ident, $expecting:literal, { $($field:ident : $key:literal => $mode:ident),* $(,)? }) => {
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct OpenVisitor;
                impl<'de> serde::de::Visitor<'de> for OpenVisitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<$ty, A::Error> {
                        $( let mut $field = None; )*
                        let mut rest = serde_json::Map::new();
                        while let Some(key) = map.next_key::<$crate::api::open::Key<'de>>()? {
                            match key.as_str() {
                                $( $key => $field = Some(map.next_value()?), )*
                                _ => {
                                    let value: serde_json::Value = map.next_value()?;
                                    rest.insert(key.into_string(), value);
                                }
                            }
                        }
                        Ok($ty {
                            $( $field: $crate::api::open::$mode($field, $key)?, )*
                            rest,
                        })
                    }
                }
                d.deserialize_map(OpenVisitor)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::api::openai::{ChatRequest, MessageContent};

    #[test]
    fn known_fields_are_read_and_unknown_ones_kept() {
        let req: ChatRequest = serde_json::from_value(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi", "x-extra": {"a": [1, 2]}},
                {"role": "user", "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}, "detail": "low"}
                ]}
            ],
            "stream": true,
            "tool_choice": null,
            "seed": 7,
            "metadata": {"k": "v"}
        }))
        .expect("parses");
        assert_eq!(req.model, "m");
        assert!(req.stream);
        assert_eq!(req.tool_choice, None);
        assert_eq!(req.rest.get("seed"), Some(&json!(7)));
        assert_eq!(req.rest.get("metadata"), Some(&json!({"k": "v"})));
        assert_eq!(
            req.messages[0].rest.get("x-extra"),
            Some(&json!({"a": [1, 2]}))
        );
        assert_eq!(
            req.messages[0].content,
            Some(MessageContent::Text("hi".into()))
        );
        let Some(MessageContent::Parts(parts)) = &req.messages[1].content else {
            panic!("parts expected");
        };
        assert_eq!(parts[1].kind, "image_url");
        assert_eq!(parts[1].rest.get("detail"), Some(&json!("low")));
        // Serializing gives the unknown fields back.
        let back = serde_json::to_value(&req).expect("serializes");
        assert_eq!(back["seed"], 7);
        assert_eq!(back["messages"][0]["x-extra"]["a"][1], 2);
        assert_eq!(back["messages"][1]["content"][1]["detail"], "low");
    }

    #[test]
    fn missing_required_fields_and_wrong_types_are_errors_with_a_path() {
        let missing = serde_json::from_str::<ChatRequest>(r#"{"messages": []}"#)
            .expect_err("model is required");
        assert!(
            missing.to_string().contains("missing field `model`"),
            "{missing}"
        );
        let bytes = br#"{"model": "m", "messages": [{"role": "user", "content": 5}]}"#;
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let err = serde_path_to_error::deserialize::<_, ChatRequest>(&mut de)
            .expect_err("content must be a string or parts");
        assert_eq!(err.path().to_string(), "messages[0].content");
        assert!(
            err.inner()
                .to_string()
                .contains("a string or an array of content parts"),
            "{err}"
        );
    }

    #[test]
    fn escaped_keys_and_repeated_keys() {
        let req: ChatRequest = serde_json::from_str(
            r#"{"mo\u0064el": "first", "messages": [], "model": "second", "x\"y": 1}"#,
        )
        .expect("parses");
        assert_eq!(req.model, "second", "the last repeated key wins");
        assert_eq!(req.rest.get("x\"y"), Some(&serde_json::json!(1)));
    }
}
