-- keyword-guard (Lua side of the conformance suite; the Rust side is ../rust/src/lib.rs).
-- Keep the two in step: the suite asserts they decide alike, byte for byte.

local header = "x-team"
local keywords = {}
local max_tokens = nil
local per_window = nil
local window_ms = 60000

function init(config)
	header = config.header or header
	keywords = config.keywords
	max_tokens = config.max_tokens
	per_window = config.requests_per_window
	window_ms = config.window_ms or window_ms
end

local function contains(haystack, needle)
	return string.find(haystack, needle, 1, true) ~= nil
end

function on_request(req)
	local team = req.header(header)
	if team == nil then
		return weir.error_reply(req.dialect, 401, "missing " .. header .. " header")
	end
	-- Every request with a team is counted by on_log, through this plugin's scratch.
	weir.scratch_set("team", team)
	if weir.kv.get("team:" .. team) == "blocked" then
		return weir.error_reply(req.dialect, 403, "team " .. team .. " is blocked")
	end
	if max_tokens ~= nil then
		local asked = req.max_tokens
		if asked ~= nil and asked > max_tokens then
			return weir.error_reply(req.dialect, 400, "max_tokens over " .. max_tokens)
		end
	end
	local users = 0
	for _, m in ipairs(req.messages) do
		if m.role == "user" then
			users += 1
			local text = string.lower(m.content)
			for _, k in ipairs(keywords) do
				if contains(text, string.lower(k)) then
					return weir.error_reply(req.dialect, 400, "blocked keyword: " .. k)
				end
			end
		end
	end
	local response_headers = { ["x-weir-team"] = team }
	if per_window ~= nil then
		local r = weir.limit.reserve("team:" .. team, per_window, window_ms, 1)
		if not r.allowed then
			local reply = weir.error_reply(req.dialect, 429, "team " .. team .. " is over its request limit")
			reply.reply.headers["retry-after-ms"] = tostring(r.retry_after_ms)
			return reply
		end
		response_headers["x-weir-remaining"] = tostring(r.remaining)
	end
	return {
		set_metadata = { team = team, user_messages = tostring(users), message_count = tostring(req.message_count) },
		set_headers = { ["x-weir-team"] = team },
		remove_headers = { header },
		set_response_headers = response_headers,
	}
end

--- Replaces every plain occurrence of `word` in `text` with asterisks; also returns how
--- many it replaced.
local function mask(text, word)
	local out, from, n = {}, 1, 0
	while true do
		local s, e = string.find(text, word, from, true)
		if s == nil then
			break
		end
		table.insert(out, string.sub(text, from, s - 1))
		table.insert(out, string.rep("*", #word))
		from = e + 1
		n += 1
	end
	table.insert(out, string.sub(text, from))
	return table.concat(out), n
end

function on_response_chunk(ev)
	if ev.type ~= "text_delta" then
		return nil
	end
	local text, masked = ev.text, 0
	for _, k in ipairs(keywords) do
		local n
		text, n = mask(text, k)
		masked += n
	end
	-- A held tail comes back with `last` set (at the end of the stream): it can no longer
	-- grow into a keyword, so it goes out as it is.
	if not ev.last then
		for _, k in ipairs(keywords) do
			for n = 1, #k - 1 do
				if #text >= n and string.sub(text, -n) == string.sub(k, 1, n) then
					return weir.hold()
				end
			end
		end
	end
	-- Counted once the text goes out (held text comes back, unmasked, with the next delta).
	if masked > 0 then
		weir.scratch_set("masked", tostring((tonumber(weir.scratch_get("masked")) or 0) + masked))
	end
	if text ~= ev.text then
		return weir.replace({ { type = "text_delta", choice = ev.choice, text = text } })
	end
	return nil
end

function on_log(entry)
	local team = weir.scratch_get("team")
	if team == nil then
		return
	end
	if entry.status < 400 then
		weir.kv.incr("served:" .. team, 1)
		weir.kv.set("seen:" .. team, tostring(weir.now_ms()))
	else
		weir.kv.incr("refused:" .. team, 1)
	end
	if #entry.attempts > 0 then
		weir.kv.incr("attempts:" .. team, #entry.attempts)
	end
	local masked = tonumber(weir.scratch_get("masked"))
	if masked ~= nil then
		weir.kv.incr("masked:" .. team, masked)
	end
end

local function count(key)
	return tonumber(weir.kv.get(key)) or 0
end

--- GET /teams/<team>: what on_log counted; POST and DELETE /teams/<team>/block.
function admin(req)
	local team, action = string.match(req.path, "^/teams/([^/]+)(.*)$")
	if team == nil then
		return { status = 404, body = { error = "not found" } }
	end
	if action == "" and req.method == "GET" then
		local seen = weir.kv.get("seen:" .. team)
		return {
			status = 200,
			body = {
				team = team,
				served = count("served:" .. team),
				refused = count("refused:" .. team),
				masked = count("masked:" .. team),
				attempts = count("attempts:" .. team),
				blocked = weir.kv.get("team:" .. team) == "blocked",
				seen_ms = if seen then tonumber(seen) else weir.json.null,
			},
		}
	elseif action == "/block" and req.method == "POST" then
		weir.kv.set("team:" .. team, "blocked")
		return { status = 200, body = { team = team, blocked = true } }
	elseif action == "/block" and req.method == "DELETE" then
		weir.kv.delete("team:" .. team)
		return { status = 200, body = { team = team, blocked = false } }
	end
	return { status = 405, body = { error = "method not allowed" } }
end
