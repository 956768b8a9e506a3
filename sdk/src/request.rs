//! [`Request`]: the request `on-request` sees, read lazily.

use std::marker::PhantomData;

use crate::{Dialect, Endpoint, MessageView, Pairs};

/// The request under `on-request`, after the changes of the plugins before this one.
///
/// It is a lazy view: in the gateway every accessor is one call to the host, which copies
/// just what it returns (one header, one message, the body...) and only what the
/// manifest allows (headers not declared in `headers = [..]` read as absent; [`body`]
/// is `None` without capability `body`). So read what you need once and keep it:
///
/// ```
/// use weir_sdk::{Decision, Request};
///
/// fn decide(req: &Request) -> Decision {
///     let messages = req.messages(); // one host call, then plain data
///     let long = messages.iter().filter(|m| m.content.len() > 1000).count();
///     Decision::cont().set_metadata("long_messages", &long.to_string())
/// }
/// # let req = weir_sdk::testing::request().user("hi").build();
/// # assert!(!decide(&req).is_reply());
/// ```
///
/// In `cargo test` (any non-`wasm32` target) a `Request` holds fixture data instead,
/// built with [`crate::testing::request`] or [`crate::testing::request_from_fixture`],
/// and the accessors read that.
///
/// The lifetime ties the view to the hook call that lent it; plugin code can write
/// `&Request` and let it be inferred.
///
/// [`body`]: Request::body
#[derive(Clone)]
pub struct Request<'a> {
    #[cfg(target_arch = "wasm32")]
    inner: &'a crate::__bindings::weir::plugin::views::Request,
    #[cfg(not(target_arch = "wasm32"))]
    inner: RequestData,
    _call: PhantomData<&'a ()>,
}

/// What a [`Request`] holds off `wasm32`: the fixture the accessors read.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RequestData {
    pub(crate) id: String,
    pub(crate) dialect: Dialect,
    pub(crate) endpoint: Endpoint,
    pub(crate) model: String,
    pub(crate) stream: bool,
    pub(crate) headers: Pairs,
    pub(crate) messages: Vec<MessageView>,
    pub(crate) max_tokens: Option<u32>,
    pub(crate) body: Option<String>,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(target_arch = "wasm32")]
        {
            f.debug_struct("Request")
                .field("handle", &self.inner.handle())
                .finish_non_exhaustive()
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            f.debug_tuple("Request").field(&self.inner).finish()
        }
    }
}

#[cfg(target_arch = "wasm32")]
impl<'a> Request<'a> {
    /// Wraps the request resource the gateway lends to `on-request` (used by
    /// [`crate::export!`]).
    #[doc(hidden)]
    pub fn __from_wit(raw: &'a crate::__bindings::weir::plugin::views::Request) -> Request<'a> {
        Request {
            inner: raw,
            _call: PhantomData,
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Request<'static> {
    pub(crate) fn from_data(data: RequestData) -> Request<'static> {
        Request {
            inner: data,
            _call: PhantomData,
        }
    }
}

/// The fixture answers the WIT resource's methods, with the same names and types, so the
/// accessors of [`Request`] read either the same way.
#[cfg(not(target_arch = "wasm32"))]
impl RequestData {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn dialect(&self) -> Dialect {
        self.dialect
    }

    fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    fn model(&self) -> String {
        self.model.clone()
    }

    fn stream(&self) -> bool {
        self.stream
    }

    /// Case-insensitive; several values joined with ", " (as the gateway does).
    fn header(&self, name: &str) -> Option<String> {
        let mut values = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        let first = values.next()?;
        Some(values.fold(first.to_owned(), |mut out, v| {
            out.push_str(", ");
            out.push_str(v);
            out
        }))
    }

    fn headers(&self) -> Pairs {
        self.headers.clone()
    }

    fn message_count(&self) -> u32 {
        u32::try_from(self.messages.len()).unwrap_or(u32::MAX)
    }

    fn message(&self, index: u32) -> Option<MessageView> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.messages.get(i).cloned())
    }

    fn messages(&self) -> Vec<MessageView> {
        self.messages.clone()
    }

    fn max_tokens(&self) -> Option<u32> {
        self.max_tokens
    }

    fn body(&self) -> Option<String> {
        self.body.clone()
    }
}

