//! Contract types to Lua tables and back. The shapes are documented for plugin authors in
//! `sdk/lua/weir.d.lua`; keep the two in step.
//!
//! Decisions coming back from Lua are checked strictly: an unknown key in a decision table is
//! an error (a typo such as `set_header` would otherwise be silently ignored).
//!
//! # Cost
//! Building a hook's argument is most of a cheap hook's cost, so:
//! - the builders run [`unmetered`]: with a memory limit set, mlua wraps every allocation
//!   (each string, each table, each `raw_set`) in a protected call, several per field;
//!   without one it pushes directly. What the host builds is bounded by the request it
//!   describes, not by the script;
//! - the outer tables are built by Luau constructors (`args.luau`, [`Builders`]) from field
//!   values passed in one call, and flat string maps (headers, metadata, a message) with
//!   `create_table_from`, one lock for the whole table, instead of a `raw_set` (a lock, a key
//!   lookup, a push) per field.

use std::sync::OnceLock;

use mlua::chunk::ChunkMode;
use mlua::{AppDataRef, Function, Lua, LuaSerdeExt, LuaString, Table, Value};

use crate::plugin::contract::{
    AdminRequest, AdminResponse, ChunkAction, Decision, Dialect, Endpoint, Finish, LogEntry,
    MessageView, Mutations, Pairs, Reply, RequestView, ResponseDecision, ResponseMutations,
    ResponseView, StreamEvent, Target, TextDelta, ToolCallDelta, ToolCallEdit, ToolCallView, Usage,
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

/// Runs `build` with the VM's memory limit lifted, then puts the limit back.
///
/// For allocations the host makes on the plugin's behalf (a hook's argument, a value a host
/// call returns), whose size the host controls. mlua then pushes without a protected call
/// per allocation (an allocation failure without a limit aborts the process, as it would in
/// Rust). The limit still bounds the script: its next allocation past the limit fails, so a
/// host value can overshoot it by at most its own size. Luau's garbage collector calls no
/// Lua code, so nothing of the plugin's runs while the limit is lifted.
pub(super) fn unmetered<R>(lua: &Lua, build: impl FnOnce() -> mlua::Result<R>) -> mlua::Result<R> {
    let limit = lua.set_memory_limit(0)?;
    let out = build();
    lua.set_memory_limit(limit)?;
    out
}

/// `weir.json.canonical(text, drop?)`: `text` re-encoded with object keys sorted and the
/// top-level fields named in `drop` removed. The same bytes as
/// `weir.json.encode(weir.json.decode(text))` after `t[field] = nil` for each dropped field,
/// numbers included (Luau has one number type: a value that is a whole number in the `i64`
/// range comes back as an integer, `1.0` as `1`), without building the Lua tables: several
/// times cheaper for a chat body, which is what a cache keys on.
pub(super) fn canonical_json(
    lua: &Lua,
    (text, drop): (LuaString, Option<Table>),
) -> mlua::Result<LuaString> {
    let mut json: serde_json::Value = serde_json::from_slice(&text.as_bytes())
        .map_err(|e| mlua::Error::runtime(format!("invalid JSON: {e}")))?;
    if let (Some(drop), serde_json::Value::Object(map)) = (drop, &mut json) {
        for name in drop.sequence_values::<LuaString>() {
            map.remove(&*name?.to_str()?);
        }
    }
    as_lua_numbers(&mut json);
    let out = serde_json::to_vec(&json).map_err(mlua::Error::external)?;
    unmetered(lua, || lua.create_string(out))
}

/// Rewrites every number as a trip through a Luau number (a double) and back through mlua
/// would: a whole double in the `i64` range (not -0) becomes that integer, anything else the
/// double.
fn as_lua_numbers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) => {
            let Some(x) = n.as_f64() else { return };
            // `as` saturates; the bit comparison keeps only exact round trips (and drops -0).
            let i = x as i64;
            let exact = x.fract() == 0.0
                && (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&x)
                && (i as f64).to_bits() == x.to_bits();
            *n = if exact {
                serde_json::Number::from(i)
            } else {
                match serde_json::Number::from_f64(x) {
                    Some(f) => f,
                    None => return,
                }
            };
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(as_lua_numbers),
        serde_json::Value::Object(map) => map.values_mut().for_each(as_lua_numbers),
        _ => {}
    }
}

/// The Luau side of the builders.
const ARGS: &str = include_str!("args.luau");

/// The functions of `args.luau`, in a VM's app data.
struct Builders {
    request: Function,
    response: Function,
    log: Function,
    text_delta: Function,
}

