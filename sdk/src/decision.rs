//! Helpers on the contract types: building decisions and reading responses.

use crate::{
    ChunkAction, Decision, MessageView, Mutations, Reply, ResponseDecision, ResponseMutations,
    ResponseView, StreamEvent, Target, TextDelta, ToolCallEdit,
};

impl Reply {
    /// A reply with a JSON body (and `content-type: application/json`).
    ///
    /// ```
    /// let reply = weir_sdk::Reply::json(200, &serde_json::json!({"cached": true}));
    /// assert_eq!(reply.body, br#"{"cached":true}"#);
    /// ```
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, body: &T) -> Reply {
        // Serializing a `Serialize` value to a Vec only fails for maps with non-string
        // keys; fall back to `null` rather than panicking inside the gateway.
        let body = serde_json::to_vec(body).unwrap_or_else(|_| b"null".to_vec());
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body,
        }
    }

    /// An OpenAI-shaped error reply: `{"error": {"message", "type", "code"}}`.
    ///
    /// ```
    /// let reply = weir_sdk::Reply::error(429, "slow down");
    /// assert_eq!(reply.status, 429);
    /// ```
    pub fn error(status: u16, message: &str) -> Reply {
        let kind = match status {
            400 | 404 | 413 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            _ => "api_error",
        };
        Reply::json(
            status,
            &serde_json::json!({
                "error": { "message": message, "type": kind, "code": status }
            }),
        )
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }
}

impl Decision {
    /// Continue without changes; chain the `set_*` methods to add some.
    ///
    /// ```
    /// use weir_sdk::Decision;
    /// let d = Decision::cont().set_header("x-team", "core").set_metadata("team", "core");
    /// assert!(matches!(d, Decision::Continue(m) if m.set_metadata.len() == 1));
    /// ```
    pub fn cont() -> Decision {
        Decision::Continue(Mutations::default())
    }

    /// Answer now with a JSON body; the chain stops and the provider is not called.
    ///
    /// ```
    /// use weir_sdk::Decision;
    /// let d = Decision::reply(200, &serde_json::json!({"ok": true}));
    /// assert!(d.is_reply());
    /// ```
    pub fn reply<T: serde::Serialize + ?Sized>(status: u16, body: &T) -> Decision {
        Decision::Reply(Reply::json(status, body))
    }

    /// Answer now with an OpenAI-shaped error (see [`Reply::error`]).
    ///
    /// ```
    /// use weir_sdk::Decision;
    /// let d = Decision::error(401, "missing key");
    /// assert!(matches!(d, Decision::Reply(r) if r.status == 401));
    /// ```
    pub fn error(status: u16, message: &str) -> Decision {
        Decision::Reply(Reply::error(status, message))
    }

    /// Whether this decision ends the chain.
    pub fn is_reply(&self) -> bool {
        matches!(self, Decision::Reply(_))
    }

    fn edit(mut self, f: impl FnOnce(&mut Mutations)) -> Decision {
        if let Decision::Continue(m) = &mut self {
            f(m);
        }
        self
    }

    /// Sets a request header (on a reply: a header of the reply).
    ///
    /// ```
    /// use weir_sdk::Decision;
    /// let d = Decision::cont().set_header("X-Tenant", "acme");
    /// assert!(matches!(d, Decision::Continue(m) if m.set_headers[0].0 == "x-tenant"));
    /// ```
    pub fn set_header(self, name: &str, value: &str) -> Decision {
        match self {
            Decision::Reply(reply) => Decision::Reply(reply.header(name, value)),
            cont => cont.edit(|m| {
                m.set_headers
                    .push((name.to_ascii_lowercase(), value.to_owned()))
            }),
        }
    }

    /// Removes a request header (e.g. the client's key before it goes upstream).
    ///
    /// ```
    /// let d = weir_sdk::Decision::cont().remove_header("authorization");
    /// # assert!(!d.is_reply());
    /// ```
    pub fn remove_header(self, name: &str) -> Decision {
        self.edit(|m| m.remove_headers.push(name.to_ascii_lowercase()))
    }

