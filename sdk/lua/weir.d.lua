---@meta weir
-- Type definitions of Weir's Lua plugin API (contract weir:plugin@0.2.0), for LuaLS
-- (lua-language-server).
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
-- locals set by `init`, what the hooks of one request share in `weir.scratch_*`, and shared
-- state in `weir.kv`, `weir.limit` and `weir.ledger`.
--
-- The reference is docs/plugins.md and the contract itself, sdk/wit/weir.wit.

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
--- (pass), `weir.hold()`, `weir.replace(events)` or `weir.abort(message)`. A text delta with
--- `last = true` must not be held (answer pass or replace): holding it is a plugin failure.
---@type fun(event: weir.Event): weir.ChunkAction?
on_response_chunk = nil

--- Called after the response was sent, off the hot path, for every request the chain saw
--- (also the ones a plugin answered or refused). Its failures count in the plugin's circuit
--- breaker; its successes never close it.
---@type fun(entry: weir.LogEntry)?
on_log = nil

--- Serves `/admin/plugins/<instance>/<path>` on the admin listener (behind the admin token)
--- when plugin.toml lists hook `admin`. Runs off the request path, with the on-log deadline.
---@type fun(req: weir.AdminRequest): weir.AdminResponse
admin = nil

-- Views ----------------------------------------------------------------------------------

---@class weir.ToolCall
---@field id string
---@field name string
---@field arguments string JSON text

---@class weir.Message
---@field role "system"|"developer"|"user"|"assistant"|"tool"|string
---@field content string The text: a string content as is, the text parts of a multimodal content joined with "\n"
---@field tool_calls weir.ToolCall[]? Tool calls of an assistant message (Anthropic `tool_use` blocks included: `input` is the arguments JSON)
---@field other_parts integer? How many non-text parts (images, audio, files) the message has; absent when none. Text edits never remove them

