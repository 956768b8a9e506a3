//! Contract types to Lua tables and back. The shapes are documented for plugin authors in
//! `sdk/lua/weir.d.lua`; keep the two in step.
//!
//! Decisions coming back from Lua are checked strictly: an unknown key in a decision table is
//! an error (a typo such as `set_header` would otherwise be silently ignored).

use mlua::{Lua, LuaSerdeExt, LuaString, Table, Value};

use crate::plugin::contract::{
    ChunkAction, Decision, Dialect, Endpoint, Finish, LogEntry, MessageView, Mutations, Pairs,
    Reply, RequestView, ResponseDecision, ResponseMutations, ResponseView, StreamEvent, Target,
    TextDelta, ToolCallDelta, ToolCallView, Usage,
};

/// A decision that could not be understood; becomes `HookError::Plugin`.
pub(super) type Malformed = String;

fn dialect(d: Dialect) -> &'static str {
    match d {
        Dialect::OpenAi => "openai",
        Dialect::Anthropic => "anthropic",
    }
}

fn endpoint(e: Endpoint) -> &'static str {
    match e {
        Endpoint::Chat => "chat",
        Endpoint::Embeddings => "embeddings",
    }
}

fn tool_calls(lua: &Lua, calls: &[ToolCallView]) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(calls.len(), 0)?;
    for c in calls {
        let call = lua.create_table_with_capacity(0, 3)?;
        call.raw_set("id", c.id.as_str())?;
        call.raw_set("name", c.name.as_str())?;
        call.raw_set("arguments", c.arguments.as_str())?;
        t.raw_push(call)?;
    }
    Ok(t)
}

fn usage(lua: &Lua, u: &Usage) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 3)?;
    t.raw_set("prompt_tokens", u.prompt_tokens)?;
    t.raw_set("completion_tokens", u.completion_tokens)?;
    t.raw_set("cached_tokens", u.cached_tokens)?;
    Ok(t)
}

/// `req` of `on_request`: headers as a map of lower-case names (repeated headers joined with
/// `, `), messages as a list of `{role, content, tool_calls?}`.
pub(super) fn request_table(lua: &Lua, req: &RequestView) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 8)?;
    t.raw_set("request_id", req.request_id.as_str())?;
    t.raw_set("dialect", dialect(req.dialect))?;
    t.raw_set("endpoint", endpoint(req.endpoint))?;
    t.raw_set("model", req.model.as_str())?;
    t.raw_set("stream", req.stream)?;
    let headers = lua.create_table_with_capacity(0, req.headers.len())?;
    for (k, v) in &req.headers {
        match headers.raw_get::<Option<LuaString>>(k.as_str())? {
            None => headers.raw_set(k.as_str(), v.as_str())?,
            Some(prev) => {
                let joined = format!("{}, {v}", prev.to_str()?);
                headers.raw_set(k.as_str(), joined)?;
            }
        }
    }
    t.raw_set("headers", headers)?;
    let messages = lua.create_table_with_capacity(req.messages.len(), 0)?;
    for m in &req.messages {
        let msg = lua.create_table_with_capacity(0, 3)?;
        msg.raw_set("role", m.role.as_str())?;
        msg.raw_set("content", m.content.as_str())?;
        if !m.tool_calls.is_empty() {
            msg.raw_set("tool_calls", tool_calls(lua, &m.tool_calls)?)?;
        }
        messages.raw_push(msg)?;
    }
    t.raw_set("messages", messages)?;
    if let Some(body) = &req.body {
        t.raw_set("body", body.as_str())?;
    }
    Ok(t)
}

/// `resp` of `on_response`.
pub(super) fn response_table(lua: &Lua, resp: &ResponseView) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 5)?;
    t.raw_set("request_id", resp.request_id.as_str())?;
    t.raw_set("model", resp.model.as_str())?;
    t.raw_set("status", resp.status)?;
    let choices = lua.create_table_with_capacity(resp.choices.len(), 0)?;
    for c in &resp.choices {
        let choice = lua.create_table_with_capacity(0, 4)?;
        choice.raw_set("index", c.index)?;
        choice.raw_set("text", c.text.as_str())?;
        if !c.tool_calls.is_empty() {
            choice.raw_set("tool_calls", tool_calls(lua, &c.tool_calls)?)?;
        }
        if let Some(r) = &c.finish_reason {
            choice.raw_set("finish_reason", r.as_str())?;
        }
        choices.raw_push(choice)?;
    }
    t.raw_set("choices", choices)?;
    if let Some(u) = &resp.usage {
        t.raw_set("usage", usage(lua, u)?)?;
    }
    Ok(t)
}

