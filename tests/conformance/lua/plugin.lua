-- keyword-guard (Lua side of the conformance suite; the Rust side is ../rust/src/lib.rs).

local header = "x-team"
local keywords = {}

function init(config)
	header = config.header or header
	keywords = config.keywords
end

local function contains(haystack, needle)
	return string.find(haystack, needle, 1, true) ~= nil
end

function on_request(req)
	local team = req.headers[header]
	if team == nil then
		return weir.error_reply(req.dialect, 401, "missing " .. header .. " header")
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
	return {
		set_metadata = { team = team, user_messages = tostring(users) },
		set_headers = { ["x-weir-team"] = team },
		remove_headers = { header },
		set_response_headers = { ["x-weir-team"] = team },
	}
end

--- Replaces every plain occurrence of `word` in `text` with asterisks.
local function mask(text, word)
	local out, from = {}, 1
	while true do
		local s, e = string.find(text, word, from, true)
		if s == nil then
			break
		end
		table.insert(out, string.sub(text, from, s - 1))
		table.insert(out, string.rep("*", #word))
		from = e + 1
	end
	table.insert(out, string.sub(text, from))
	return table.concat(out)
end

function on_response_chunk(ev)
	if ev.type ~= "text_delta" then
		return nil
	end
	local text = ev.text
	for _, k in ipairs(keywords) do
		text = mask(text, k)
	end
	for _, k in ipairs(keywords) do
		for n = 1, #k - 1 do
			if #text >= n and string.sub(text, -n) == string.sub(k, 1, n) then
				return weir.hold()
			end
		end
	end
	if text ~= ev.text then
		return weir.replace({ { type = "text_delta", choice = ev.choice, text = text } })
	end
	return nil
end