    /// Replaces the model.
    ///
    /// ```
    /// let d = weir_sdk::Decision::cont().set_model("gpt-4o-mini");
    /// # assert!(!d.is_reply());
    /// ```
    pub fn set_model(self, model: &str) -> Decision {
        self.edit(|m| m.set_model = Some(model.to_owned()))
    }

    /// Replaces the messages (role and text). Tool calls, non-text parts and names are
    /// kept from the original message at the same index; to change one message's text
    /// prefer [`Decision::set_message_text`], and for tool calls
    /// [`Decision::set_tool_call_arguments`].
    ///
    /// ```
    /// use weir_sdk::{Decision, MessageView};
    /// let d = Decision::cont().set_messages(vec![MessageView::new("user", "hi")]);
    /// # assert!(!d.is_reply());
    /// ```
    pub fn set_messages(self, messages: Vec<MessageView>) -> Decision {
        self.edit(|m| m.set_messages = Some(messages))
    }

    /// Replaces the text of message `index`. Images, audio and files of the message stay;
    /// a text with as many `"\n"`-separated pieces as the message had text parts goes
    /// back part by part, otherwise into its first text part.
    ///
    /// ```
    /// use weir_sdk::Decision;
    /// let d = Decision::cont().set_message_text(1, "[redacted]");
    /// assert!(matches!(d, Decision::Continue(m) if m.set_message_text == [(1, "[redacted]".to_string())]));
    /// ```
    pub fn set_message_text(self, index: u32, text: &str) -> Decision {
        self.edit(|m| m.set_message_text.push((index, text.to_owned())))
    }

    /// Replaces the arguments (a JSON document as text) of tool call `index` of message
    /// `message` (an assistant message's `tool_calls`, Anthropic `tool_use.input` included).
    ///
    /// ```
    /// use weir_sdk::Decision;
    /// let d = Decision::cont().set_tool_call_arguments(2, 0, r#"{"to":"[EMAIL]"}"#);
    /// assert!(matches!(d, Decision::Continue(m) if m.set_tool_call_arguments[0].owner == 2));
    /// ```
    pub fn set_tool_call_arguments(self, message: u32, index: u32, arguments: &str) -> Decision {
        self.edit(|m| {
            m.set_tool_call_arguments.push(ToolCallEdit {
                owner: message,
                index,
                arguments: arguments.to_owned(),
            })
        })
    }

    /// Replaces the whole canonical request body (JSON; needs capability `body`).
    ///
    /// ```
    /// let d = weir_sdk::Decision::cont().set_body(&serde_json::json!({"model": "m", "messages": []}));
    /// # assert!(!d.is_reply());
    /// ```
    pub fn set_body<T: serde::Serialize + ?Sized>(self, body: &T) -> Decision {
        let json = serde_json::to_string(body).ok();
        self.edit(|m| m.set_body = json)
    }

    /// Sets the route targets: (provider, model) pairs, primary first.
    ///
    /// ```
    /// let d = weir_sdk::Decision::cont().set_targets(&[("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4")]);
    /// # assert!(!d.is_reply());
    /// ```
    pub fn set_targets(self, targets: &[(&str, &str)]) -> Decision {
        let targets = targets
            .iter()
            .map(|(provider, model)| Target {
                provider: (*provider).to_owned(),
                model: (*model).to_owned(),
            })
            .collect();
        self.edit(|m| m.set_targets = Some(targets))
    }

    /// Sets an entry of the request-scoped metadata bag (seen by later plugins, logs).
    ///
    /// ```
    /// let d = weir_sdk::Decision::cont().set_metadata("tenant", "acme");
    /// # assert!(!d.is_reply());
    /// ```
    pub fn set_metadata(self, key: &str, value: &str) -> Decision {
        self.edit(|m| m.set_metadata.push((key.to_owned(), value.to_owned())))
    }

