-- prompt-guard: replies 400, in the caller's dialect, when a message contains one of the
-- configured jailbreak phrases. Matching ignores case and runs of whitespace, so
-- "IGNORE   previous\ninstructions" matches "ignore previous instructions".
--
-- Optionally (`output_phrases`) it also keeps phrases out of the answers: a JSON answer that
-- contains one is replaced, a stream that contains one is stopped. A phrase can be split
-- across stream deltas, so when a delta ends with the start of a phrase the plugin holds it
-- (the host hands it back with the next delta) until the phrase is complete or ruled out. On
-- the last call for a choice (`delta.last`) the host cannot hold any more: the text is
-- checked once more and passed.
--
-- Test: weir plugin test examples/prompt-guard

local phrases = {}
local roles = {}
local message = "request blocked by prompt-guard"
local output_phrases = {}
local output_message = "response blocked by prompt-guard"

--- Lower-case, whitespace runs collapsed to one space.
local function collapse(text)
	return (string.gsub(string.lower(text), "%s+", " "))
end

--- Lower-case, whitespace runs collapsed to one space, trimmed.
local function normalize(text)
	text = collapse(text)
	text = string.gsub(text, "^ ", "")
	return (string.gsub(text, " $", ""))
end

---@param config { phrases: string[], roles: string[]?, message: string?, output_phrases: string[]?, output_message: string? }
function init(config)
	for i, phrase in ipairs(config.phrases) do
		phrases[i] = normalize(phrase)
	end
	for _, role in ipairs(config.roles or { "user" }) do
		roles[role] = true
	end
	message = config.message or message
	for i, phrase in ipairs(config.output_phrases or {}) do
		output_phrases[i] = normalize(phrase)
	end
	output_message = config.output_message or output_message
end

--- The first phrase of `list` in `text` (already normalized), or nil. Plain find: phrases are
--- text, not Lua patterns.
local function find_phrase(text, list)
	for _, phrase in ipairs(list) do
		if string.find(text, phrase, 1, true) then
			return phrase
		end
	end
	return nil
end

---@param req weir.Request
---@return weir.Decision?
function on_request(req)
	-- One message at a time (`req:message(i)` copies only that one), so a blocked request
	-- stops copying at the message that matched.
	for i = 1, req.message_count do
		local m = req:message(i)
		if m and roles[m.role] then
			local phrase = find_phrase(normalize(m.content), phrases)
			if phrase then
				weir.counter("blocked")
				weir.log("info", "blocked a request: matched '" .. phrase .. "'")
				return weir.error_reply(req.dialect, 400, message, "invalid_request_error")
			end
		end
	end
	return nil
end

---@param resp weir.Response
---@return weir.ResponseDecision?
function on_response(resp)
	if #output_phrases == 0 then
		return nil
	end
	local replaced = nil
	for _, c in ipairs(resp.choices) do
		local phrase = find_phrase(collapse(c.text), output_phrases)
		if phrase then
			weir.counter("blocked_output")
			weir.log("info", "replaced an answer: matched '" .. phrase .. "'")
			replaced = replaced or {}
			replaced[c.index] = output_message
		end
	end
	if replaced then
		return { set_choice_text = replaced }
	end
	return nil
end

--- Whether `text` (normalized) ends with the beginning of some phrase: the rest of it may come
--- in the next delta.
local function ends_with_a_start(text)
	for _, phrase in ipairs(output_phrases) do
		for k = math.min(#phrase - 1, #text), 1, -1 do
			if string.sub(text, -k) == string.sub(phrase, 1, k) then
				return true
			end
		end
	end
	return false
end

---@param event weir.Event
---@return weir.ChunkAction?
function on_response_chunk(event)
	if #output_phrases == 0 or event.type ~= "text_delta" then
		return weir.pass()
	end
	-- `event.text` includes what this plugin held before.
	local text = collapse(event.text)
	local phrase = find_phrase(text, output_phrases)
	if phrase then
		weir.counter("blocked_output")
		weir.log("info", "stopped a stream: matched '" .. phrase .. "'")
		return weir.abort(output_message)
	end
	if not event.last and ends_with_a_start(text) then
		return weir.hold()
	end
	-- Complete, or the last call (no hold possible): nothing of a phrase is left to come.
	return weir.pass()
end