/// `event` of `on_response_chunk`: `{type = "text_delta" | "tool_call_delta" | "usage" |
/// "finish", ...}`.
pub(super) fn event_table(lua: &Lua, event: &StreamEvent) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 6)?;
    match event {
        StreamEvent::TextDelta(d) => {
            t.raw_set("type", "text_delta")?;
            t.raw_set("choice", d.choice)?;
            t.raw_set("text", d.text.as_str())?;
        }
        StreamEvent::ToolCallDelta(d) => {
            t.raw_set("type", "tool_call_delta")?;
            t.raw_set("choice", d.choice)?;
            t.raw_set("index", d.index)?;
            t.raw_set("id", d.id.as_deref())?;
            t.raw_set("name", d.name.as_deref())?;
            t.raw_set("arguments", d.arguments.as_str())?;
        }
        StreamEvent::Usage(u) => {
            t.raw_set("type", "usage")?;
            t.raw_set("prompt_tokens", u.prompt_tokens)?;
            t.raw_set("completion_tokens", u.completion_tokens)?;
            t.raw_set("cached_tokens", u.cached_tokens)?;
        }
        StreamEvent::Finish(f) => {
            t.raw_set("type", "finish")?;
            t.raw_set("choice", f.choice)?;
            t.raw_set("reason", f.reason.as_str())?;
        }
    }
    Ok(t)
}

/// `entry` of `on_log`.
pub(super) fn log_table(lua: &Lua, e: &LogEntry) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 11)?;
    t.raw_set("request_id", e.request_id.as_str())?;
    t.raw_set("model", e.model.as_str())?;
    t.raw_set("provider", e.provider.as_str())?;
    t.raw_set("target_model", e.target_model.as_str())?;
    t.raw_set("status", e.status)?;
    t.raw_set("stream", e.stream)?;
    if let Some(u) = &e.usage {
        t.raw_set("usage", usage(lua, u)?)?;
    }
    t.raw_set("latency_ms", e.latency_ms)?;
    t.raw_set("ttft_ms", e.ttft_ms)?;
    let md = lua.create_table_with_capacity(0, e.metadata.len())?;
    for (k, v) in &e.metadata {
        md.raw_set(k.as_str(), v.as_str())?;
    }
    t.raw_set("metadata", md)?;
    Ok(t)
}

fn text(v: &Value, what: &str) -> Result<String, Malformed> {
    match v {
        Value::String(s) => Ok(s.to_string_lossy()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!(
            "{what} must be a string, not {}",
            other.type_name()
        )),
    }
}

fn table<'a>(v: &'a Value, what: &str) -> Result<&'a Table, Malformed> {
    match v {
        Value::Table(t) => Ok(t),
        other => Err(format!("{what} must be a table, not {}", other.type_name())),
    }
}

fn lua_err(what: &str) -> impl Fn(mlua::Error) -> Malformed + '_ {
    move |e| format!("{what}: {e}")
}

