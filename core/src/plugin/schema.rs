//! A small JSON Schema subset for plugin config: enough to catch typos and wrong types at
//! load time without pulling a full validator (and its regex and HTTP dependencies) into the
//! gateway.
//!
//! Supported keywords: `type` (one name or a list), `properties`, `required`,
//! `additionalProperties` (bool), `items`, `enum`, `minimum`, `maximum`, `minLength`,
//! `maxLength`, `minItems`, `maxItems`. Annotations (`title`, `description`, `default`,
//! `examples`, `$schema`, `$comment`) are accepted and ignored; any other keyword is rejected
//! when the manifest loads, so a schema never silently checks less than its author thinks.

use std::collections::BTreeMap;

use serde_json::Value;

/// Error of compilation or validation: (JSON path such as `phrases[2]`, reason).
pub type SchemaError = (String, String);

/// A compiled schema.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schema {
    types: Vec<String>,
    properties: BTreeMap<String, Schema>,
    required: Vec<String>,
    additional_properties: bool,
    items: Option<Box<Schema>>,
    enumeration: Option<Vec<Value>>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    min_length: Option<u64>,
    max_length: Option<u64>,
    min_items: Option<u64>,
    max_items: Option<u64>,
}

const TYPES: [&str; 7] = [
    "object", "array", "string", "number", "integer", "boolean", "null",
];