fn args_bytecode() -> mlua::Result<&'static [u8]> {
    static ARGS_BC: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    ARGS_BC
        .get_or_init(|| super::compiler().compile(ARGS).map_err(|e| e.to_string()))
        .as_deref()
        .map_err(|e| mlua::Error::runtime(e.clone()))
}

/// This VM's builders, loaded on its first hook call.
fn builders(lua: &Lua) -> mlua::Result<AppDataRef<'_, Builders>> {
    if let Some(b) = lua.app_data_ref::<Builders>() {
        return Ok(b);
    }
    let t: Table = lua
        .load(args_bytecode()?)
        .set_mode(ChunkMode::Binary)
        .set_name("=weir-args")
        .call(())?;
    let init: Function = t.raw_get("init")?;
    init.call::<()>(request_readers(lua)?)?;
    lua.set_app_data(Builders {
        request: t.raw_get("request")?,
        response: t.raw_get("response")?,
        log: t.raw_get("log")?,
        text_delta: t.raw_get("text_delta")?,
    });
    lua.app_data_ref::<Builders>()
        .ok_or_else(|| mlua::Error::runtime("weir: argument builders missing"))
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

/// What one hook call lends the VM, in its app data (one slot, so a call looks it up once
/// per swap): the request's metadata bag (`weir.ctx_get` / `ctx_set`), the plugin's request
/// scratch (`weir.scratch_*`) and, under `on_request`, the request the lazy table reads.
#[derive(Default)]
pub(super) struct CallState {
    /// The request-scoped metadata bag.
    pub(super) bag: std::collections::BTreeMap<String, String>,
    /// This plugin's request scratch.
    pub(super) scratch: std::collections::BTreeMap<String, Vec<u8>>,
    /// The request, during `on_request` (swapped in and out, never copied).
    pub(super) request: RequestView,
    /// Whether `request` holds the request of the running `on_request`.
    pub(super) in_request: bool,
}

fn with_request<R>(lua: &Lua, f: impl FnOnce(&mut RequestView) -> R) -> mlua::Result<R> {
    let mut state = lua
        .app_data_mut::<CallState>()
        .ok_or_else(|| mlua::Error::runtime("weir: no call state"))?;
    if !state.in_request {
        return Err(mlua::Error::runtime(
            "the request is only readable during on_request",
        ));
    }
    Ok(f(&mut state.request))
}

fn message_table(lua: &Lua, m: &MessageView) -> mlua::Result<Table> {
    let msg =
        lua.create_table_from([("role", m.role.as_str()), ("content", m.content.as_str())])?;
    if !m.tool_calls.is_empty() {
        msg.raw_set("tool_calls", tool_calls(lua, &m.tool_calls)?)?;
    }
    if m.other_parts > 0 {
        msg.raw_set("other_parts", m.other_parts)?;
    }
    Ok(msg)
}

/// The host half of the lazy request table (`args.luau` `B.init`): functions that read the
/// request in the VM's [`CallState`]. Each copies only what it returns.
fn request_readers(lua: &Lua) -> mlua::Result<Table> {
    let h = lua.create_table()?;
    h.raw_set(
        "header",
        lua.create_function(|lua, name: LuaString| {
            let name = name.to_str()?.to_owned();
            match with_request(lua, |r| r.header(&name))? {
                Some(v) => unmetered(lua, || lua.create_string(v)).map(Some),
                None => Ok(None),
            }
        })?,
    )?;
    h.raw_set(
        "headers",
        lua.create_function(|lua, ()| {
            let pairs = with_request(lua, |r| r.headers())?;
            // Repeated headers joined with `, `, in first-seen order.
            let mut joined: Vec<(String, String)> = Vec::with_capacity(pairs.len());
            for (k, v) in pairs {
                match joined.iter_mut().find(|(name, _)| *name == k) {
                    None => joined.push((k, v)),
                    Some((_, prev)) => {
                        prev.push_str(", ");
                        prev.push_str(&v);
                    }
                }
            }
            unmetered(lua, || lua.create_table_from(joined))
        })?,
    )?;
    h.raw_set(
        "messages",
        lua.create_function(|lua, ()| {
            let messages = with_request(lua, |r| r.messages())?;
            unmetered(lua, || {
                lua.create_sequence_from(
                    messages
                        .iter()
                        .map(|m| message_table(lua, m))
                        .collect::<mlua::Result<Vec<Table>>>()?,
                )
            })
        })?,
    )?;
    h.raw_set(
        "message",
        lua.create_function(|lua, index: i64| {
            // 1-based, like the `messages` list.
            let Some(i) = index.checked_sub(1).and_then(|i| u32::try_from(i).ok()) else {
                return Ok(None);
            };
            match with_request(lua, |r| r.message(i))? {
                Some(m) => unmetered(lua, || message_table(lua, &m)).map(Some),
                None => Ok(None),
            }
        })?,
    )?;
    h.raw_set(
        "message_count",
        lua.create_function(|lua, ()| with_request(lua, |r| r.message_count()))?,
    )?;
    h.raw_set(
        "max_tokens",
        lua.create_function(|lua, ()| with_request(lua, |r| r.max_tokens()))?,
    )?;
    h.raw_set(
        "body",
        lua.create_function(|lua, ()| match with_request(lua, RequestView::body_json)? {
            Some(json) => unmetered(lua, || lua.create_string(json)).map(Some),
            None => Ok(None),
        })?,
    )?;
    Ok(h)
}

