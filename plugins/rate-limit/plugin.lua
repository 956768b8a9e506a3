-- rate-limit: requests per minute (RPM) and tokens per minute (TPM) per key, per tenant
-- and per model, as a Lua plugin. Full reference: README.md beside this file.
--
-- Every limit is a host limiter (`weir.limit`, GCRA: `limit` units per window, bursts up to
-- `limit`), keyed in the plugin's namespace:
--   r/<scope>/<id>/<limit>/<window_ms>  requests      (scope: key | tenant | model)
--   t/<scope>/<id>/<limit>/<window_ms>  tokens
-- The limit and window are part of the key, so a changed limit takes effect at once (with a
-- fresh allowance) instead of being read against the old one's state.
-- Admission reserves 1 request and the estimated tokens (prompt estimate + max_tokens) in
-- every scope; when one refuses, what the earlier ones reserved is given back and the answer
-- is a 429. on_log settles the token reservations with the real usage (or gives them back
-- when the request failed). Every response carries x-ratelimit-* headers of the tightest
-- scope.

local M = {}

type Limit = { rpm: number?, tpm: number? }
type Scope = { kind: string, id: string, rpm: number?, tpm: number? }
type Taken = { key: string, limit: number, amount: number }

local int = weir.int

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
	return { rpm = if t.rpm then math.floor(t.rpm) else nil, tpm = if t.tpm then math.floor(t.tpm) else nil }
end

function M.init(config: any)
	config = config or {}
	for k, v in config do
		if k == "window_secs" then
			assert(type(v) == "number" and v >= 1, "window_secs must be a number >= 1")
			cfg.window_ms = math.floor(v * 1000)
		elseif k == "default_max_tokens" then
			assert(type(v) == "number" and v >= 0, "default_max_tokens must be a number >= 0")
			cfg.default_max_tokens = math.floor(v)
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

-- A limit from the metadata bag (set by the auth plugin), or nil.
local function meta_limit(name: string): number?
	local n = weir.ctx_number(name)
	if n == nil or n < 0 then
		return nil
	end
	return math.floor(n)
end

-- The scopes that apply to this request, each with its limits.
local function scopes(model: string): { Scope }
	local out = {}
	local key = weir.ctx_get("key")
	if key ~= nil then
		local rpm = meta_limit("key.rpm") or cfg.key.rpm
		local tpm = meta_limit("key.tpm") or cfg.key.tpm
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

-- Estimated tokens of the request: prompt (host estimate) + the completion budget.
local function estimate(req: any): number
	return weir.prompt_tokens(req.messages, cfg.per_message_tokens) + (req.max_tokens or cfg.default_max_tokens)
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

-- x-ratelimit-* headers of the tightest request and token limiters (limiter answers).
local function headers(requests: any, tokens: any): { [string]: string }
	local h = {}
	if requests ~= nil then
		h["x-ratelimit-limit-requests"] = int(requests.limit)
		h["x-ratelimit-remaining-requests"] = int(requests.remaining)
		h["x-ratelimit-reset-requests"] = duration(requests.reset_ms)
	end
	if tokens ~= nil then
		h["x-ratelimit-limit-tokens"] = int(tokens.limit)
		h["x-ratelimit-remaining-tokens"] = int(tokens.remaining)
		h["x-ratelimit-reset-tokens"] = duration(tokens.reset_ms)
	end
	return h
end

-- "minute" for the default window, else its length.
local function window_name(): string
	if cfg.window_ms == 60000 then
		return "minute"
	elseif cfg.window_ms == 3600000 then
		return "hour"
	end
	return duration(cfg.window_ms)
end