fn at(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl Schema {
    /// Compiles a schema document; the error path points into the schema.
    pub fn compile(doc: &Value) -> Result<Schema, SchemaError> {
        Self::compile_at(doc, "")
    }

    fn compile_at(doc: &Value, path: &str) -> Result<Schema, SchemaError> {
        let Value::Object(map) = doc else {
            return Err((path.to_owned(), "a schema must be a table".into()));
        };
        let mut s = Schema {
            additional_properties: true,
            ..Schema::default()
        };
        for (key, value) in map {
            let here = at(path, key);
            let bad = |what: &str| (here.clone(), format!("must be {what}"));
            match key.as_str() {
                "type" => {
                    s.types = match value {
                        Value::String(t) => vec![t.clone()],
                        Value::Array(ts) => ts
                            .iter()
                            .map(|t| t.as_str().map(str::to_owned))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| bad("a type name or a list of them"))?,
                        _ => return Err(bad("a type name or a list of them")),
                    };
                    if let Some(t) = s.types.iter().find(|t| !TYPES.contains(&t.as_str())) {
                        return Err((here, format!("unknown type '{t}'")));
                    }
                }
                "properties" => {
                    let Value::Object(props) = value else {
                        return Err(bad("a table of schemas"));
                    };
                    for (name, sub) in props {
                        s.properties
                            .insert(name.clone(), Self::compile_at(sub, &at(&here, name))?);
                    }
                }
                "required" => {
                    s.required = value
                        .as_array()
                        .and_then(|a| {
                            a.iter()
                                .map(|v| v.as_str().map(str::to_owned))
                                .collect::<Option<Vec<_>>>()
                        })
                        .ok_or_else(|| bad("a list of property names"))?;
                }
                "additionalProperties" => {
                    s.additional_properties = value.as_bool().ok_or_else(|| bad("a boolean"))?;
                }
                "items" => s.items = Some(Box::new(Self::compile_at(value, &here)?)),
                "enum" => {
                    s.enumeration = Some(value.as_array().cloned().ok_or_else(|| bad("a list"))?);
                }
                "minimum" => s.minimum = Some(value.as_f64().ok_or_else(|| bad("a number"))?),
                "maximum" => s.maximum = Some(value.as_f64().ok_or_else(|| bad("a number"))?),
                "minLength" => s.min_length = Some(value.as_u64().ok_or_else(|| bad("a count"))?),
                "maxLength" => s.max_length = Some(value.as_u64().ok_or_else(|| bad("a count"))?),
                "minItems" => s.min_items = Some(value.as_u64().ok_or_else(|| bad("a count"))?),
                "maxItems" => s.max_items = Some(value.as_u64().ok_or_else(|| bad("a count"))?),
                "title" | "description" | "default" | "examples" | "$schema" | "$comment" => {}
                other => {
                    return Err((
                        here,
                        format!("keyword '{other}' is not supported by Weir's schema subset"),
                    ));
                }
            }
        }
        Ok(s)
    }

    /// Validates `value`; the error path points into the value (`phrases[2]`).
    pub fn validate(&self, value: &Value) -> Result<(), SchemaError> {
        self.validate_at(value, "")
    }

    fn validate_at(&self, value: &Value, path: &str) -> Result<(), SchemaError> {
        let fail = |reason: String| Err((path.to_owned(), reason));
        if !self.types.is_empty() && !self.types.iter().any(|t| type_matches(t, value)) {
            return fail(format!(
                "expected {}, found {}",
                self.types.join(" or "),
                type_name(value)
            ));
        }
        if let Some(allowed) = &self.enumeration
            && !allowed.contains(value)
        {
            return fail(format!(
                "must be one of {}",
                serde_json::to_string(allowed).unwrap_or_default()
            ));
        }
        match value {
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(0.0);
                if let Some(min) = self.minimum
                    && x < min
                {
                    return fail(format!("must be at least {min}"));
                }
                if let Some(max) = self.maximum
                    && x > max
                {
                    return fail(format!("must be at most {max}"));
                }
            }
            Value::String(s) => {
                let len = s.chars().count() as u64;
                if let Some(min) = self.min_length
                    && len < min
                {
                    return fail(format!("must be at least {min} characters"));
                }
                if let Some(max) = self.max_length
                    && len > max
                {
                    return fail(format!("must be at most {max} characters"));
                }
            }
            Value::Array(items) => {
                let len = items.len() as u64;
                if let Some(min) = self.min_items
                    && len < min
                {
                    return fail(format!("must have at least {min} items"));
                }
                if let Some(max) = self.max_items
                    && len > max
                {
                    return fail(format!("must have at most {max} items"));
                }
                if let Some(item_schema) = &self.items {
                    for (i, item) in items.iter().enumerate() {
                        item_schema.validate_at(item, &format!("{path}[{i}]"))?;
                    }
                }
            }
            Value::Object(map) => {
                for name in &self.required {
                    if !map.contains_key(name) {
                        return Err((at(path, name), "is required".into()));
                    }
                }
                for (name, v) in map {
                    match self.properties.get(name) {
                        Some(sub) => sub.validate_at(v, &at(path, name))?,
                        None if !self.additional_properties => {
                            return Err((at(path, name), "is not an allowed key".into()));
                        }
                        None => {}
                    }
                }
            }
            Value::Bool(_) | Value::Null => {}
        }
        Ok(())
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_nested_values() {
        let s = Schema::compile(&json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["limit"],
            "properties": {
                "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                "mode": {"enum": ["a", "b"]},
                "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "minLength": 1}},
            }
        }))
        .unwrap();
        assert!(
            s.validate(&json!({"limit": 5, "mode": "a", "tags": ["x"]}))
                .is_ok()
        );
        let err = |v| s.validate(&v).unwrap_err().0;
        assert_eq!(err(json!({"limit": 0})), "limit");
        assert_eq!(err(json!({"limit": 1.5})), "limit");
        assert_eq!(err(json!({})), "limit");
        assert_eq!(err(json!({"limit": 1, "mode": "c"})), "mode");
        assert_eq!(err(json!({"limit": 1, "tags": ["x", ""]})), "tags[1]");
        assert_eq!(err(json!({"limit": 1, "tags": ["x", "y", "z"]})), "tags");
        assert_eq!(err(json!({"limit": 1, "extra": true})), "extra");
        assert_eq!(err(json!([1])), "");
    }

    #[test]
    fn unknown_keywords_are_rejected() {
        let (path, reason) =
            Schema::compile(&json!({"properties": {"a": {"pattern": "x"}}})).unwrap_err();
        assert_eq!(path, "properties.a.pattern");
        assert!(reason.contains("not supported"));
        assert!(Schema::compile(&json!({"type": "strnig"})).is_err());
        assert!(Schema::compile(&json!({"description": "ok", "default": 1})).is_ok());
    }
}