--- The request under `on_request`: a lazy table. `request_id`, `dialect`, `endpoint`,
--- `model` and `stream` are set up front; the other fields are read from the host on first
--- access (and kept), so a plugin pays only for what it reads. Only what plugin.toml
--- declares is readable: undeclared headers read as nil, `body` is nil without capability
--- `body`. Readable only during the `on_request` call.
---@class weir.Request
---@field request_id string
---@field dialect "openai"|"anthropic" The API the client spoke (answer errors in it)
---@field endpoint "chat"|"embeddings"
---@field model string The model asked for (after earlier plugins' changes)
---@field stream boolean
---@field headers table<string, string> (lazy) Lower-case names; only those declared in plugin.toml `headers` (or all with "*"); repeated headers joined with ", "
---@field messages weir.Message[] (lazy) The conversation (embeddings: one user message per input)
---@field message_count integer (lazy) Number of messages (embeddings: inputs)
---@field max_tokens integer? (lazy) `max_tokens` / `max_completion_tokens` of the request, when set
---@field body string? (lazy) The canonical request as JSON text, with capability `body = true` (serialized once per request, whichever plugins read it)
local Request = {}

--- One declared header (lower-case name), several values joined with ", "; nil when absent
--- or not declared. Copies only that header. Both `req.header(name)` and `req:header(name)`.
---@param name string
---@return string?
function Request.header(name) end

--- One message by 1-based index (like `messages`), or nil. Copies only that message. Both
--- `req.message(i)` and `req:message(i)`.
---@param index integer
---@return weir.Message?
function Request.message(index) end

---@class weir.Choice
---@field index integer
---@field text string
---@field tool_calls weir.ToolCall[]?
---@field finish_reason string?

---@class weir.Usage
---@field prompt_tokens integer
---@field completion_tokens integer
---@field cached_tokens integer Prompt tokens served from the provider's cache
---@field cache_write_tokens integer Prompt tokens written to the provider's cache (Anthropic cache creation)

---@class weir.Response
---@field request_id string
---@field model string
---@field status integer
---@field choices weir.Choice[]
---@field usage weir.Usage?

---@class weir.Event
---@field type "text_delta"|"tool_call_delta"|"usage"|"finish"
---@field choice integer? text_delta, tool_call_delta, finish
---@field text string? text_delta (with any text this plugin held before prepended)
---@field last boolean? text_delta: true when the host will not accept `hold` (the choice finished, the stream ended or the hold buffer is full): answer pass or replace
---@field index integer? tool_call_delta: the tool call's index
---@field id string? tool_call_delta: first fragment only
---@field name string? tool_call_delta: first fragment only
---@field arguments string? tool_call_delta: a fragment of the JSON arguments
---@field prompt_tokens integer? usage
---@field completion_tokens integer? usage
---@field cached_tokens integer? usage
---@field cache_write_tokens integer? usage
---@field reason string? finish: "stop", "length", "tool_calls", ...

--- One upstream attempt (retries and fallbacks each make one).
---@class weir.Attempt
---@field provider string Provider name from weir.toml
---@field target_model string The upstream model
---@field status integer HTTP status from the target, 0 when none came (connect error, timeout)
---@field latency_ms integer Time from sending to the first byte of the answer (or the failure)
---@field error string? "connect", "timeout", "status", "stream"... when the attempt failed

--- One request plugin's decision, as the request log records it.
---@class weir.PluginDecision
---@field plugin string Instance name
---@field decision string "continue", "reply_<status>", "failure_<kind>", "skipped", "shadow_..."

---@class weir.LogEntry
---@field request_id string
---@field model string The model the client asked for
---@field provider string The provider that served ("" if none)
---@field target_model string The upstream model ("" if none)
---@field status integer HTTP status sent to the client
---@field stream boolean
---@field usage weir.Usage?
---@field latency_ms integer
---@field ttft_ms integer? Time to first token (streams)
---@field metadata table<string, string> The metadata bag at the end of the request
---@field attempts weir.Attempt[] Every upstream attempt, in order (empty when no provider was called)
---@field decisions weir.PluginDecision[] What each on_request plugin decided, in chain order
---@field cost_usd number? The cost from the gateway's `[prices]`, when the model has a price and usage is known

---@class weir.AdminRequest
---@field method string "GET", "POST", "DELETE"...
---@field path string Below `/admin/plugins/<instance>`, starting with "/" ("/keys/abc")
---@field query string The query string without "?" (may be empty; see `weir.query`)
---@field body string The request body (usually JSON)

---@class weir.AdminResponse
---@field status integer? Default 200
---@field body string|table|nil Sent as application/json (a table is encoded)

-- Decisions ------------------------------------------------------------------------------

---@class weir.Target
---@field provider string A provider name from weir.toml
---@field model string The upstream model name

---@class weir.MessageEdit
---@field role string
---@field content string

--- New arguments for one tool call (0-based indexes). In a request: of message `owner`'s
--- call `index`; in a response: of choice `owner`'s call `index`. `message` and `choice` are
--- accepted for `owner`.
---@class weir.ToolCallEdit
---@field owner integer
---@field index integer
---@field arguments string|table JSON text (a table is encoded)

--- Changes to the request; every field is optional. Unknown fields are an error.
---@class weir.Mutations
---@field set_headers table<string, string>? Set request headers (to the provider)
---@field remove_headers string[]? Remove request headers
---@field set_model string? Replace the model
---@field set_messages weir.MessageEdit[]? Replace the messages (role + text; tool calls and non-text parts of the message at the same index are kept)
---@field set_message_text table<integer, string>? Replace the text of single messages, keyed by 0-based message index; images, audio and files stay
---@field set_tool_call_arguments weir.ToolCallEdit[]? Replace the arguments of tool calls in the conversation
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
---@field set_tool_call_arguments weir.ToolCallEdit[]? Replace the arguments of tool calls the model made (`owner` = choice index)
---@field set_headers table<string, string>? Headers added to the client's response
---@field set_metadata table<string, string>?

---@alias weir.ResponseDecision weir.ResponseMutations|weir.Reply

---@class weir.ChunkAction
---@field hold boolean?
---@field replace weir.Event[]?
---@field abort string?

-- Host primitives -------------------------------------------------------------------------

---@class weir.KvEntry
---@field key string
---@field value string

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
--- value. `ttl_ms` applies only when the key is created.
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

--- Up to `limit` (default 1000) live keys starting with `prefix`, in key order, with their
--- values. Meant for admin endpoints and `init`, not for every request.
---@param prefix string
---@param limit integer?
---@return weir.KvEntry[]
function Kv.scan(prefix, limit) end

--- The limiter's answer.
---@class weir.LimitResult
---@field allowed boolean Whether the amount was admitted (and reserved)
---@field limit integer The limit per window
---@field remaining integer Units still available now, after this reservation
---@field retry_after_ms integer When refused: ms until the amount would be admitted
---@field reset_ms integer ms until the limiter is back to its full limit

--- A keyed rate limiter kept by the host (GCRA: `limit` units per `window_ms`, refilled
--- smoothly, bursts up to `limit`), in the plugin's namespace: one atomic state operation per
--- call, also across gateway instances on a shared state backend. Needs `kv = true`.
---@class weir.Limit
local Limit = {}

--- Admits and reserves `amount` units (default 1), or refuses without reserving. An amount
--- above `limit` is always refused.
---@param key string
---@param limit integer
---@param window_ms integer
---@param amount integer?
---@return weir.LimitResult
function Limit.reserve(key, limit, window_ms, amount) end

--- Settles an admitted reservation: `reserved` units become `used` (unused units are given
--- back, units beyond the reservation are charged). `used = 0` releases it. Pass the same
--- key, limit and window as the reservation.
---@param key string
---@param limit integer
---@param window_ms integer
---@param reserved integer
---@param used integer
function Limit.settle(key, limit, window_ms, reserved, used) end

--- An account of the spend ledger, in USD.
---@class weir.LedgerBalance
---@field spent number Settled spend
---@field reserved number Reserved by requests in flight

---@class weir.LedgerResult: weir.LedgerBalance
---@field allowed boolean Whether the reservation was made (spent + reserved + amount <= limit)

--- A spend ledger kept by the host, in USD (micro-dollar precision), accounts in the plugin's
--- namespace: reserve the worst case, settle the real cost, release on failure. One atomic
--- state operation per call. Needs `kv = true`.
---@class weir.Ledger
local Ledger = {}

--- Reserves `amount_usd` on `account` if spent + reserved + amount stays within `limit_usd`
--- (a refusal changes nothing). `ttl_ms` applies when the account is created (a budget
--- period: name the account after it).
---@param account string
---@param limit_usd number
---@param amount_usd number
---@param ttl_ms integer?
---@return weir.LedgerResult
function Ledger.reserve(account, limit_usd, amount_usd, ttl_ms) end

--- Settles a reservation: `reserved_usd` is released and `cost_usd` added to spent (in full,
--- even beyond the reservation). `reserved_usd = 0` just records spend.
---@param account string
---@param reserved_usd number
---@param cost_usd number
---@param ttl_ms integer?
---@return weir.LedgerBalance
function Ledger.settle(account, reserved_usd, cost_usd, ttl_ms) end

--- Releases a reservation without spending (the request failed).
---@param account string
---@param reserved_usd number
---@return weir.LedgerBalance
function Ledger.release(account, reserved_usd) end

--- The balance of an account (zeros when absent).
---@param account string
---@return weir.LedgerBalance
function Ledger.balance(account) end

--- What the gateway measured for a target.
---@class weir.TargetStats
---@field latency_ewma_ms number EWMA of the time to first byte of successful attempts
---@field error_rate number EWMA of the failure rate of attempts, 0..1
---@field in_flight integer Attempts in flight to the target now
---@field attempts integer Attempts seen since the gateway started

--- A model's price from the gateway's `[prices]`, USD per 1M tokens.
---@class weir.Price
---@field input number Prompt tokens
---@field output number Completion tokens
---@field cached_input number Prompt tokens served from the provider's cache
---@field cache_write number Prompt tokens written to the provider's cache

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

---@class weir.ErrorReplyOptions
---@field code string? A string code for OpenAI ("rate_limit_exceeded"); the body then also has `"param": null`. Default: the status
---@field anthropic_type string? The Anthropic error type when it differs from `error_type` ("billing_error")
---@field headers table<string, string>? Headers of the reply

---@class weir
weir = {}

--- The instance name (also the state namespace).
---@type string
weir.plugin = ""

--- Key-value state, namespaced per plugin, durable across reloads and restarts.
---@type weir.Kv
weir.kv = Kv

--- The host's rate limiter.
---@type weir.Limit
weir.limit = Limit

--- The host's spend ledger.
---@type weir.Ledger
weir.ledger = Ledger

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

--- Reads the request-scoped metadata shared by the plugins of one request (it is copied into
--- log entries and the request log: no secrets or prompt text).
---@param key string
---@return string?
function weir.ctx_get(key) end

--- Writes the request-scoped metadata.
---@param key string
---@param value string|number
function weir.ctx_set(key, value) end

--- Reads this plugin's request scratch: private to the plugin, never logged, dropped with
--- the request, shared by all its hooks of one request (on_request, on_response,
--- on_response_chunk, on_log). The place for a pseudonym map or a streamed answer.
---@param key string
---@return string?
function weir.scratch_get(key) end

--- Writes (nil deletes) a scratch value.
---@param key string
---@param value string|number|nil
function weir.scratch_set(key, value) end

--- What the upstream layer measured for a target (provider, upstream model), kept in memory
--- for every attempt; nil when it was never tried.
---@param provider string
---@param model string
---@return weir.TargetStats?
function weir.target_stats(provider, model) end

--- The price of a model (client-facing or upstream name) from the gateway's `[prices]`, or
--- nil.
---@param model string
---@return weir.Price?
function weir.price(model) end

--- A cheap token estimate (about four bytes per token).
---@param text string
---@return integer
function weir.count_tokens(text) end

--- SHA-256 of a string, as 64 lower-case hex digits (cache keys, fingerprints).
---@param data string
---@return string
function weir.sha256(data) end

--- `len` (at most 4096) bytes from the operating system's secure random source, as a binary
--- string (secrets, ids; hex them with `string.format("%02x", ...)` or hash them).
---@param len integer
---@return string
function weir.random_bytes(len) end

--- Outbound HTTP, only to hosts in plugin.toml `capabilities.fetch`. Blocks the hook (the
--- wait does not count against the deadline); redirects are not followed; errors raise.
---@param request weir.FetchRequest
---@return weir.FetchResponse
function weir.fetch(request) end

-- Decision helpers (Luau, in the prelude) ---------------------------------------------------

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
---@param options weir.ErrorReplyOptions?
---@return weir.Reply
function weir.error_reply(dialect, status, message, error_type, options) end

--- Chunk hook: forward the event unchanged (the same as returning nothing).
---@return nil
function weir.pass() end

--- Chunk hook: hold this text back; it comes back, with the next text of the choice
--- appended, on the next call (bounded by plugin.toml `limits.hold_bytes`). At the choice's
--- finish, at the end of the stream and when the buffer is full it comes back once more with
--- `last = true`, when holding is no longer allowed.
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

-- Shared helpers (Luau, in the prelude) ------------------------------------------------------

--- The integer of the first `"<field>": <digits>` in a JSON text the host wrote (a top-level
--- field such as `"seq"`; inside JSON strings quotes are escaped), or nil. Plain searches and
--- an anchored match, not an unanchored pattern (Luau runs the deadline check at every byte a
--- pattern tries).
---@param text string
---@param field string The field name, without quotes
---@return integer?
function weir.json_int(text, field) end

--- A number as whole decimal text, rounded down ("3", never "3.0").
---@param n number
---@return string
function weir.int(n) end

--- A metadata entry as a number, or nil when absent or not a number.
---@param key string
---@return number?
function weir.ctx_number(key) end

--- The host's token estimate of a conversation: each message's text plus `per_message`
--- tokens (default 4), rounded up. Pass `req.messages`.
---@param messages weir.Message[]
---@param per_message number?
---@return integer
function weir.prompt_tokens(messages, per_message) end

--- Percent-decoding of a query-string component (`+` is a space).
---@param text string
---@return string
function weir.url_decode(text) end

--- A query string (`a=1&b=x%20y`, without "?", e.g. an admin request's `query`) as a table of
--- decoded names and values (the last of repeated names wins).
---@param query string?
---@return table<string, string>
function weir.query(query) end
