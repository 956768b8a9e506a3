---@meta weir
-- Type definitions of Weir's Lua plugin API, for LuaLS (lua-language-server).
--
-- Use: add this folder to `workspace.library` in your `.luarc.json`:
--   { "workspace.library": ["<weir checkout>/sdk/lua"], "runtime.version": "Lua 5.1" }
--
-- Plugins run on Luau (sandboxed): no `io`, `os`, `require`, `load`/`loadstring`, `debug`,
-- `dofile`, `print`; the standard `string`, `table`, `math`, `utf8`, `bit32` libraries and
-- the `weir` global below. A plugin defines any of the hook functions (as globals, or as
-- fields of a table the script returns) and lists them in plugin.toml `hooks`.
--
-- Each worker thread runs its own copy of the script: keep request-independent data in
-- locals set by `init`, and shared state in `weir.kv`.

-- Hooks ----------------------------------------------------------------------------------

--- Called once per VM with the instance's `config` (from weir.toml, checked against the
--- manifest's `config_schema`). Raise an error (`error("...")`) to reject the config: the
--- gateway refuses to load it.
---@type fun(config: table)?
init = nil

--- Called for every request, in configured order. Return nothing to go on unchanged,
--- a mutations table (see `weir.Mutations`) to go on with changes, or `weir.reply(...)`
--- to answer now (ends the chain; the provider is not called).
---@type fun(req: weir.Request): weir.Decision?
on_request = nil

--- Called on a complete (non-streaming) response, in reverse configured order.
---@type fun(resp: weir.Response): weir.ResponseDecision?
on_response = nil

--- Called on every normalized stream event, in reverse configured order. Return nothing
--- (pass), `weir.hold()`, `weir.replace(events)` or `weir.abort(message)`.
---@type fun(event: weir.Event): weir.ChunkAction?
on_response_chunk = nil

--- Called after the response was sent, off the hot path.
---@type fun(entry: weir.LogEntry)?
on_log = nil

-- Views ----------------------------------------------------------------------------------

---@class weir.ToolCall
---@field id string
---@field name string
---@field arguments string JSON text

---@class weir.Message
---@field role "system"|"developer"|"user"|"assistant"|"tool"|string
---@field content string The text (content parts joined)
---@field tool_calls weir.ToolCall[]? Tool calls of an assistant message

