-- cache: an exact-match response cache, as a Lua plugin. Full reference: README.md.
--
-- The key is a hash of the canonical request body (model, messages, tools, sampling
-- parameters; without `stream`, `stream_options` and `user`), prefixed by the metadata
-- entries named in `partition_by` (e.g. the tenant). A hit is answered in on_request with a
-- reply in the caller's dialect: JSON, or a replayed SSE stream when the client streams.
-- A miss is stored after a complete, successful answer: in on_response (JSON) or, for a
-- stream, once in on_log from the text and tool-call deltas on_response_chunk kept.
--
-- State, in the plugin's key-value namespace:
--   e/<key>          the entry (JSON: canonical request, choices, usage, time), with a TTL
--   seq, slot/<i>    the eviction ring: `max_entries` slots in insertion order
-- What one request's hooks share (the canonical request of a miss, the streamed answer) is
-- in the plugin's request scratch (`weir.scratch_*`): private, never logged, dropped with the
-- request, no state write per streamed chunk. Entries hold the full canonical request, so a
-- hash collision is a miss, never a wrong answer. Nothing here logs prompt or response
-- text; the metadata bag only gets the key.

local M = {}

local cfg = {
	ttl_ms = 3600 * 1000,
	max_entries = 10000,
	max_entry_bytes = 256 * 1024,
	ignore_fields = { "stream", "stream_options", "user" },
	partition_by = {} :: { string },
	replay_chunk_bytes = 256,
}

local EMPTY_ARRAY = nil

function M.init(config: any)
	config = config or {}
	for k, v in config do
		if k == "ttl_secs" then
			assert(type(v) == "number" and v >= 1, "ttl_secs must be a number >= 1")
			cfg.ttl_ms = v * 1000
		elseif k == "max_entries" then
			assert(type(v) == "number" and v >= 1, "max_entries must be a number >= 1")
			cfg.max_entries = math.floor(v)
		elseif k == "max_entry_bytes" then
			assert(type(v) == "number" and v >= 1024, "max_entry_bytes must be a number >= 1024")
			cfg.max_entry_bytes = v
		elseif k == "ignore_fields" then
			assert(type(v) == "table", "ignore_fields must be a list of strings")
			cfg.ignore_fields = v
		elseif k == "partition_by" then
			assert(type(v) == "table", "partition_by must be a list of metadata keys")
			cfg.partition_by = v
		elseif k == "replay_chunk_bytes" then
			assert(type(v) == "number" and v >= 1, "replay_chunk_bytes must be a number >= 1")
			cfg.replay_chunk_bytes = math.floor(v)
		else
			error("unknown config key '" .. tostring(k) .. "'")
		end
	end
	EMPTY_ARRAY = weir.json.decode("[]")
end

-- Requests --------------------------------------------------------------------------------

local function header(req, name: string): string
	return string.lower(req.header(name) or "")
end

local function opted_out(req): boolean
	local cc = header(req, "cache-control")
	return string.find(cc, "no-store", 1, true) ~= nil or header(req, "x-weir-cache") == "skip"
end

-- The canonical request: the body without the ignored fields, encoded with sorted keys
-- (by the host: the same text as `weir.json.encode` of the decoded body, without building
-- the Lua tables), prefixed by the partition values.
local function canonical(body: string): string
	local json = weir.json.canonical(body, cfg.ignore_fields)
	if #cfg.partition_by == 0 then
		return json
	end
	local parts = {}
	for _, name in cfg.partition_by do
		table.insert(parts, name .. "=" .. (weir.ctx_get(name) or ""))
	end
	table.insert(parts, json)
	return table.concat(parts, "\n")
end

-- Replies ---------------------------------------------------------------------------------

local ANTHROPIC_STOP = {
	stop = "end_turn",
	length = "max_tokens",
	tool_calls = "tool_use",
	content_filter = "refusal",
}

local function now_s(): number
	return math.floor(weir.now_ms() / 1000)
end

local function openai_tool_calls(calls)
	local out = {}
	for i, c in calls do
		out[i] = { id = c.id, type = "function", ["function"] = { name = c.name, arguments = c.arguments } }
	end
	return out
end

