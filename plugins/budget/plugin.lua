-- budget: spend limits per key and per tenant, in USD, over a day, a month or all time.
-- Full reference: README.md beside this file.
--
-- Money is kept by the host's spend ledger (`weir.ledger`, micro-dollar precision, one atomic
-- state operation per call), one account per scope, id and period in the plugin's namespace:
--   <scope>/<id>/<period>     settled spend and reservations in flight
--                             (scope: key | tenant; period: 2025-01-31 | 2025-01 | total)
-- and, for the usage report, two counters per account:
--   tokens/<scope>/<id>/<period>, requests/<scope>/<id>/<period>
-- Admission reserves the worst case (estimated prompt + max_tokens at the model's price:
-- `weir.price`, else this plugin's `prices`) on the account of every budget that applies;
-- the ledger refuses when spent + reserved would pass the budget: 402. During a stream the
-- reservation grows with the streamed text; when it cannot grow the stream is aborted with an
-- error event. on_log settles the real cost (the gateway's `cost_usd` when it has one) on
-- the day, month and total accounts of the key and the tenant, or releases the reservation
-- when nothing was answered. `admin` serves `GET /usage` (what `weir usage` shows).
-- What the hooks of one request share is in the plugin's request scratch (never logged).

local M = {}

local MICRO = 1e6
local DAY_TTL_MS = 40 * 86400000
local MONTH_TTL_MS = 400 * 86400000
local PERIOD_TTL = { day = DAY_TTL_MS, month = MONTH_TTL_MS }
local PERIOD_LIST = { "day", "month", "total" }
local PERIODS = { day = true, month = true, total = true }

local int = weir.int

local cfg = {
	default_max_tokens = 1024,
	per_message_tokens = 4,
	stream_step_tokens = 64,
	-- model -> USD per token { input, output, cached, cache_write }
	prices = {},
	-- tenant -> { usd, period }
	tenants = {},
	tenant_default = nil,
	key_default = nil,
	headers = true,
}

local function check_budget(b, where)
	assert(type(b) == "table", where .. " must be a table { usd = ..., period = ... }")
	for k, _ in b do
		assert(k == "usd" or k == "period", where .. ": unknown key '" .. tostring(k) .. "'")
	end
	assert(type(b.usd) == "number" and b.usd >= 0, where .. ".usd must be a number >= 0")
	local period = b.period or "month"
	assert(PERIODS[period], where .. ".period must be day, month or total")
	return { usd = b.usd, period = period }
end

local function check_price(p, where)
	assert(type(p) == "table", where .. " must be a table { input = ..., output = ..., cached = ... }")
	for k, v in p do
		assert(
			k == "input" or k == "output" or k == "cached" or k == "cache_write",
			where .. ": unknown key '" .. tostring(k) .. "'"
		)
		assert(type(v) == "number" and v >= 0, where .. "." .. k .. " must be a number >= 0 (USD per 1M tokens)")
	end
	local input = p.input or 0
	-- USD per 1M tokens -> USD per token.
	return {
		input = input / MICRO,
		output = (p.output or 0) / MICRO,
		cached = (p.cached or input) / MICRO,
		cache_write = (p.cache_write or input) / MICRO,
	}
end

function M.init(config)
	config = config or {}
	for k, v in config do
		if k == "prices" then
			for model, p in v do
				cfg.prices[model] = check_price(p, "prices." .. model)
			end
		elseif k == "tenants" then
			for name, b in v do
				cfg.tenants[name] = check_budget(b, "tenants." .. name)
			end
		elseif k == "tenant_default" then
			cfg.tenant_default = check_budget(v, "tenant_default")
		elseif k == "key_default" then
			cfg.key_default = check_budget(v, "key_default")
		elseif k == "default_max_tokens" or k == "per_message_tokens" or k == "stream_step_tokens" then
			assert(type(v) == "number" and v >= 0, k .. " must be a number >= 0")
			cfg[k] = if k == "per_message_tokens" then v else math.floor(v)
		elseif k == "headers" then
			assert(type(v) == "boolean", "headers must be true or false")
			cfg.headers = v
		else
			error("unknown config key '" .. tostring(k) .. "'")
		end
	end
end

-- Civil date (UTC) from days since 1970-01-01 (H. Hinnant's algorithm).
local function civil(days)
	local z = days + 719468
	local era = (if z >= 0 then z else z - 146096) // 146097
	local doe = z - era * 146097
	local yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
	local doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
	local mp = (5 * doy + 2) // 153
	local d = doy - (153 * mp + 2) // 5 + 1
	local m = if mp < 10 then mp + 3 else mp - 9
	local y = yoe + era * 400 + (if m <= 2 then 1 else 0)
	return y, m, d
end

-- Period ids for `now`: day, month, total.
local function period_ids(now)
	local y, m, d = civil(now // 86400000)
	return {
		day = string.format("%04d-%02d-%02d", y, m, d),
		month = string.format("%04d-%02d", y, m),
		total = "total",
	}
end

-- The price of the first model that has one: the gateway's `[prices]` (`weir.price`), else
-- this plugin's `prices`; then this plugin's "*". USD per token, or nil.
local function price_of(...)
	for i = 1, select("#", ...) do
		local model = select(i, ...)
		if model ~= nil and model ~= "" then
			local p = weir.price(model)
			if p ~= nil then
				return {
					input = p.input / MICRO,
					output = p.output / MICRO,
					cached = p.cached_input / MICRO,
					cache_write = p.cache_write / MICRO,
				}
			end
			if cfg.prices[model] ~= nil then
				return cfg.prices[model]
			end
		end
	end
	return cfg.prices["*"]
end

-- USD of a usage at a price (nil price: 0). Cached and cache-write tokens are part of the
-- prompt tokens, priced at their own rates (as the gateway's `cost_usd`).
local function cost_of(price, prompt, completion, cached, written)
	if price == nil then
		return 0
	end
	cached = math.min(cached or 0, prompt)
	written = math.min(written or 0, prompt - cached)
	return (prompt - cached - written) * price.input
		+ cached * price.cached
		+ written * price.cache_write
		+ completion * price.output
end

-- USD as whole micro-dollars (the ledger's unit), so reservations add up exactly.
local function micros(usd)
	return math.floor(usd * MICRO + 0.5)
end

-- The budgets that apply: { kind, id, usd, period }.
local function budgets(key, tenant)
	local out = {}
	if key ~= nil then
		local usd = weir.ctx_number("key.budget_usd")
		local b
		if usd ~= nil then
			b = check_budget({ usd = usd, period = weir.ctx_get("key.budget_period") or "month" }, "key budget")
		else
			b = cfg.key_default
		end
		if b ~= nil then
			table.insert(out, { kind = "key", id = key, usd = b.usd, period = b.period })
		end
	end
	if tenant ~= nil then
		local b = cfg.tenants[tenant] or cfg.tenant_default
		if b ~= nil then
			table.insert(out, { kind = "tenant", id = tenant, usd = b.usd, period = b.period })
		end
	end
	return out
end

local function refusal(req, b, spent)
	local message = string.format(
		"Budget exceeded for %s %s: %.6f of %.2f USD spent this %s.",
		b.kind,
		b.id,
		spent,
		b.usd,
		if b.period == "total" then "lifetime" else b.period
	)
	weir.counter("rejected", 1)
	return weir.error_reply(
		req.dialect,
		402,
		message,
		"insufficient_quota",
		{ code = "budget_exceeded", anthropic_type = "billing_error" }
	)
end

-- The reserved accounts of this request, from the scratch: { kind, period, usd, account }.
local function reserved_accounts()
	local out = {}
	local text = weir.scratch_get("accounts")
	if text == nil then
		return out
	end
	for line in string.gmatch(text, "[^\n]+") do
		local kind, period, usd, account = string.match(line, "^(%a+)\t(%a+)\t([^\t]+)\t(.*)$")
		if kind ~= nil then
			table.insert(out, { kind = kind, period = period, usd = tonumber(usd), account = account })
		end
	end
	return out
end

function M.on_request(req)
	local key, tenant = weir.ctx_get("key"), weir.ctx_get("tenant")
	if key == nil and tenant == nil then
		return nil
	end
	local list = budgets(key, tenant)
	local prompt = weir.prompt_tokens(req.messages, cfg.per_message_tokens)
	local max_tokens = req.max_tokens or cfg.default_max_tokens
	local price_model = weir.ctx_get("route.model") or req.model
	local price = price_of(price_model, req.model)
	local worst = micros(cost_of(price, prompt, max_tokens, 0, 0))
	local ids = period_ids(weir.now_ms())
	local taken, lines = {}, {}
	local tightest = nil
	for _, b in list do
		local account = b.kind .. "/" .. b.id .. "/" .. ids[b.period]
		local r = weir.ledger.reserve(account, b.usd, worst / MICRO, PERIOD_TTL[b.period])
		if not r.allowed or r.spent >= b.usd then
			if r.allowed then
				weir.ledger.release(account, worst / MICRO)
			end
			for _, a in taken do
				weir.ledger.release(a, worst / MICRO)
			end
			return refusal(req, b, r.spent)
		end
		table.insert(taken, account)
		table.insert(lines, b.kind .. "\t" .. b.period .. "\t" .. string.format("%.17g", b.usd) .. "\t" .. account)
		local left = b.usd - r.spent - r.reserved
		if tightest == nil or left < tightest then
			tightest = left
		end
	end
	-- For the chunk hook and on_log.
	weir.scratch_set("model", price_model)
	weir.scratch_set("prompt", int(prompt))
	weir.scratch_set("reserved", int(worst))
	weir.scratch_set("out", int(max_tokens))
	weir.scratch_set("out_price", string.format("%.17g", if price then price.output else 0))
	if #lines > 0 then
		weir.scratch_set("accounts", table.concat(lines, "\n"))
	end
	local out = {
		set_metadata = {
			["budget.model"] = price_model,
			["budget.reserved_usd"] = string.format("%.6f", worst / MICRO),
		},
	}
	if cfg.headers and tightest ~= nil then
		out.set_response_headers = { ["x-weir-budget-remaining-usd"] = string.format("%.6f", math.max(0, tightest)) }
	end
	return out
end

-- Streams: grow the reservation with the streamed text; abort when it cannot grow.
function M.on_response_chunk(event)
	if event.type ~= "text_delta" and event.type ~= "tool_call_delta" then
		return nil
	end
	local out = tonumber(weir.scratch_get("out"))
	if out == nil then
		return nil
	end
	local text = event.text or event.arguments or ""
	local chars = (tonumber(weir.scratch_get("chars")) or 0) + #text
	weir.scratch_set("chars", int(chars))
	local est = math.ceil(chars / 4)
	if est <= out then
		return nil
	end
	local accounts = reserved_accounts()
	if #accounts == 0 then
		return nil
	end
	local ext = math.max(cfg.stream_step_tokens, est - out)
	local ext_micros = micros(ext * (tonumber(weir.scratch_get("out_price")) or 0))
	weir.scratch_set("out", int(out + ext))
	if ext_micros <= 0 then
		return nil
	end
	local done = {}
	for _, a in accounts do
		local r = weir.ledger.reserve(a.account, a.usd, ext_micros / MICRO, PERIOD_TTL[a.period])
		if not r.allowed then
			for _, account in done do
				weir.ledger.release(account, ext_micros / MICRO)
			end
			weir.counter("streams_aborted", 1)
			local id = string.match(a.account, "^%a+/(.*)/[^/]+$") or "?"
			return weir.abort(string.format("Budget exceeded for %s %s; the stream was stopped.", a.kind, id))
		end
		table.insert(done, a.account)
	end
	weir.scratch_set("reserved", int((tonumber(weir.scratch_get("reserved")) or 0) + ext_micros))
	return nil
end

-- Settles the real cost (estimated from the streamed text when the provider sent no usage),
-- or releases the reservation when no answer reached the client.
function M.on_log(entry)
	local model = weir.scratch_get("model")
	if model == nil then
		return
	end
	local reserved = (tonumber(weir.scratch_get("reserved")) or 0) / MICRO
	local accounts = reserved_accounts()
	local chars = tonumber(weir.scratch_get("chars"))
	local cost, tokens
	local u = entry.usage
	if entry.cost_usd ~= nil then
		cost = entry.cost_usd
		tokens = if u then u.prompt_tokens + u.completion_tokens else 0
	elseif u ~= nil then
		local price = price_of(entry.target_model, entry.model, model)
		cost = cost_of(price, u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.cache_write_tokens)
		tokens = u.prompt_tokens + u.completion_tokens
	elseif chars ~= nil then
		local prompt = tonumber(weir.scratch_get("prompt")) or 0
		local completion = math.ceil(chars / 4)
		cost = cost_of(price_of(entry.target_model, entry.model, model), prompt, completion, 0, 0)
		tokens = prompt + completion
	else
		-- No answer reached the client (refused later in the chain, or an error before any
		-- output): nothing was spent.
		for _, a in accounts do
			weir.ledger.release(a.account, reserved)
		end
		return
	end
	-- The reserved accounts are settled where they were reserved (even if the day turned
	-- since); the other periods of the key and the tenant record the spend at log time.
	local base_of = {}
	for _, a in accounts do
		weir.ledger.settle(a.account, reserved, cost, PERIOD_TTL[a.period])
		base_of[a.kind .. "/" .. a.period] = a.account
	end
	local ids = period_ids(weir.now_ms())
	local md = entry.metadata
	for _, kind in { "key", "tenant" } do
		local id = md[kind]
		if id ~= nil then
			for _, period in PERIOD_LIST do
				local ttl = PERIOD_TTL[period]
				local base = base_of[kind .. "/" .. period]
				if base == nil then
					base = kind .. "/" .. id .. "/" .. ids[period]
					if cost > 0 then
						weir.ledger.settle(base, 0, cost, ttl)
					end
				end
				weir.kv.incr("tokens/" .. base, tokens, ttl)
				weir.kv.incr("requests/" .. base, 1, ttl)
			end
		end
	end
end

-- Admin: GET /usage -------------------------------------------------------------------------

local function not_found(message)
	return { status = 404, body = { error = { message = message } } }
end

local function bad_request(message)
	return { status = 400, body = { error = { message = message } } }
end

local function period_kind(period_id)
	if #period_id == 10 then
		return "day"
	elseif #period_id == 7 then
		return "month"
	end
	return "total"
end

-- One usage line, or nil when the account saw no settled request and no spend.
local function usage_line(scope, id, period_id, requests)
	local base = scope .. "/" .. id .. "/" .. period_id
	if requests == nil then
		requests = tonumber(weir.kv.get("requests/" .. base))
	end
	local balance = weir.ledger.balance(base)
	if requests == nil and balance.spent <= 0 then
		return nil
	end
	return {
		scope = scope,
		id = id,
		period = period_kind(period_id),
		period_id = period_id,
		spend_usd = balance.spent,
		tokens = tonumber(weir.kv.get("tokens/" .. base)) or 0,
		requests = requests or 0,
	}
end

-- `GET /usage?scope=key|tenant&id=...&period=day|month|total&period_id=2025-01`: settled
-- spend, tokens and requests per key and tenant, as `{"usage": [{scope, id, period,
-- period_id, spend_usd, tokens, requests}]}`. Without `period`: the current day, the current
-- month and all time.
function M.admin(req)
	if req.path ~= "/usage" then
		return not_found("no such endpoint: " .. req.path .. " (this plugin serves GET /usage)")
	end
	if req.method ~= "GET" then
		return { status = 405, body = { error = { message = "use GET" } } }
	end
	local q = weir.query(req.query)
	if q.scope ~= nil and q.scope ~= "key" and q.scope ~= "tenant" then
		return bad_request("scope must be key or tenant, not '" .. q.scope .. "'")
	end
	local ids = period_ids(weir.now_ms())
	local wanted
	if q.period_id ~= nil then
		wanted = { q.period_id }
	elseif q.period == nil then
		wanted = { ids.day, ids.month, "total" }
	elseif PERIODS[q.period] then
		wanted = { ids[q.period] }
	else
		return bad_request("period must be day, month or total, not '" .. q.period .. "'")
	end
	local lines = {}
	if q.scope ~= nil and q.id ~= nil then
		for _, pid in wanted do
			local line = usage_line(q.scope, q.id, pid, nil)
			if line then
				table.insert(lines, line)
			end
		end
	else
		local want = {}
		for _, pid in wanted do
			want[pid] = true
		end
		local prefix = "requests/" .. (if q.scope then q.scope .. "/" else "")
		for _, e in weir.kv.scan(prefix, 100000) do
			-- requests/<scope>/<id>/<period_id>; ids may contain '/'.
			local scope, id, pid = string.match(e.key, "^requests/(%a+)/(.+)/([^/]+)$")
			if scope ~= nil and want[pid] and (q.id == nil or q.id == id) then
				local line = usage_line(scope, id, pid, tonumber(e.value))
				if line then
					table.insert(lines, line)
				end
			end
		end
	end
	table.sort(lines, function(a, b)
		if a.scope ~= b.scope then
			return a.scope < b.scope
		elseif a.id ~= b.id then
			return a.id < b.id
		end
		return a.period_id < b.period_id
	end)
	local body = if #lines == 0 then '{"usage":[]}' else weir.json.encode({ usage = lines })
	return { status = 200, body = body }
end

return M
