//! Applying decisions: request and response mutations, checked before anything changes.

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};

use super::RESPONSE_HEADER_PREFIX;
use crate::api::openai::{
    ChatRequest, ChatResponse, ContentPart, EmbeddingsRequest, MessageContent,
};
use crate::plugin::contract::{HookError, MessageView, Mutations, ResponseMutations, ResponseView};
use crate::request::{Body, RequestCtx, TargetOverride};

pub(super) fn header_pair(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("'{name}' is not a valid header name"))?;
    let v = HeaderValue::from_str(value)
        .map_err(|_| format!("the value of header '{name}' is not valid"))?;
    Ok((n, v))
}

pub(super) fn set_response_header(
    metadata: &mut BTreeMap<String, String>,
    name: &str,
    value: &str,
) -> Result<(), String> {
    let (n, _) = header_pair(name, value)?;
    metadata.insert(
        format!("{RESPONSE_HEADER_PREFIX}{}", n.as_str()),
        value.to_owned(),
    );
    Ok(())
}

/// Applies a plugin's request mutations. A malformed mutation changes nothing and is an
/// error.
pub(super) fn apply_request(ctx: &mut RequestCtx, m: Mutations) -> Result<(), String> {
    if m.is_empty() {
        return Ok(());
    }
    // Validate everything first, so a bad mutation leaves the request untouched.
    let set_headers = m
        .set_headers
        .iter()
        .map(|(k, v)| header_pair(k, v))
        .collect::<Result<Vec<_>, _>>()?;
    let remove_headers = m
        .remove_headers
        .iter()
        .map(|k| {
            HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("'{k}' is not a valid header name"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (k, v) in &m.set_response_headers {
        header_pair(k, v)?;
    }
    let mut new_body = match &m.set_body {
        None => None,
        Some(json) => Some(match &ctx.body {
            Body::Chat(_) => Body::Chat(
                serde_json::from_str::<ChatRequest>(json)
                    .map_err(|e| format!("set_body is not a chat request: {e}"))?,
            ),
            Body::Embeddings(_) => Body::Embeddings(
                serde_json::from_str::<EmbeddingsRequest>(json)
                    .map_err(|e| format!("set_body is not an embeddings request: {e}"))?,
            ),
        }),
    };
    {
        // Text and tool-call edits address the body as it will be (after set_body).
        let body = new_body.as_ref().unwrap_or(&ctx.body);
        let count = match body {
            Body::Chat(c) => c.messages.len(),
            Body::Embeddings(e) => e.input_texts().len(),
        };
        for (index, _) in &m.set_message_text {
            if usize::try_from(*index).map_or(true, |i| i >= count) {
                return Err(format!("set_message_text: no message {index}"));
            }
        }
        for edit in &m.set_tool_call_arguments {
            let Body::Chat(c) = body else {
                return Err("set_tool_call_arguments: not a chat request".into());
            };
            let found = usize::try_from(edit.owner)
                .ok()
                .and_then(|i| c.messages.get(i))
                .and_then(|msg| msg.tool_calls.as_ref())
                .and_then(|calls| calls.get(usize::try_from(edit.index).ok()?));
            if found.is_none() {
                return Err(format!(
                    "set_tool_call_arguments: message {} has no tool call {}",
                    edit.owner, edit.index
                ));
            }
        }
    }

    if m.changes_body() {
        // The client's bytes no longer say what the request says.
        ctx.client_body = None;
    }
    if let Some(body) = new_body.take() {
        ctx.body = body;
    }
    if let Some(model) = m.set_model {
        match &mut ctx.body {
            Body::Chat(c) => c.model = model,
            Body::Embeddings(e) => e.model = model,
        }
    }
    if let Some(messages) = m.set_messages {
        replace_messages(&mut ctx.body, messages);
    }
    for (index, text) in m.set_message_text {
        set_message_text(&mut ctx.body, index, text);
    }
    if let Body::Chat(c) = &mut ctx.body {
        for edit in m.set_tool_call_arguments {
            let call = usize::try_from(edit.owner)
                .ok()
                .and_then(|i| c.messages.get_mut(i))
                .and_then(|msg| msg.tool_calls.as_mut())
                .and_then(|calls| calls.get_mut(usize::try_from(edit.index).ok()?));
            if let Some(call) = call {
                call.function.arguments = edit.arguments;
            }
        }
    }
    for name in remove_headers {
        ctx.headers.remove(name);
    }
    for (k, v) in set_headers {
        ctx.headers.insert(k, v);
    }
    if let Some(targets) = m.set_targets {
        ctx.targets = Some(
            targets
                .into_iter()
                .map(|t| TargetOverride {
                    provider: t.provider,
                    model: t.model,
                })
                .collect(),
        );
    }
    for (k, v) in m.set_metadata {
        ctx.metadata.insert(k, v);
    }
    for (k, v) in &m.set_response_headers {
        set_response_header(&mut ctx.metadata, k, v)?;
    }
    Ok(())
}

/// Replaces the messages: role and text from the plugin; everything else (tool calls,
/// non-text parts, names) kept from the original at the same index.
fn replace_messages(body: &mut Body, messages: Vec<MessageView>) {
    match body {
        Body::Chat(c) => {
            let old = std::mem::take(&mut c.messages);
            c.messages = messages
                .into_iter()
                .enumerate()
                .map(|(i, mv)| {
                    let mut msg = old.get(i).cloned().unwrap_or_default();
                    replace_text(&mut msg.content, mv.content);
                    msg.role = mv.role;
                    msg
                })
                .collect();
        }
        Body::Embeddings(e) => {
            let texts: Vec<serde_json::Value> = messages
                .into_iter()
                .map(|m| serde_json::Value::String(m.content))
                .collect();
            e.input = match <[serde_json::Value; 1]>::try_from(texts) {
                Ok([one]) if e.input.is_string() => one,
                Ok([one]) => serde_json::Value::Array(vec![one]),
                Err(many) => serde_json::Value::Array(many),
            };
        }
    }
}

/// Replaces the text of message `index` (checked by the caller).
fn set_message_text(body: &mut Body, index: u32, text: String) {
    let Ok(i) = usize::try_from(index) else {
        return;
    };
    match body {
        Body::Chat(c) => {
            if let Some(msg) = c.messages.get_mut(i) {
                replace_text(&mut msg.content, text);
            }
        }
        Body::Embeddings(e) => match &mut e.input {
            serde_json::Value::String(s) if i == 0 => *s = text,
            serde_json::Value::Array(items) => {
                // `index` counts text inputs only (token arrays are not in the view).
                if let Some(slot) = items.iter_mut().filter(|v| v.is_string()).nth(i) {
                    *slot = serde_json::Value::String(text);
                }
            }
            _ => {}
        },
    }
}

/// Puts `text` into a message's content, keeping its non-text parts (images, audio,
/// files). A plain string content is replaced. With parts: when `text` has as many
/// `"\n"`-separated pieces as there are text parts (the view joined them with `"\n"`),
/// each piece goes back to its part; otherwise the whole text goes into the first text
/// part and the other text parts are removed. A message without text parts gets a text
/// part in front. Unchanged text changes nothing.
pub(super) fn replace_text(content: &mut Option<MessageContent>, text: String) {
    match content {
        None => {
            if !text.is_empty() {
                *content = Some(MessageContent::Text(text));
            }
        }
        Some(MessageContent::Text(t)) => *t = text,
        Some(MessageContent::Parts(parts)) => {
            let texts = parts.iter().filter(|p| p.text.is_some()).count();
            if texts == 0 {
                if !text.is_empty() {
                    parts.insert(0, text_part(text));
                }
                return;
            }
            let pieces: Vec<&str> = text.split('\n').collect();
            if pieces.len() == texts {
                let mut pieces = pieces.into_iter();
                for part in parts.iter_mut().filter(|p| p.text.is_some()) {
                    if let Some(piece) = pieces.next() {
                        part.text = Some(piece.to_owned());
                    }
                }
            } else {
                let mut first = true;
                let mut text = Some(text);
                parts.retain_mut(|p| {
                    if p.text.is_none() {
                        return true;
                    }
                    if first {
                        first = false;
                        p.text = text.take();
                        return true;
                    }
                    false
                });
            }
        }
    }
}

fn text_part(text: String) -> ContentPart {
    ContentPart {
        kind: "text".into(),
        text: Some(text),
        image_url: None,
        rest: Default::default(),
    }
}

/// Applies `on-response` mutations to the response (and the view the next plugin sees).
pub(super) fn apply_response(
    ctx: &mut RequestCtx,
    resp: &mut ChatResponse,
    view: &mut ResponseView,
    m: ResponseMutations,
) -> Result<(), HookError> {
    for (k, v) in &m.set_headers {
        header_pair(k, v).map_err(HookError::Plugin)?;
    }
    for (index, _) in &m.set_choice_text {
        if !resp.choices.iter().any(|c| c.index == *index) {
            return Err(HookError::Plugin(format!(
                "set_choice_text: no choice {index}"
            )));
        }
    }
    for edit in &m.set_tool_call_arguments {
        let found = resp
            .choices
            .iter()
            .find(|c| c.index == edit.owner)
            .and_then(|c| c.message.tool_calls.as_ref())
            .and_then(|calls| calls.get(usize::try_from(edit.index).ok()?));
        if found.is_none() {
            return Err(HookError::Plugin(format!(
                "set_tool_call_arguments: choice {} has no tool call {}",
                edit.owner, edit.index
            )));
        }
    }
    for (index, text) in m.set_choice_text {
        if let Some(choice) = resp.choices.iter_mut().find(|c| c.index == index) {
            replace_text(&mut choice.message.content, text.clone());
        }
        if let Some(v) = view.choices.iter_mut().find(|c| c.index == index) {
            v.text = text;
        }
    }
    for edit in m.set_tool_call_arguments {
        let call = resp
            .choices
            .iter_mut()
            .find(|c| c.index == edit.owner)
            .and_then(|c| c.message.tool_calls.as_mut())
            .and_then(|calls| calls.get_mut(usize::try_from(edit.index).ok()?));
        if let Some(call) = call {
            call.function.arguments.clone_from(&edit.arguments);
        }
        let view_call = view
            .choices
            .iter_mut()
            .find(|c| c.index == edit.owner)
            .and_then(|c| c.tool_calls.get_mut(usize::try_from(edit.index).ok()?));
        if let Some(v) = view_call {
            v.arguments = edit.arguments;
        }
    }
    for (k, v) in &m.set_headers {
        set_response_header(&mut ctx.metadata, k, v).map_err(HookError::Plugin)?;
    }
    for (k, v) in m.set_metadata {
        ctx.metadata.insert(k, v);
    }
    Ok(())
}