    /// Adds a header to the response the client will get.
    ///
    /// ```
    /// let d = weir_sdk::Decision::cont().set_response_header("x-tenant", "acme");
    /// # assert!(!d.is_reply());
    /// ```
    pub fn set_response_header(self, name: &str, value: &str) -> Decision {
        match self {
            Decision::Reply(reply) => Decision::Reply(reply.header(name, value)),
            cont => cont.edit(|m| {
                m.set_response_headers
                    .push((name.to_ascii_lowercase(), value.to_owned()))
            }),
        }
    }
}

impl ResponseDecision {
    /// Keep the response unchanged; chain `set_*` methods to change it.
    ///
    /// ```
    /// let d = weir_sdk::ResponseDecision::cont().set_choice_text(0, "[redacted]");
    /// # let _ = d;
    /// ```
    pub fn cont() -> ResponseDecision {
        ResponseDecision::Continue(ResponseMutations::default())
    }

    /// Replace the response with a JSON reply.
    ///
    /// ```
    /// let d = weir_sdk::ResponseDecision::reply(502, &serde_json::json!({"error": "blocked"}));
    /// # let _ = d;
    /// ```
    pub fn reply<T: serde::Serialize + ?Sized>(status: u16, body: &T) -> ResponseDecision {
        ResponseDecision::Reply(Reply::json(status, body))
    }

    fn edit(mut self, f: impl FnOnce(&mut ResponseMutations)) -> ResponseDecision {
        if let ResponseDecision::Continue(m) = &mut self {
            f(m);
        }
        self
    }

    /// Replaces the text of choice `index`.
    pub fn set_choice_text(self, index: u32, text: &str) -> ResponseDecision {
        self.edit(|m| m.set_choice_text.push((index, text.to_owned())))
    }

    /// Replaces the arguments (JSON text) of tool call `index` of choice `choice`.
    ///
    /// ```
    /// use weir_sdk::ResponseDecision;
    /// let d = ResponseDecision::cont().set_tool_call_arguments(0, 1, r#"{"city":"Paris"}"#);
    /// assert!(matches!(d, ResponseDecision::Continue(m) if m.set_tool_call_arguments[0].index == 1));
    /// ```
    pub fn set_tool_call_arguments(
        self,
        choice: u32,
        index: u32,
        arguments: &str,
    ) -> ResponseDecision {
        self.edit(|m| {
            m.set_tool_call_arguments.push(ToolCallEdit {
                owner: choice,
                index,
                arguments: arguments.to_owned(),
            })
        })
    }

    /// Whether this decision replaces the response.
    pub fn is_reply(&self) -> bool {
        matches!(self, ResponseDecision::Reply(_))
    }

    /// Adds a header to the response the client will get.
    pub fn set_header(self, name: &str, value: &str) -> ResponseDecision {
        self.edit(|m| {
            m.set_headers
                .push((name.to_ascii_lowercase(), value.to_owned()))
        })
    }

    /// Sets an entry of the request-scoped metadata bag.
    pub fn set_metadata(self, key: &str, value: &str) -> ResponseDecision {
        self.edit(|m| m.set_metadata.push((key.to_owned(), value.to_owned())))
    }
}

impl ChunkAction {
    /// Replace the event with one text delta for `choice`.
    ///
    /// ```
    /// let a = weir_sdk::ChunkAction::replace_text(0, "***");
    /// # let _ = a;
    /// ```
    pub fn replace_text(choice: u32, text: &str) -> ChunkAction {
        ChunkAction::Replace(vec![StreamEvent::TextDelta(TextDelta {
            choice,
            text: text.to_owned(),
            last: false,
        })])
    }
}

impl MessageView {
    /// A message with a role and text, no tool calls and no other parts.
    ///
    /// ```
    /// let m = weir_sdk::MessageView::new("user", "hello");
    /// assert_eq!((m.role.as_str(), m.content.as_str()), ("user", "hello"));
    /// ```
    pub fn new(role: &str, content: &str) -> MessageView {
        MessageView {
            role: role.to_owned(),
            content: content.to_owned(),
            tool_calls: Vec::new(),
            other_parts: 0,
        }
    }
}

impl ResponseView {
    /// The text of the first choice.
    pub fn text(&self) -> Option<&str> {
        self.choices.first().map(|c| c.text.as_str())
    }
}