/// Every (key, value) of a table, keys as strings, sorted so that decisions are
/// deterministic whatever Lua's hash order.
fn entries(t: &Table, what: &str) -> Result<Vec<(String, Value)>, Malformed> {
    let mut out = Vec::new();
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair.map_err(lua_err(what))?;
        out.push((text(&k, &format!("a key of {what}"))?, v));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Name/value pairs from `{name = value, ...}` (sorted by name) or `{{name, value}, ...}`.
fn pairs(v: &Value, what: &str) -> Result<Pairs, Malformed> {
    let t = table(v, what)?;
    if t.raw_len() > 0 {
        let mut out = Vec::new();
        for item in t.sequence_values::<Value>() {
            let item = item.map_err(lua_err(what))?;
            let pair = table(&item, &format!("an item of {what}"))?;
            let k: Value = pair.raw_get(1).map_err(lua_err(what))?;
            let v: Value = pair.raw_get(2).map_err(lua_err(what))?;
            out.push((text(&k, what)?, text(&v, what)?));
        }
        return Ok(out);
    }
    entries(t, what)?
        .into_iter()
        .map(|(k, v)| {
            let v = text(&v, &format!("{what}.{k}"))?;
            Ok((k, v))
        })
        .collect()
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>, Malformed> {
    let t = table(v, what)?;
    t.sequence_values::<Value>()
        .map(|item| text(&item.map_err(lua_err(what))?, what))
        .collect()
}

fn field(t: &Table, key: &str, what: &str) -> Result<Value, Malformed> {
    t.raw_get::<Value>(key).map_err(lua_err(what))
}

fn json_text(lua: &Lua, v: &Value, what: &str) -> Result<String, Malformed> {
    match v {
        Value::String(s) => Ok(s.to_string_lossy()),
        Value::Table(_) => {
            let json: serde_json::Value = lua.from_value(v.clone()).map_err(lua_err(what))?;
            Ok(json.to_string())
        }
        other => Err(format!(
            "{what} must be a string or a table, not {}",
            other.type_name()
        )),
    }
}

fn reply(lua: &Lua, v: &Value) -> Result<Reply, Malformed> {
    let t = table(v, "reply")?;
    let mut r = Reply {
        status: 200,
        headers: Vec::new(),
        body: Vec::new(),
    };
    for (k, v) in entries(t, "reply")? {
        match k.as_str() {
            "status" => {
                r.status = match v {
                    Value::Integer(i) => u16::try_from(i).ok(),
                    Value::Number(n) if n.fract() == 0.0 => u16::try_from(n as i64).ok(),
                    _ => None,
                }
                .filter(|s| (100..=599).contains(s))
                .ok_or("reply.status must be an HTTP status between 100 and 599")?;
            }
            "headers" => r.headers = pairs(&v, "reply.headers")?,
            "body" => {
                r.body = match &v {
                    Value::Nil => Vec::new(),
                    Value::String(s) => s.as_bytes().to_vec(),
                    _ => json_text(lua, &v, "reply.body")?.into_bytes(),
                }
            }
            other => return Err(format!("unknown key '{other}' in reply")),
        }
    }
    Ok(r)
}

fn messages(v: &Value) -> Result<Vec<MessageView>, Malformed> {
    let t = table(v, "set_messages")?;
    let mut out = Vec::new();
    for item in t.sequence_values::<Value>() {
        let item = item.map_err(lua_err("set_messages"))?;
        let m = table(&item, "an item of set_messages")?;
        out.push(MessageView {
            role: text(&field(m, "role", "set_messages")?, "set_messages[].role")?,
            content: match field(m, "content", "set_messages")? {
                Value::Nil => String::new(),
                v => text(&v, "set_messages[].content")?,
            },
            tool_calls: Vec::new(),
        });
    }
    Ok(out)
}

fn targets(v: &Value) -> Result<Vec<Target>, Malformed> {
    let t = table(v, "set_targets")?;
    let mut out = Vec::new();
    for item in t.sequence_values::<Value>() {
        let item = item.map_err(lua_err("set_targets"))?;
        let target = table(&item, "an item of set_targets")?;
        out.push(Target {
            provider: text(
                &field(target, "provider", "set_targets")?,
                "set_targets[].provider",
            )?,
            model: text(
                &field(target, "model", "set_targets")?,
                "set_targets[].model",
            )?,
        });
    }
    Ok(out)
}

/// The result of `on_request`: `nil` (continue), a mutations table, or `{reply = {...}}`.
pub(super) fn decision(lua: &Lua, v: Value) -> Result<Decision, Malformed> {
    let t = match &v {
        Value::Nil => return Ok(Decision::Continue(Mutations::default())),
        Value::Table(t) => t,
        other => {
            return Err(format!(
                "on_request must return nil or a table, not {}",
                other.type_name()
            ));
        }
    };
    let r = field(t, "reply", "decision")?;
    if !r.is_nil() {
        return Ok(Decision::Reply(reply(lua, &r)?));
    }
    let mut m = Mutations::default();
    for (k, v) in entries(t, "decision")? {
        match k.as_str() {
            "set_headers" => m.set_headers = pairs(&v, "set_headers")?,
            "remove_headers" => m.remove_headers = strings(&v, "remove_headers")?,
            "set_model" => m.set_model = Some(text(&v, "set_model")?),
            "set_messages" => m.set_messages = Some(messages(&v)?),
            "set_body" => m.set_body = Some(json_text(lua, &v, "set_body")?),
            "set_targets" => m.set_targets = Some(targets(&v)?),
            "set_metadata" => m.set_metadata = pairs(&v, "set_metadata")?,
            "set_response_headers" => {
                m.set_response_headers = pairs(&v, "set_response_headers")?;
            }
            other => return Err(format!("unknown key '{other}' in on_request's decision")),
        }
    }
    Ok(Decision::Continue(m))
}

/// The result of `on_response`: `nil`, `{set_choice_text = {[0] = "..."}, set_headers = {..},
/// set_metadata = {..}}` or `{reply = {...}}`.
pub(super) fn response_decision(lua: &Lua, v: Value) -> Result<ResponseDecision, Malformed> {
    let t = match &v {
        Value::Nil => return Ok(ResponseDecision::Continue(ResponseMutations::default())),
        Value::Table(t) => t,
        other => {
            return Err(format!(
                "on_response must return nil or a table, not {}",
                other.type_name()
            ));
        }
    };
    let r = field(t, "reply", "decision")?;
    if !r.is_nil() {
        return Ok(ResponseDecision::Reply(reply(lua, &r)?));
    }
    let mut m = ResponseMutations::default();
    for (k, v) in entries(t, "decision")? {
        match k.as_str() {
            "set_choice_text" => {
                let texts = table(&v, "set_choice_text")?;
                for pair in texts.pairs::<Value, Value>() {
                    let (i, s) = pair.map_err(lua_err("set_choice_text"))?;
                    let index = match i {
                        Value::Integer(i) => u32::try_from(i).ok(),
                        Value::Number(n) if n.fract() == 0.0 => u32::try_from(n as i64).ok(),
                        _ => None,
                    }
                    .ok_or("set_choice_text keys must be choice indexes (0, 1, ...)")?;
                    m.set_choice_text
                        .push((index, text(&s, "set_choice_text[]")?));
                }
                m.set_choice_text.sort_by_key(|(i, _)| *i);
            }
            "set_headers" => m.set_headers = pairs(&v, "set_headers")?,
            "set_metadata" => m.set_metadata = pairs(&v, "set_metadata")?,
            other => return Err(format!("unknown key '{other}' in on_response's decision")),
        }
    }
    Ok(ResponseDecision::Continue(m))
}

fn uint<T: TryFrom<i64>>(v: Value, what: &str) -> Result<T, Malformed> {
    let n = match v {
        Value::Nil => 0,
        Value::Integer(i) => i,
        Value::Number(n) if n.fract() == 0.0 => n as i64,
        other => {
            return Err(format!(
                "{what} must be an integer, not {}",
                other.type_name()
            ));
        }
    };
    T::try_from(n).map_err(|_| format!("{what} is out of range"))
}

fn opt_text(v: Value, what: &str) -> Result<Option<String>, Malformed> {
    match v {
        Value::Nil => Ok(None),
        v => text(&v, what).map(Some),
    }
}

/// A stream event written by a plugin (`weir.replace({...})`).
fn event(v: &Value) -> Result<StreamEvent, Malformed> {
    let t = table(v, "an event")?;
    let get = |k: &str| field(t, k, "event");
    let kind = text(&get("type")?, "event.type")?;
    Ok(match kind.as_str() {
        "text_delta" => StreamEvent::TextDelta(TextDelta {
            choice: uint(get("choice")?, "event.choice")?,
            text: opt_text(get("text")?, "event.text")?.unwrap_or_default(),
        }),
        "tool_call_delta" => StreamEvent::ToolCallDelta(ToolCallDelta {
            choice: uint(get("choice")?, "event.choice")?,
            index: uint(get("index")?, "event.index")?,
            id: opt_text(get("id")?, "event.id")?,
            name: opt_text(get("name")?, "event.name")?,
            arguments: opt_text(get("arguments")?, "event.arguments")?.unwrap_or_default(),
        }),
        "usage" => StreamEvent::Usage(Usage {
            prompt_tokens: uint(get("prompt_tokens")?, "event.prompt_tokens")?,
            completion_tokens: uint(get("completion_tokens")?, "event.completion_tokens")?,
            cached_tokens: uint(get("cached_tokens")?, "event.cached_tokens")?,
        }),
        "finish" => StreamEvent::Finish(Finish {
            choice: uint(get("choice")?, "event.choice")?,
            reason: opt_text(get("reason")?, "event.reason")?.unwrap_or_default(),
        }),
        other => return Err(format!("unknown event type '{other}'")),
    })
}

/// The result of `on_response_chunk`: `nil` (pass), `{hold = true}`, `{replace = {...}}` or
/// `{abort = "message"}`.
pub(super) fn chunk_action(v: Value) -> Result<ChunkAction, Malformed> {
    let t = match &v {
        Value::Nil => return Ok(ChunkAction::Pass),
        Value::String(s) if s.as_bytes().as_ref() == b"pass" => return Ok(ChunkAction::Pass),
        Value::Table(t) => t,
        other => {
            return Err(format!(
                "on_response_chunk must return nil or a table, not {}",
                other.type_name()
            ));
        }
    };
    let fields = entries(t, "chunk action")?;
    match fields.as_slice() {
        [] => Ok(ChunkAction::Pass),
        [(k, Value::Boolean(true))] if k == "hold" => Ok(ChunkAction::Hold),
        [(k, v)] if k == "abort" => Ok(ChunkAction::Abort(text(v, "abort")?)),
        [(k, v)] if k == "replace" => {
            let list = table(v, "replace")?;
            let mut events = Vec::new();
            for item in list.sequence_values::<Value>() {
                events.push(event(&item.map_err(lua_err("replace"))?)?);
            }
            Ok(ChunkAction::Replace(events))
        }
        _ => Err(
            "on_response_chunk must return nil, weir.hold(), weir.replace(events) or \
             weir.abort(message)"
                .into(),
        ),
    }
}