/// `req` of `on_request`: a lazy table (see `args.luau` and `sdk/lua/weir.d.lua`) over the
/// request in the VM's [`CallState`], which must hold it for the call. The two strings and
/// the table are bounded by the request; built unmetered like every hook argument.
pub(super) fn request_table(lua: &Lua) -> mlua::Result<Table> {
    unmetered(lua, || {
        let (id, d, e, model, stream) = with_request(lua, |r| {
            (
                lua.create_string(&r.request_id),
                dialect(r.dialect),
                endpoint(r.endpoint()),
                lua.create_string(r.model()),
                r.stream(),
            )
        })?;
        builders(lua)?.request.call((id?, d, e, model?, stream))
    })
}

/// `resp` of `on_response`.
pub(super) fn response_table(lua: &Lua, resp: &ResponseView) -> mlua::Result<Table> {
    unmetered(lua, || build_response_table(lua, resp))
}

fn build_response_table(lua: &Lua, resp: &ResponseView) -> mlua::Result<Table> {
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
    let u = resp.usage.as_ref();
    builders(lua)?.response.call((
        resp.request_id.as_str(),
        resp.model.as_str(),
        resp.status,
        choices,
        u.map(|u| u.prompt_tokens),
        u.map(|u| u.completion_tokens),
        u.map(|u| u.cached_tokens),
        u.map(|u| u.cache_write_tokens),
    ))
}

/// `event` of `on_response_chunk`: `{type = "text_delta" | "tool_call_delta" | "usage" |
/// "finish", ...}`.
pub(super) fn event_table(lua: &Lua, event: &StreamEvent) -> mlua::Result<Table> {
    unmetered(lua, || build_event_table(lua, event))
}

