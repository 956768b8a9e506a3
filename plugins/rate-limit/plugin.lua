-- rate-limit: requests per minute (RPM) and tokens per minute (TPM) per key, per tenant
-- and per model, as a Lua plugin. Full reference: README.md beside this file.
--
-- Fixed windows (default 60 s) counted with `weir.kv.incr` in the plugin's namespace:
--   r/<scope>/<id>/<window>  requests admitted in the window
--   t/<scope>/<id>/<window>  tokens reserved or used in the window
-- Admission reserves tokens (estimated prompt tokens + max_tokens); on_log settles the
-- reservation with the real usage (or releases it when the request failed). Every response
-- carries x-ratelimit-* headers of the tightest scope; a refusal is a 429 with Retry-After.

local M = {}

type Limit = { rpm: number?, tpm: number? }
type Scope = { kind: string, id: string, rpm: number?, tpm: number? }

local cfg = {
	window_ms = 60000,
	default_max_tokens = 1024,
	per_message_tokens = 4,
	key = {} :: Limit,
	tenant = {} :: Limit,
	tenants = {} :: { [string]: Limit },
	models = {} :: { [string]: Limit },
	headers = true,
}

local function limit(t: any, where: string): Limit
	if t == nil then
		return {}
	end
	assert(type(t) == "table", where .. " must be a table")
	for k, v in t do
		assert(k == "rpm" or k == "tpm", where .. ": unknown key '" .. tostring(k) .. "'")
		assert(type(v) == "number" and v >= 0, where .. "." .. k .. " must be a number >= 0")
	end
	return { rpm = t.rpm, tpm = t.tpm }
end

function M.init(config: any)
	config = config or {}
	for k, v in config do
		if k == "window_secs" then
			assert(type(v) == "number" and v >= 1, "window_secs must be a number >= 1")
			cfg.window_ms = v * 1000
		elseif k == "default_max_tokens" then
			assert(type(v) == "number" and v >= 0, "default_max_tokens must be a number >= 0")
			cfg.default_max_tokens = v
		elseif k == "per_message_tokens" then
			assert(type(v) == "number" and v >= 0, "per_message_tokens must be a number >= 0")
			cfg.per_message_tokens = v
		elseif k == "key" then
			cfg.key = limit(v, "key")
		elseif k == "tenant" then
			cfg.tenant = limit(v, "tenant")
		elseif k == "tenants" then
			for name, l in v do
				cfg.tenants[name] = limit(l, "tenants." .. name)
			end
		elseif k == "models" then
			for name, l in v do
				cfg.models[name] = limit(l, "models." .. name)
			end
		elseif k == "headers" then
			assert(type(v) == "boolean", "headers must be true or false")
			cfg.headers = v
		else
			error("unknown config key '" .. tostring(k) .. "'")
		end
	end
end

local function int(n: number): string
	return string.format("%d", n)
end

-- A number from the metadata bag (set by the auth plugin), or nil.
local function meta_number(name: string): number?
	local v = weir.ctx_get(name)
	if v == nil then
		return nil
	end
	return tonumber(v)
end

-- The scopes that apply to this request, each with its limits.
local function scopes(model: string): { Scope }
	local out = {}
	local key = weir.ctx_get("key")
	if key ~= nil then
		local rpm = meta_number("key.rpm") or cfg.key.rpm
		local tpm = meta_number("key.tpm") or cfg.key.tpm
		if rpm ~= nil or tpm ~= nil then
			table.insert(out, { kind = "key", id = key, rpm = rpm, tpm = tpm })
		end
	end
	local tenant = weir.ctx_get("tenant")
	if tenant ~= nil then
		local l = cfg.tenants[tenant] or cfg.tenant
		if l.rpm ~= nil or l.tpm ~= nil then
			table.insert(out, { kind = "tenant", id = tenant, rpm = l.rpm, tpm = l.tpm })
		end
	end
	local l = cfg.models[model] or cfg.models["*"]
	if l ~= nil and (l.rpm ~= nil or l.tpm ~= nil) then
		table.insert(out, { kind = "model", id = model, rpm = l.rpm, tpm = l.tpm })
	end
	return out
end

-- The first `"<name>": <digits>` in a JSON text, as a string. Found with a plain search for
-- the quoted name and an anchored match after it, not with `string.match(body, pattern)`:
-- Luau's matcher calls the VM interrupt (the deadline check) at every byte it tries, which
-- costs tens of microseconds on a 1 KB body. The same answer as that pattern: every match
-- starts at an occurrence of the name, tried left to right.
local function json_int(text: string, quoted_name: string): string?
	local from = 1
	while true do
		local _, last = string.find(text, quoted_name, from, true)
		if last == nil then
			return nil
		end
		local v = string.match(text, "^%s*:%s*(%d+)", last + 1)
		if v ~= nil then
			return v
		end
		from = last + 1
	end
end

-- Estimated tokens of the request: prompt (host estimate) + the completion budget.
local function estimate(req: any): number
	local n = 0
	for _, m in req.messages do
		n += weir.count_tokens(m.content) + cfg.per_message_tokens
	end
	local max_tokens = cfg.default_max_tokens
	if req.body ~= nil then
		-- A structural match is enough: inside JSON strings the quotes are escaped.
		local v = json_int(req.body, '"max_completion_tokens"')
			or json_int(req.body, '"max_tokens"')
		if v ~= nil then
			max_tokens = tonumber(v) :: number
		end
	end
	return n + max_tokens