local function openai_json(entry, id: string)
	local choices = {}
	for i, c in entry.choices do
		local message = { role = "assistant", content = c.text }
		if c.tool_calls and #c.tool_calls > 0 then
			message.tool_calls = openai_tool_calls(c.tool_calls)
			if c.text == "" then
				message.content = weir.json.null
			end
		end
		choices[i] = { index = c.index, message = message, finish_reason = c.finish_reason }
	end
	local body = {
		id = id,
		object = "chat.completion",
		created = now_s(),
		model = entry.model,
		choices = choices,
	}
	if entry.usage then
		body.usage = {
			prompt_tokens = entry.usage.prompt_tokens,
			completion_tokens = entry.usage.completion_tokens,
			total_tokens = entry.usage.prompt_tokens + entry.usage.completion_tokens,
		}
	end
	return weir.json.encode(body)
end

local function pieces(text: string): { string }
	local out = {}
	local step = cfg.replay_chunk_bytes
	local i = 1
	while i <= #text do
		local j = math.min(#text, i + step - 1)
		-- Do not cut a UTF-8 sequence: move back while the next byte is a continuation.
		while j < #text and j > i and bit32.band(string.byte(text, j + 1), 0xC0) == 0x80 do
			j -= 1
		end
		table.insert(out, string.sub(text, i, j))
		i = j + 1
	end
	return out
end

local function openai_sse(entry, id: string, include_usage: boolean): string
	local created = now_s()
	local out = {}
	local function chunk(choices, usage)
		local c = {
			id = id,
			object = "chat.completion.chunk",
			created = created,
			model = entry.model,
			choices = choices,
		}
		if usage then
			c.usage = usage
		end
		table.insert(out, "data: " .. weir.json.encode(c) .. "\n\n")
	end
	for _, c in entry.choices do
		chunk({ { index = c.index, delta = { role = "assistant", content = "" }, finish_reason = weir.json.null } })
		for _, p in pieces(c.text) do
			chunk({ { index = c.index, delta = { content = p }, finish_reason = weir.json.null } })
		end
		if c.tool_calls and #c.tool_calls > 0 then
			local calls = openai_tool_calls(c.tool_calls)
			for i, call in calls do
				call.index = i - 1
			end
			chunk({ { index = c.index, delta = { tool_calls = calls }, finish_reason = weir.json.null } })
		end
		chunk({ { index = c.index, delta = {}, finish_reason = c.finish_reason } })
	end
	if include_usage and entry.usage then
		chunk(EMPTY_ARRAY, {
			prompt_tokens = entry.usage.prompt_tokens,
			completion_tokens = entry.usage.completion_tokens,
			total_tokens = entry.usage.prompt_tokens + entry.usage.completion_tokens,
		})
	end
	table.insert(out, "data: [DONE]\n\n")
	return table.concat(out)
end

local function anthropic_blocks(c)
	local blocks = {}
	if c.text ~= "" then
		table.insert(blocks, { type = "text", text = c.text })
	end
	for _, call in c.tool_calls or {} do
		local ok, input = pcall(weir.json.decode, call.arguments)
		table.insert(blocks, { type = "tool_use", id = call.id, name = call.name, input = ok and input or {} })
	end
	return blocks
end

local function anthropic_usage(entry)
	local u = entry.usage or { prompt_tokens = 0, completion_tokens = 0 }
	return u.prompt_tokens, u.completion_tokens
end

local function anthropic_json(entry, id: string): string
	local c = entry.choices[1]
	local input, output = anthropic_usage(entry)
	return weir.json.encode({
		id = id,
		type = "message",
		role = "assistant",
		model = entry.model,
		content = anthropic_blocks(c),
		stop_reason = ANTHROPIC_STOP[c.finish_reason] or "end_turn",
		stop_sequence = weir.json.null,
		usage = { input_tokens = input, output_tokens = output },
	})
end

local function anthropic_sse(entry, id: string): string
	local c = entry.choices[1]
	local input, output = anthropic_usage(entry)
	local out = {}
	local function event(name: string, data)
		table.insert(out, "event: " .. name .. "\ndata: " .. weir.json.encode(data) .. "\n\n")
	end
	event("message_start", {
		type = "message_start",
		message = {
			id = id,
			type = "message",
			role = "assistant",
			model = entry.model,
			content = EMPTY_ARRAY,
			stop_reason = weir.json.null,
			stop_sequence = weir.json.null,
			usage = { input_tokens = input, output_tokens = 0 },
		},
	})
	for index, block in anthropic_blocks(c) do
		local i = index - 1
		if block.type == "text" then
			event("content_block_start", { type = "content_block_start", index = i, content_block = { type = "text", text = "" } })
			for _, p in pieces(block.text) do
				event("content_block_delta", { type = "content_block_delta", index = i, delta = { type = "text_delta", text = p } })
			end
		else
			event("content_block_start", {
				type = "content_block_start",
				index = i,
				content_block = { type = "tool_use", id = block.id, name = block.name, input = {} },
			})
			event("content_block_delta", {
				type = "content_block_delta",
				index = i,
				delta = { type = "input_json_delta", partial_json = weir.json.encode(block.input) },
			})
		end
		event("content_block_stop", { type = "content_block_stop", index = i })
	end
	event("message_delta", {
		type = "message_delta",
		delta = { stop_reason = ANTHROPIC_STOP[c.finish_reason] or "end_turn", stop_sequence = weir.json.null },
		usage = { output_tokens = output },
	})
	event("message_stop", { type = "message_stop" })
	return table.concat(out)
end

local function hit_reply(req, entry, include_usage: boolean)
	local id = "cache-" .. req.request_id
	local headers = { ["x-weir-cache"] = "hit" }
	headers["age"] = tostring(math.max(0, math.floor((weir.now_ms() - (entry.at or 0)) / 1000)))
	local body
	if req.stream then
		headers["content-type"] = "text/event-stream"
		headers["cache-control"] = "no-cache"
		if req.dialect == "anthropic" then
			body = anthropic_sse(entry, "msg_" .. id)
		else
			body = openai_sse(entry, "chatcmpl-" .. id, include_usage)
		end
	else
		headers["content-type"] = "application/json"
		if req.dialect == "anthropic" then
			body = anthropic_json(entry, "msg_" .. id)
		else
			body = openai_json(entry, "chatcmpl-" .. id)
		end
	end
	return { reply = { status = 200, headers = headers, body = body } }
end

-- Storage ---------------------------------------------------------------------------------

-- Writes an entry and claims the next slot of the eviction ring, evicting the entry that
-- held it (unless that entry was written again since: its `seq` moved on).
local function store(key: string, entry)
	local seq = weir.kv.incr("seq", 1)
	entry.seq = seq
	local data = weir.json.encode(entry)
	if #data > cfg.max_entry_bytes then
		weir.counter("skipped_too_large", 1)
		return
	end
	local slot = "slot/" .. tostring(seq % cfg.max_entries)
	local old = weir.kv.get(slot)
	if old then
		-- `<key>@<seq>`; keys are hex. Plain searches and anchored matches throughout: an
		-- unanchored pattern runs the VM interrupt at every byte it tries (see weir.json_int).
		local at = string.find(old, "@", 1, true)
		local old_key = at and string.sub(old, 1, at - 1)
		local old_seq = at and tonumber(string.match(old, "^(%d+)$", at + 1))
		if old_key and old_seq then
			local current = weir.kv.get("e/" .. old_key)
			-- The entry's own `seq` (a top-level key of its JSON; inside JSON strings quotes
			-- are escaped, so `"seq":` cannot be text) without decoding the entry.
			if current and weir.json_int(current, "seq") == old_seq then
				weir.kv.delete("e/" .. old_key)
				weir.counter("evictions", 1)
			end
		end
	end
	weir.kv.set(slot, key .. "@" .. tostring(seq))
	weir.kv.set("e/" .. key, data, cfg.ttl_ms)
	weir.counter("stores", 1)