fn build_event_table(lua: &Lua, event: &StreamEvent) -> mlua::Result<Table> {
    // Text deltas are nearly every event of a stream; the rest are rare.
    if let StreamEvent::TextDelta(d) = event {
        return builders(lua)?
            .text_delta
            .call((d.choice, d.text.as_str(), d.last));
    }
    let t = lua.create_table_with_capacity(0, 6)?;
    match event {
        StreamEvent::TextDelta(_) => {}
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
            t.raw_set("cache_write_tokens", u.cache_write_tokens)?;
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
    unmetered(lua, || build_log_table(lua, e))
}

fn build_log_table(lua: &Lua, e: &LogEntry) -> mlua::Result<Table> {
    let metadata =
        lua.create_table_from(e.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    let u = e.usage.as_ref();
    let attempts = lua.create_table_with_capacity(e.attempts.len(), 0)?;
    for a in &e.attempts {
        let t = lua.create_table_with_capacity(0, 5)?;
        t.raw_set("provider", a.provider.as_str())?;
        t.raw_set("target_model", a.target_model.as_str())?;
        t.raw_set("status", a.status)?;
        t.raw_set("latency_ms", a.latency_ms)?;
        t.raw_set("error", a.error.as_deref())?;
        attempts.raw_push(t)?;
    }
    let decisions = lua.create_table_with_capacity(e.decisions.len(), 0)?;
    for d in &e.decisions {
        decisions.raw_push(lua.create_table_from([
            ("plugin", d.plugin.as_str()),
            ("decision", d.decision.as_str()),
        ])?)?;
    }
    builders(lua)?.log.call((
        e.request_id.as_str(),
        e.model.as_str(),
        e.provider.as_str(),
        e.target_model.as_str(),
        e.status,
        e.stream,
        e.latency_ms,
        e.ttft_ms,
        metadata,
        u.map(|u| u.prompt_tokens),
        u.map(|u| u.completion_tokens),
        u.map(|u| u.cached_tokens),
        u.map(|u| u.cache_write_tokens),
        attempts,
        decisions,
        e.cost_usd,
    ))
}

/// `req` of `admin`: `{method, path, query, body}`.
pub(super) fn admin_table(lua: &Lua, req: &AdminRequest) -> mlua::Result<Table> {
    unmetered(lua, || {
        let t = lua.create_table_with_capacity(0, 4)?;
        t.raw_set("method", req.method.as_str())?;
        t.raw_set("path", req.path.as_str())?;
        t.raw_set("query", req.query.as_str())?;
        t.raw_set("body", lua.create_string(&req.body)?)?;
        Ok(t)
    })
}

/// The result of `admin`: `{status = 200, body = "..." | table}` (a table body is encoded
/// as JSON).
pub(super) fn admin_response(lua: &Lua, v: Value) -> Result<AdminResponse, Malformed> {
    let t = table(&v, "admin's answer")?;
    let mut out = AdminResponse {
        status: 200,
        body: Vec::new(),
    };
    for (k, v) in entries(t, "admin's answer")? {
        match k.as_str() {
            "status" => {
                out.status = uint::<u16>(v, "status")?;
                if !(100..=599).contains(&out.status) {
                    return Err("admin status must be between 100 and 599".into());
                }
            }
            "body" => {
                out.body = match &v {
                    Value::Nil => Vec::new(),
                    Value::String(s) => s.as_bytes().to_vec(),
                    _ => json_text(lua, &v, "body")?.into_bytes(),
                }
            }
            other => return Err(format!("unknown key '{other}' in admin's answer")),
        }
    }
    Ok(out)
}

/// `{[index] = "text", ...}` (0-based keys) as (index, text) pairs, in index order.
fn indexed_texts(v: &Value, what: &str) -> Result<Vec<(u32, String)>, Malformed> {
    let texts = table(v, what)?;
    let mut out = Vec::new();
    for pair in texts.pairs::<Value, Value>() {
        let (i, s) = pair.map_err(lua_err(what))?;
        let index = match i {
            Value::Integer(i) => u32::try_from(i).ok(),
            Value::Number(n) if n.fract() == 0.0 => u32::try_from(n as i64).ok(),
            _ => None,
        }
        .ok_or_else(|| format!("{what} keys must be indexes (0, 1, ...)"))?;
        out.push((index, text(&s, what)?));
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out)
}

/// `{{owner = 1, index = 0, arguments = "{...}"}, ...}` (0-based).
fn tool_call_edits(lua: &Lua, v: &Value, what: &str) -> Result<Vec<ToolCallEdit>, Malformed> {
    let t = table(v, what)?;
    let mut out = Vec::new();
    for item in t.sequence_values::<Value>() {
        let item = item.map_err(lua_err(what))?;
        let e = table(&item, what)?;
        let mut edit = ToolCallEdit::default();
        for (k, v) in entries(e, what)? {
            match k.as_str() {
                "owner" | "message" | "choice" => edit.owner = uint(v, "owner")?,
                "index" => edit.index = uint(v, "index")?,
                "arguments" => edit.arguments = json_text(lua, &v, "arguments")?,
                other => return Err(format!("unknown key '{other}' in an item of {what}")),
            }
        }
        out.push(edit);
    }
    Ok(out)
}

fn text(v: &Value, what: &str) -> Result<String, Malformed> {
    text_of(v, || what.to_owned())
}

/// [`text`] naming the value with `what()` only on error (decisions are parsed on every
/// call: no message is formatted for a good one).
fn text_of(v: &Value, what: impl FnOnce() -> String) -> Result<String, Malformed> {
    match v {
        Value::String(s) => Ok(s.to_string_lossy()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!(
            "{} must be a string, not {}",
            what(),
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
        out.push((text_of(&k, || format!("a key of {what}"))?, v));
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
            let Value::Table(pair) = &item else {
                return Err(format!(
                    "an item of {what} must be a table, not {}",
                    item.type_name()
                ));
            };
            let k: Value = pair.raw_get(1).map_err(lua_err(what))?;
            let v: Value = pair.raw_get(2).map_err(lua_err(what))?;
            out.push((text(&k, what)?, text(&v, what)?));
        }
        return Ok(out);
    }
    entries(t, what)?
        .into_iter()
        .map(|(k, v)| {
            let v = text_of(&v, || format!("{what}.{k}"))?;
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
            other_parts: 0,
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
            "set_message_text" => m.set_message_text = indexed_texts(&v, "set_message_text")?,
            "set_tool_call_arguments" => {
                m.set_tool_call_arguments = tool_call_edits(lua, &v, "set_tool_call_arguments")?;
            }
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
            "set_choice_text" => m.set_choice_text = indexed_texts(&v, "set_choice_text")?,
            "set_tool_call_arguments" => {
                m.set_tool_call_arguments = tool_call_edits(lua, &v, "set_tool_call_arguments")?;
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
            last: false,
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
            cache_write_tokens: uint(get("cache_write_tokens")?, "event.cache_write_tokens")?,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> Lua {
        let lua = Lua::new();
        let json = lua.create_table().unwrap();
        json.raw_set(
            "encode",
            lua.create_function(|lua, v: Value| {
                let json: serde_json::Value = lua.from_value(v)?;
                Ok(json.to_string())
            })
            .unwrap(),
        )
        .unwrap();
        json.raw_set(
            "decode",
            lua.create_function(|lua, s: LuaString| {
                let json: serde_json::Value = serde_json::from_slice(&s.as_bytes()).unwrap();
                lua.to_value(&json)
            })
            .unwrap(),
        )
        .unwrap();
        json.raw_set("canonical", lua.create_function(canonical_json).unwrap())
            .unwrap();
        lua.globals().raw_set("json", json).unwrap();
        lua
    }

    /// `weir.json.canonical` gives the bytes of the Lua round trip it replaces in the cache
    /// plugin (so entries stored before keep their keys' canonical text).
    #[test]
    fn canonical_json_is_the_lua_round_trip() {
        let lua = vm();
        let round_trip = lua
            .load(
                r#"
                local text, drop = ...
                local body = json.decode(text)
                for _, f in drop do body[f] = nil end
                return json.encode(body), json.canonical(text, drop)
            "#,
            )
            .into_function()
            .unwrap();
        for text in [
            r#"{"model":"m","messages":[{"role":"user","content":"hi \"there\" \u00e9"}],"stream":true,"user":"u"}"#,
            r#"{"b":1,"a":[1.0,2.5,-0.0,0,1e3,1e300,12345678901234567890,-9223372036854775808,9007199254740993],"c":{}}"#,
            r#"{"z":null,"y":[],"x":[null,{}],"w":{"2":"two","10":"ten"},"v":true,"stream_options":{"include_usage":true}}"#,
            r#"{"temperature":0.2,"top_p":1,"max_tokens":256,"n":1.5e-7,"stop":["\\n","STOP"]}"#,
            r#"[1,2,{"b":0.1,"a":"x"}]"#,
        ] {
            let drop = lua
                .create_sequence_from(["stream", "stream_options", "user"])
                .unwrap();
            let (want, got): (String, String) = round_trip.call((text, drop)).unwrap();
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn canonical_json_refuses_bad_json() {
        let lua = vm();
        let err = lua
            .load(r#"return json.canonical("{nope", {})"#)
            .exec()
            .unwrap_err();
        assert!(err.to_string().contains("invalid JSON"), "{err}");
        // No drop list is fine too.
        let out: String = lua
            .load(r#"return json.canonical('{"b":1,"a":2}')"#)
            .eval()
            .unwrap();
        assert_eq!(out, r#"{"a":2,"b":1}"#);
        // Not an object: nothing to drop.
        let out: String = lua
            .load(r#"return json.canonical('"text"', {"text"})"#)
            .eval()
            .unwrap();
        assert_eq!(out, r#""text""#);
    }

    #[test]
    fn builders_restore_the_memory_limit() {
        let lua = vm();
        lua.set_memory_limit(1 << 20).unwrap();
        let req = RequestView {
            request_id: "r".into(),
            ..RequestView::default()
        };
        lua.set_app_data(CallState {
            request: req,
            in_request: true,
            ..CallState::default()
        });
        let t = request_table(&lua).unwrap();
        assert_eq!(lua.set_memory_limit(1 << 20).unwrap(), 1 << 20);
        assert_eq!(t.raw_get::<String>("request_id").unwrap(), "r");
        // The limit still holds for the script afterwards.
        let err = lua
            .load(r#"return string.rep("x", 4 * 1024 * 1024)"#)
            .exec()
            .unwrap_err();
        assert!(matches!(err, mlua::Error::MemoryError(_)), "{err}");
    }
}