impl Request<'_> {
    /// The request id (`x-request-id`).
    ///
    /// ```
    /// let req = weir_sdk::testing::request().id("req-7").build();
    /// assert_eq!(req.id(), "req-7");
    /// ```
    pub fn id(&self) -> String {
        self.inner.id()
    }

    /// The dialect the client spoke.
    ///
    /// ```
    /// use weir_sdk::Dialect;
    /// let req = weir_sdk::testing::request().dialect(Dialect::Anthropic).build();
    /// assert_eq!(req.dialect(), Dialect::Anthropic);
    /// ```
    pub fn dialect(&self) -> Dialect {
        self.inner.dialect()
    }

    /// The endpoint the request targets (chat or embeddings).
    ///
    /// ```
    /// use weir_sdk::Endpoint;
    /// assert_eq!(weir_sdk::testing::request().build().endpoint(), Endpoint::Chat);
    /// ```
    pub fn endpoint(&self) -> Endpoint {
        self.inner.endpoint()
    }

    /// The model the client asked for (after earlier plugins' changes).
    ///
    /// ```
    /// let req = weir_sdk::testing::request().model("gpt-4o").build();
    /// assert_eq!(req.model(), "gpt-4o");
    /// ```
    pub fn model(&self) -> String {
        self.inner.model()
    }

    /// Whether the client asked for a stream.
    ///
    /// ```
    /// assert!(weir_sdk::testing::request().stream(true).build().stream());
    /// ```
    pub fn stream(&self) -> bool {
        self.inner.stream()
    }

    /// A request header by name (case-insensitive); several values are joined with
    /// `", "`. Only headers the manifest declares in `headers = [..]` are visible.
    ///
    /// ```
    /// let req = weir_sdk::testing::request().header("X-Tenant", "acme").build();
    /// assert_eq!(req.header("x-tenant").as_deref(), Some("acme"));
    /// assert_eq!(req.header("x-other"), None);
    /// ```
    pub fn header(&self, name: &str) -> Option<String> {
        self.inner.header(name)
    }

    /// Every visible header, in order, as (lower-case name, value) pairs.
    ///
    /// ```
    /// let req = weir_sdk::testing::request().header("a", "1").header("b", "2").build();
    /// assert_eq!(req.headers().len(), 2);
    /// ```
    pub fn headers(&self) -> Pairs {
        self.inner.headers()
    }

    /// The number of messages (for embeddings: inputs).
    ///
    /// ```
    /// let req = weir_sdk::testing::request().system("s").user("u").build();
    /// assert_eq!(req.message_count(), 2);
    /// ```
    pub fn message_count(&self) -> u32 {
        self.inner.message_count()
    }

    /// One message by index: role, text (text parts joined with `"\n"`), tool calls
    /// (Anthropic `tool_use` blocks included, their `input` as the arguments) and the
    /// count of non-text parts.
    ///
    /// ```
    /// let req = weir_sdk::testing::request().user("hello").build();
    /// assert_eq!(req.message(0).map(|m| m.content), Some("hello".to_string()));
    /// assert!(req.message(1).is_none());
    /// ```
    pub fn message(&self, index: u32) -> Option<MessageView> {
        self.inner.message(index)
    }

    /// Every message, in order (one host call; keep the result rather than calling it
    /// again).
    ///
    /// ```
    /// let req = weir_sdk::testing::request().system("be brief").user("hi").build();
    /// let roles: Vec<String> = req.messages().into_iter().map(|m| m.role).collect();
    /// assert_eq!(roles, ["system", "user"]);
    /// ```
    pub fn messages(&self) -> Vec<MessageView> {
        self.inner.messages()
    }

    /// `max_tokens` / `max_completion_tokens`, when the client set it.
    ///
    /// ```
    /// let req = weir_sdk::testing::request().max_tokens(256).build();
    /// assert_eq!(req.max_tokens(), Some(256));
    /// ```
    pub fn max_tokens(&self) -> Option<u32> {
        self.inner.max_tokens()
    }

    /// The canonical body as JSON text; `None` unless the manifest has capability `body`.
    ///
    /// ```
    /// let req = weir_sdk::testing::request()
    ///     .body(&serde_json::json!({"model": "m", "messages": []}))
    ///     .build();
    /// assert!(req.body().unwrap().contains("\"model\""));
    /// ```
    pub fn body(&self) -> Option<String> {
        self.inner.body()
    }

    /// The canonical body parsed as JSON (capability `body`).
    ///
    /// ```
    /// let req = weir_sdk::testing::request()
    ///     .body(&serde_json::json!({"model": "m", "temperature": 0.2}))
    ///     .build();
    /// assert_eq!(req.body_json().unwrap()["temperature"], 0.2);
    /// ```
    pub fn body_json(&self) -> Option<serde_json::Value> {
        self.body().and_then(|b| serde_json::from_str(&b).ok())
    }

    /// The text of the last `user` message (reads messages from the end, one at a time).
    ///
    /// ```
    /// let req = weir_sdk::testing::request().user("first").assistant("ok").user("hello").build();
    /// assert_eq!(req.last_user_text().as_deref(), Some("hello"));
    /// ```
    pub fn last_user_text(&self) -> Option<String> {
        (0..self.message_count())
            .rev()
            .filter_map(|i| self.message(i))
            .find(|m| m.role == "user")
            .map(|m| m.content)
    }
}