end

-- Hooks -----------------------------------------------------------------------------------

function M.on_request(req)
	if req.endpoint ~= "chat" or req.body == nil then
		return nil
	end
	if opted_out(req) then
		weir.counter("bypass", 1)
		return { set_response_headers = { ["x-weir-cache"] = "skip" } }
	end
	local body = req.body
	local canon = canonical(body)
	local key = weir.sha256(canon)
	local raw = weir.kv.get("e/" .. key)
	if raw then
		local ok, entry = pcall(weir.json.decode, raw)
		if ok and entry.k == canon then
			weir.counter("hits", 1)
			local include_usage = false
			if req.stream then
				local decoded = weir.json.decode(body)
				include_usage = type(decoded.stream_options) == "table" and decoded.stream_options.include_usage == true
			end
			return hit_reply(req, entry, include_usage)
		end
	end
	weir.counter("misses", 1)
	-- The canonical request and its key, for the hook that stores the answer.
	weir.scratch_set("canon", canon)
	weir.scratch_set("key", key)
	weir.scratch_set("state", "store")
	return {
		set_metadata = { ["cache.key"] = key },
		set_response_headers = { ["x-weir-cache"] = "miss" },
	}
end

-- A complete, successful JSON answer: store it.
function M.on_response(resp)
	local canon = weir.scratch_get("canon")
	if not canon or resp.status ~= 200 then
		return nil
	end
	local choices = {}
	for i, c in resp.choices do
		if c.finish_reason == nil then
			return nil
		end
		choices[i] = { index = c.index, text = c.text, tool_calls = c.tool_calls or EMPTY_ARRAY, finish_reason = c.finish_reason }
	end
	if #choices == 0 then
		return nil
	end
	weir.scratch_set("canon", nil)
	store(weir.scratch_get("key") :: string, { k = canon, model = resp.model, choices = choices, usage = resp.usage, at = weir.now_ms() })
	return nil