---@class weir.Request
---@field request_id string
---@field dialect "openai"|"anthropic" The API the client spoke (answer errors in it)
---@field endpoint "chat"|"embeddings"
---@field model string The model asked for (after earlier plugins' changes)
---@field stream boolean
---@field headers table<string, string> Lower-case names; only those declared in plugin.toml `headers` (or all with "*"); repeated headers joined with ", "
---@field messages weir.Message[] The conversation (embeddings: one user message per input)
---@field body string? The canonical request as JSON text, with capability `body = true`

---@class weir.Choice
---@field index integer
---@field text string
---@field tool_calls weir.ToolCall[]?
---@field finish_reason string?

---@class weir.Usage
---@field prompt_tokens integer
---@field completion_tokens integer
---@field cached_tokens integer

---@class weir.Response
---@field request_id string
---@field model string
---@field status integer
---@field choices weir.Choice[]
---@field usage weir.Usage?

---@class weir.Event
---@field type "text_delta"|"tool_call_delta"|"usage"|"finish"
---@field choice integer? text_delta, tool_call_delta, finish
---@field text string? text_delta (with any text this plugin held before it prepended)
---@field index integer? tool_call_delta: the tool call's index
---@field id string? tool_call_delta: first fragment only
---@field name string? tool_call_delta: first fragment only
---@field arguments string? tool_call_delta: a fragment of the JSON arguments
---@field prompt_tokens integer? usage
---@field completion_tokens integer? usage
---@field cached_tokens integer? usage
---@field reason string? finish: "stop", "length", "tool_calls", ...

---@class weir.LogEntry
---@field request_id string
---@field model string
---@field provider string
---@field target_model string
---@field status integer
---@field stream boolean
---@field usage weir.Usage?
---@field latency_ms integer
---@field ttft_ms integer?
---@field metadata table<string, string>

-- Decisions ------------------------------------------------------------------------------

---@class weir.Target
---@field provider string A provider name from weir.toml
---@field model string The upstream model name

---@class weir.MessageEdit
---@field role string
---@field content string

--- Changes to the request; every field is optional. Unknown fields are an error.
---@class weir.Mutations
---@field set_headers table<string, string>? Set request headers (to the provider)
---@field remove_headers string[]? Remove request headers
---@field set_model string? Replace the model
---@field set_messages weir.MessageEdit[]? Replace the messages (tool calls and images of unchanged messages are kept)
---@field set_body (string|table)? Replace the whole canonical body (JSON text or table)
---@field set_targets weir.Target[]? Route: primary first, then fallbacks
---@field set_metadata table<string, string>? Set request metadata (seen by later plugins and logs)
---@field set_response_headers table<string, string>? Headers added to the client's response

---@class weir.ReplySpec
---@field status integer
---@field headers table<string, string>?
---@field body string|table|nil

---@class weir.Reply
---@field reply weir.ReplySpec

---@alias weir.Decision weir.Mutations|weir.Reply

---@class weir.ResponseMutations
---@field set_choice_text table<integer, string>? Replace the text of choices, keyed by choice index (0-based)
---@field set_headers table<string, string>? Headers added to the client's response
---@field set_metadata table<string, string>?

---@alias weir.ResponseDecision weir.ResponseMutations|weir.Reply

---@class weir.ChunkAction
---@field hold boolean?
---@field replace weir.Event[]?
---@field abort string?

-- The weir global --------------------------------------------------------------------------

---@class weir.Kv
local Kv = {}

--- The value of `key` in this plugin's namespace, or nil. Needs `kv = true` in
--- plugin.toml `[capabilities]`.
---@param key string
---@return string?
function Kv.get(key) end

--- Stores `value` (a string or number) under `key`, expiring after `ttl_ms` if given.
---@param key string
---@param value string|number
---@param ttl_ms integer?
function Kv.set(key, value, ttl_ms) end

--- Adds `delta` (default 1) to the integer at `key` (absent = 0) and returns the new
--- value. `ttl_ms` applies only when the key is created (fixed windows).
---@param key string
---@param delta integer?
---@param ttl_ms integer?
---@return integer
function Kv.incr(key, delta, ttl_ms) end

--- Sets `key` to `value` (nil deletes) only if its current value is `expected` (nil =
--- absent). Returns whether it swapped.
---@param key string
---@param expected string?
---@param value string?
---@param ttl_ms integer?
---@return boolean
function Kv.cas(key, expected, value, ttl_ms) end

--- Deletes `key`; returns whether it existed.
---@param key string
---@return boolean
function Kv.delete(key) end

---@class weir.Json
---@field null any The JSON null value (distinct from nil)
local Json = {}

--- Encodes a Lua value as JSON text.
---@param value any
---@return string
function Json.encode(value) end

--- Decodes JSON text (JSON null becomes `weir.json.null`).
---@param text string
---@return any
function Json.decode(text) end

--- JSON text re-encoded with object keys sorted and the top-level fields in `drop` removed:
--- the same text as `Json.encode(Json.decode(text))` without those fields, computed by the
--- host without building Lua tables (a cache key, say). Errors on invalid JSON.
---@param text string
---@param drop string[]?
---@return string
function Json.canonical(text, drop) end

---@class weir.FetchRequest
---@field url string Its host must be listed in plugin.toml `capabilities.fetch`
---@field method string? Default GET
---@field headers table<string, string>?
---@field body string?
---@field timeout_ms integer? At most 5000 (the default)

---@class weir.FetchResponse
---@field status integer
---@field headers table<string, string>
---@field body string

---@class weir
weir = {}

--- The instance name (also the key-value namespace).
---@type string
weir.plugin = ""

--- Key-value state, namespaced per plugin, durable across reloads and restarts.
---@type weir.Kv
weir.kv = Kv

--- JSON helpers.
---@type weir.Json
weir.json = Json

--- Logs through the gateway (with the plugin name as a field).
---@param level "trace"|"debug"|"info"|"warn"|"error"
---@param message string
function weir.log(level, message) end

--- Adds `value` (default 1) to the counter `name` (`weir_plugin_counter_total{plugin,name}`).
---@param name string
---@param value integer?
function weir.counter(name, value) end

--- Observes `value` in the histogram `name` (`weir_plugin_histogram{plugin,name}`).
---@param name string
---@param value number
function weir.histogram(name, value) end

--- Wall-clock milliseconds since the Unix epoch.
---@return integer
function weir.now_ms() end

--- Reads the request-scoped metadata shared by the plugins of one request.
---@param key string
---@return string?
function weir.ctx_get(key) end

--- Writes the request-scoped metadata.
---@param key string
---@param value string|number
function weir.ctx_set(key, value) end

--- A cheap token estimate (about four bytes per token).
---@param text string
---@return integer
function weir.count_tokens(text) end

--- SHA-256 of a string, as 64 lower-case hex digits (cache keys, fingerprints).
---@param data string
---@return string
function weir.sha256(data) end

--- Outbound HTTP, only to hosts in plugin.toml `capabilities.fetch`. Blocks the hook (the
--- wait does not count against the deadline); redirects are not followed; errors raise.
---@param request weir.FetchRequest
---@return weir.FetchResponse
function weir.fetch(request) end

--- Continue, optionally with changes (the same as returning the table itself).
---@param mutations weir.Mutations?
---@return weir.Mutations
function weir.continue(mutations) end

--- Answer now with `status`, `body` (a table is sent as JSON) and `headers`.
---@param status integer
---@param body string|table|nil
---@param headers table<string, string>?
---@return weir.Reply
function weir.reply(status, body, headers) end

--- An error reply in the client's dialect: OpenAI `{"error":{"message","type","code"}}`
--- or Anthropic `{"type":"error","error":{"type","message"}}`. `error_type` defaults from
--- the status (400 invalid_request_error, 401 authentication_error, 403 permission_error,
--- 429 rate_limit_error, otherwise api_error).
---@param dialect "openai"|"anthropic"
---@param status integer
---@param message string
---@param error_type string?
---@return weir.Reply
function weir.error_reply(dialect, status, message, error_type) end

--- Chunk hook: forward the event unchanged (the same as returning nothing).
---@return nil
function weir.pass() end

--- Chunk hook: hold this text back; it comes back, with the next text of the choice
--- appended, on the next call (bounded by plugin.toml `limits.hold_bytes`; released at the
--- choice's finish).
---@return weir.ChunkAction
function weir.hold() end

--- Chunk hook: send these events instead (none to drop the event).
---@param events weir.Event[]
---@return weir.ChunkAction
function weir.replace(events) end

--- Chunk hook: end the stream with an error event carrying `message`.
---@param message string
---@return weir.ChunkAction
function weir.abort(message) end
