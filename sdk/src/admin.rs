//! Helpers for a plugin's admin endpoint ([`crate::Plugin::admin`]).

use crate::{AdminRequest, AdminResponse};

impl AdminResponse {
    /// An answer with a JSON body (the gateway sends it as `application/json`).
    ///
    /// ```
    /// let resp = weir_sdk::AdminResponse::json(201, &serde_json::json!({"id": "k1"}));
    /// assert_eq!(resp.body, br#"{"id":"k1"}"#);
    /// ```
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, body: &T) -> AdminResponse {
        let body = serde_json::to_vec(body).unwrap_or_else(|_| b"null".to_vec());
        AdminResponse { status, body }
    }

    /// An error answer: `{"error": {"message", "code"}}` (the shape of the gateway's own
    /// admin API).
    ///
    /// ```
    /// let resp = weir_sdk::AdminResponse::error(400, "name is required");
    /// let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    /// assert_eq!(body["error"]["code"], 400);
    /// ```
    pub fn error(status: u16, message: &str) -> AdminResponse {
        AdminResponse::json(
            status,
            &serde_json::json!({"error": {"message": message, "code": status}}),
        )
    }

    /// The 404 of a path the plugin does not serve (what [`crate::Plugin::admin`] answers
    /// by default).
    ///
    /// ```
    /// assert_eq!(weir_sdk::AdminResponse::not_found().status, 404);
    /// ```
    pub fn not_found() -> AdminResponse {
        AdminResponse::error(404, "no such admin endpoint")
    }
}

impl AdminRequest {
    /// The path split on `/`, without empty segments: `/keys/abc` gives `["keys", "abc"]`.
    ///
    /// ```
    /// let req = weir_sdk::testing::admin_request("GET", "/keys/abc/");
    /// assert_eq!(req.segments(), ["keys", "abc"]);
    /// ```
    pub fn segments(&self) -> Vec<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).collect()
    }

    /// A query parameter (percent-decoded, `+` as a space); the first one if repeated.
    ///
    /// ```
    /// let mut req = weir_sdk::testing::admin_request("GET", "/keys");
    /// req.query = "limit=10&tenant=acme%20corp".into();
    /// assert_eq!(req.query_param("tenant").as_deref(), Some("acme corp"));
    /// assert_eq!(req.query_param("limit").as_deref(), Some("10"));
    /// assert_eq!(req.query_param("other"), None);
    /// ```
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }

    /// The body parsed as JSON into `T`; an empty body reads as `{}`.
    ///
    /// ```
    /// #[derive(serde::Deserialize)]
    /// struct New { name: String }
    /// let mut req = weir_sdk::testing::admin_request("POST", "/keys");
    /// req.body = br#"{"name": "ci"}"#.to_vec();
    /// assert_eq!(req.json::<New>().unwrap().name, "ci");
    /// ```
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        let body: &[u8] = if self.body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &self.body
        };
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
    }
}

/// `%XX` and `+` decoding of a query component (invalid escapes are kept as they are).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let digit = |at: usize| bytes.get(at).and_then(|b| hex(*b));
                match (digit(i + 1), digit(i + 2)) {
                    (Some(h), Some(l)) => {
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
