-- prompt-guard: replies 400, in the caller's dialect, when a message contains one of the
-- configured jailbreak phrases. Matching ignores case and runs of whitespace, so
-- "IGNORE   previous\ninstructions" matches "ignore previous instructions".
--
-- Test: weir plugin test examples/prompt-guard

local phrases = {}
local roles = {}
local message = "request blocked by prompt-guard"

--- Lower-case, whitespace runs collapsed to one space, trimmed.
local function normalize(text)
	text = string.lower(text)
	text = string.gsub(text, "%s+", " ")
	text = string.gsub(text, "^ ", "")
	return (string.gsub(text, " $", ""))
end

---@param config { phrases: string[], roles: string[]?, message: string? }
function init(config)
	for i, phrase in ipairs(config.phrases) do
		phrases[i] = normalize(phrase)
	end
	for _, role in ipairs(config.roles or { "user" }) do
		roles[role] = true
	end
	message = config.message or message
end

---@param req weir.Request
---@return weir.Decision?
function on_request(req)
	for _, m in ipairs(req.messages) do
		if roles[m.role] then
			local text = normalize(m.content)
			for _, phrase in ipairs(phrases) do
				-- Plain find: phrases are text, not Lua patterns.
				if string.find(text, phrase, 1, true) then
					weir.counter("blocked")
					weir.log("info", "blocked a request: matched '" .. phrase .. "'")
					return weir.error_reply(req.dialect, 400, message, "invalid_request_error")
				end
			end
		end
	end
	return nil
end