end

-- Streams: keep choice 0's text deltas and tool-call fragments in the request scratch, one
-- entry each (appending to one value would copy the answer at every delta), and its finish
-- reason; on_log assembles and stores. Scratch keys:
--   t<n>, tn                   text deltas, their count
--   c<i>id, c<i>name           tool call i's id and function name (first fragment)
--   c<i>a<k>, c<i>n            its argument fragments, their count
--   cn                         tool calls seen (highest index + 1)
--   finish                     finish reason
--   state                      "store" while the answer may be stored, then "skip"
local function count(name: string): number
	local n = (tonumber(weir.scratch_get(name)) or 0) + 1
	weir.scratch_set(name, tostring(n))
	return n
end

function M.on_response_chunk(event)
	-- One small read per event (not the canonical request).
	if weir.scratch_get("state") ~= "store" then
		return nil
	end
	if event.choice ~= nil and event.choice ~= 0 then
		-- Several choices (n > 1) are not stored.
		weir.scratch_set("state", "skip")
		return nil
	end
	if event.type == "text_delta" then
		if event.text ~= "" then
			weir.scratch_set("t" .. count("tn"), event.text)
		end
	elseif event.type == "tool_call_delta" then
		local c = "c" .. tostring(event.index)
		if event.id then
			weir.scratch_set(c .. "id", event.id)
		end
		if event.name then
			weir.scratch_set(c .. "name", event.name)
		end
		if event.arguments ~= "" then
			weir.scratch_set(c .. "a" .. count(c .. "n"), event.arguments)
		end
		if event.index + 1 > (tonumber(weir.scratch_get("cn")) or 0) then
			weir.scratch_set("cn", tostring(event.index + 1))
		end
	elseif event.type == "finish" then
		weir.scratch_set("finish", event.reason)
	end
	return nil
end

-- The parts `<prefix>1..<prefix><n>` of the scratch, joined.
local function joined(prefix: string, n: number): string
	local parts = table.create(n)
	for i = 1, n do
		parts[i] = weir.scratch_get(prefix .. i) or ""
	end
	return table.concat(parts)
end

function M.on_log(entry)
	if not entry.stream or entry.status ~= 200 then
		return
	end
	local finish = weir.scratch_get("finish")
	if weir.scratch_get("state") ~= "store" or not finish or finish == "" then
		return
	end
	local canon = weir.scratch_get("canon") :: string
	local calls = {}
	for i = 0, (tonumber(weir.scratch_get("cn")) or 0) - 1 do
		local c = "c" .. i
		local id, name = weir.scratch_get(c .. "id"), weir.scratch_get(c .. "name")
		if id == nil or name == nil then
			-- A tool call without its id or name cannot be replayed.
			return
		end
		table.insert(calls, { id = id, name = name, arguments = joined(c .. "a", tonumber(weir.scratch_get(c .. "n")) or 0) })
	end
	store(weir.scratch_get("key") :: string, {
		k = canon,
		model = entry.target_model ~= "" and entry.target_model or entry.model,
		choices = {
			{
				index = 0,
				text = joined("t", tonumber(weir.scratch_get("tn")) or 0),
				tool_calls = if #calls > 0 then calls else EMPTY_ARRAY,
				finish_reason = finish,
			},
		},
		usage = entry.usage,
		at = weir.now_ms(),
	})
end

return M