end

local function duration(ms: number): string
	if ms < 1000 then
		return int(ms) .. "ms"
	end
	local s = math.ceil(ms / 1000)
	if s < 60 then
		return int(s) .. "s"
	end
	return int(s // 60) .. "m" .. int(s % 60) .. "s"
end

-- x-ratelimit-* headers for the tightest request and token scopes.
local function headers(req_best: any, tok_best: any, reset_ms: number): { [string]: string }
	local h = {}
	if req_best ~= nil then
		h["x-ratelimit-limit-requests"] = int(req_best.limit)
		h["x-ratelimit-remaining-requests"] = int(math.max(0, req_best.limit - req_best.used))
		h["x-ratelimit-reset-requests"] = duration(reset_ms)
	end
	if tok_best ~= nil then
		h["x-ratelimit-limit-tokens"] = int(tok_best.limit)
		h["x-ratelimit-remaining-tokens"] = int(math.max(0, tok_best.limit - tok_best.used))
		h["x-ratelimit-reset-tokens"] = duration(reset_ms)
	end
	return h
end

local function refuse(req: any, what: string, scope: Scope, h: { [string]: string }, reset_ms: number, oversize: boolean)
	h["retry-after"] = int(math.max(1, math.ceil(reset_ms / 1000)))
	weir.counter("rejected_" .. what, 1)
	local message
	if oversize then
		message = string.format(
			"Request too large: about %s tokens, more than the %s token-per-minute limit of %s %s.",
			h["x-ratelimit-used-tokens"] or "?",
			int(scope.tpm :: number),
			scope.kind,
			scope.id
		)
		h["x-ratelimit-used-tokens"] = nil
	else
		message = string.format(
			"Rate limit reached for %s %s: %s per minute. Retry after %s s.",
			scope.kind,
			scope.id,
			what == "requests" and int(scope.rpm :: number) .. " requests" or int(scope.tpm :: number) .. " tokens",
			h["retry-after"]
		)
	end
	if req.dialect == "anthropic" then
		return weir.reply(429, { type = "error", error = { type = "rate_limit_error", message = message } }, h)
	end
	return weir.reply(429, {
		error = { message = message, type = "rate_limit_error", param = weir.json.null, code = "rate_limit_exceeded" },
	}, h)
end

function M.on_request(req: any)
	local list = scopes(req.model)
	if #list == 0 then
		return nil
	end
	local now = weir.now_ms()
	local win = now // cfg.window_ms
	local reset_ms = (win + 1) * cfg.window_ms - now
	local ttl = cfg.window_ms * 2
	local est = estimate(req)
	-- Counters taken so far, to give back if a later scope refuses.
	local taken = {}
	local function undo()
		for _, t in taken do
			weir.kv.incr(t[1], -t[2], cfg.window_ms * 2)
		end
	end
	local req_best, tok_best = nil, nil
	local settle = {}
	for _, s in list do
		local base = s.kind .. "/" .. s.id .. "/" .. int(win)
		if s.rpm ~= nil then
			local k = "r/" .. base
			local used = weir.kv.incr(k, 1, ttl)
			table.insert(taken, { k, 1 })
			local entry = { limit = s.rpm, used = used }
			if used > s.rpm then
				undo()
				entry.used = used - 1
				return refuse(req, "requests", s, headers(entry, nil, reset_ms), reset_ms, false)
			end
			if req_best == nil or s.rpm - used < req_best.limit - req_best.used then
				req_best = entry
			end
		end
		if s.tpm ~= nil then
			local k = "t/" .. base
			local used = weir.kv.incr(k, est, ttl)
			table.insert(taken, { k, est })
			local entry = { limit = s.tpm, used = used }
			if used > s.tpm then
				undo()
				entry.used = used - est
				local h = headers(req_best, entry, reset_ms)
				h["x-ratelimit-used-tokens"] = int(est)
				return refuse(req, "tokens", s, h, reset_ms, est > s.tpm)
			end
			if tok_best == nil or s.tpm - used < tok_best.limit - tok_best.used then
				tok_best = entry
			end
			table.insert(settle, k)
		end
	end
	local out: any = {}
	if #settle > 0 then
		out.set_metadata = { ["ratelimit.reserved"] = int(est), ["ratelimit.counters"] = table.concat(settle, " ") }
	end
	if cfg.headers then
		out.set_response_headers = headers(req_best, tok_best, reset_ms)
	end
	return out
end

-- Settles token reservations with the real usage (or releases them on failure).
function M.on_log(entry: any)
	local md = entry.metadata
	local reserved = tonumber(md["ratelimit.reserved"])
	local counters = md["ratelimit.counters"]
	if reserved == nil or counters == nil then
		return
	end
	local actual
	if entry.usage ~= nil then
		actual = entry.usage.prompt_tokens + entry.usage.completion_tokens
	elseif entry.status >= 400 then
		actual = 0
	else
		actual = reserved
	end
	local delta = actual - reserved
	if delta == 0 then
		return
	end
	for k in string.gmatch(counters, "%S+") do
		weir.kv.incr(k, delta, cfg.window_ms * 2)
	end
end

return M