local function refuse(req: any, what: string, scope: Scope, h: { [string]: string }, retry_ms: number, est: number?)
	h["retry-after"] = int(math.max(1, math.ceil(retry_ms / 1000)))
	weir.counter("rejected_" .. what, 1)
	local message
	if est ~= nil then
		message = string.format(
			"Request too large: about %s tokens, more than the limit of %s tokens per %s of %s %s.",
			int(est),
			int(scope.tpm :: number),
			window_name(),
			scope.kind,
			scope.id
		)
	else
		message = string.format(
			"Rate limit reached for %s %s: %s per %s. Retry after %s s.",
			scope.kind,
			scope.id,
			if what == "requests" then int(scope.rpm :: number) .. " requests" else int(scope.tpm :: number) .. " tokens",
			window_name(),
			h["retry-after"]
		)
	end
	return weir.error_reply(req.dialect, 429, message, "rate_limit_error", { code = "rate_limit_exceeded", headers = h })
end

local function key_of(prefix: string, s: Scope, limit: number): string
	return prefix .. s.kind .. "/" .. s.id .. "/" .. int(limit) .. "/" .. int(cfg.window_ms)
end

-- The tighter of two limiter answers (fewest remaining).
local function tighter(best: any, r: any): any
	if best == nil or r.remaining < best.remaining then
		return r
	end
	return best
end

function M.on_request(req: any)
	local list = scopes(req.model)
	if #list == 0 then
		return nil
	end
	local window = cfg.window_ms
	local est = nil
	for _, s in list do
		if s.tpm ~= nil then
			est = estimate(req)
			break
		end
	end
	-- Reservations made so far, given back if a later scope refuses.
	local taken: { Taken } = {}
	local function undo()
		for _, t in taken do
			weir.limit.settle(t.key, t.limit, window, t.amount, 0)
		end
	end
	local req_best, tok_best = nil, nil
	local settle = {}
	for _, s in list do
		if s.rpm ~= nil then
			local k = key_of("r/", s, s.rpm)
			local r = weir.limit.reserve(k, s.rpm, window, 1)
			if not r.allowed then
				undo()
				return refuse(req, "requests", s, headers(r, nil), r.retry_after_ms, nil)
			end
			table.insert(taken, { key = k, limit = s.rpm, amount = 1 })
			req_best = tighter(req_best, r)
		end
		if s.tpm ~= nil then
			local n = est :: number
			local k = key_of("t/", s, s.tpm)
			local r = weir.limit.reserve(k, s.tpm, window, n)
			if not r.allowed then
				undo()
				local h = headers(req_best, r)
				return refuse(req, "tokens", s, h, r.retry_after_ms, if n > s.tpm then n else nil)
			end
			table.insert(taken, { key = k, limit = s.tpm, amount = n })
			tok_best = tighter(tok_best, r)
			table.insert(settle, int(s.tpm) .. " " .. k)
		end
	end
	local out: any = {}
	if #settle > 0 then
		-- What on_log settles: private to the plugin (the metadata bag is logged).
		weir.scratch_set("reserved", int(est :: number))
		weir.scratch_set("limiters", table.concat(settle, "\n"))
		out.set_metadata = { ["ratelimit.reserved"] = int(est :: number) }
	end
	if cfg.headers then
		out.set_response_headers = headers(req_best, tok_best)
	end
	return out
end

-- Settles token reservations with the real usage (or gives them back on failure).
function M.on_log(entry: any)
	local limiters = weir.scratch_get("limiters")
	local reserved = tonumber(weir.scratch_get("reserved"))
	if limiters == nil or reserved == nil then
		return
	end
	local used
	if entry.usage ~= nil then
		used = entry.usage.prompt_tokens + entry.usage.completion_tokens
	elseif entry.status >= 400 then
		-- Refused after admission (a later plugin) or failed upstream without an answer.
		used = 0
	else
		used = reserved
	end
	if used == reserved then
		return
	end
	for line in string.gmatch(limiters, "[^\n]+") do
		local sp = string.find(line, " ", 1, true) :: number
		local limit = tonumber(string.sub(line, 1, sp - 1)) :: number
		weir.limit.settle(string.sub(line, sp + 1), limit, cfg.window_ms, reserved, used)
	end
end

return M
