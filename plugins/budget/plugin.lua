-- budget: spend limits per key and per tenant, in USD, over a day, a month or all time.
-- Full reference: README.md beside this file.
--
-- Money is counted in integer nano-dollars (1e-9 USD) with `weir.kv.incr`, in the plugin's
-- namespace:
--   spend/<scope>/<id>/<period>     settled cost      (scope: key | tenant)
--   tokens/<scope>/<id>/<period>    settled tokens    (period: 2025-01-31 | 2025-01 | total)
--   requests/<scope>/<id>/<period>  settled requests
--   hold/<scope>/<id>/<period>/<b>  worst-case cost of requests in flight, in 10-minute
--                                   buckets <b> (a crashed request's hold expires with its bucket)
-- Admission reserves the worst case (estimated prompt + max_tokens at the model's prices) and
-- refuses with 402 when settled spend + holds would pass the budget. During a stream the
-- reservation grows with the streamed text; when it can no longer grow the stream is aborted
-- with an error event. on_log releases the hold and records the real cost. `GET /admin/usage`
-- and `weir usage` read the spend/tokens/requests counters.

local M = {}

local NANO = 1e9
local BUCKET_MS = 600000
local HOLD_TTL_MS = 3 * BUCKET_MS
local DAY_TTL_MS = 40 * 86400000
local MONTH_TTL_MS = 400 * 86400000

local cfg = {
	default_max_tokens = 1024,
	per_message_tokens = 4,
	stream_step_tokens = 64,
	-- model -> nano-USD per token { input, output, cached }
	prices = {},
	-- tenant -> { usd, period }
	tenants = {},
	tenant_default = nil,
	key_default = nil,
	headers = true,
}

local PERIODS = { day = true, month = true, total = true }

local function check_budget(b, where)
	assert(type(b) == "table", where .. " must be a table { usd = ..., period = ... }")
	for k, _ in b do
		assert(k == "usd" or k == "period", where .. ": unknown key '" .. tostring(k) .. "'")
	end
	assert(type(b.usd) == "number" and b.usd >= 0, where .. ".usd must be a number >= 0")
	local period = b.period or "month"
	assert(PERIODS[period], where .. ".period must be day, month or total")
	return { nano = math.floor(b.usd * NANO + 0.5), period = period }
end

local function check_price(p, where)
	assert(type(p) == "table", where .. " must be a table { input = ..., output = ..., cached = ... }")
	for k, v in p do
		assert(k == "input" or k == "output" or k == "cached", where .. ": unknown key '" .. tostring(k) .. "'")
		assert(type(v) == "number" and v >= 0, where .. "." .. k .. " must be a number >= 0 (USD per 1M tokens)")
	end
	local input = p.input or 0
	-- USD per 1M tokens -> nano-USD per token: x / 1e6 * 1e9 = x * 1e3.
	return { input = input * 1000, output = (p.output or 0) * 1000, cached = (p.cached or input) * 1000 }
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
			cfg[k] = v
		elseif k == "headers" then
			assert(type(v) == "boolean", "headers must be true or false")
			cfg.headers = v
		else
			error("unknown config key '" .. tostring(k) .. "'")
		end
	end
end

local function int(n)
	return string.format("%d", n)
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

local function price_of(...)
	for i = 1, select("#", ...) do
		local model = select(i, ...)
		if model ~= nil and model ~= "" and cfg.prices[model] ~= nil then
			return cfg.prices[model]
		end
	end
	return cfg.prices["*"]
end

local function cost_nano(price, prompt, completion, cached)
	if price == nil then
		return 0
	end
	cached = math.min(cached or 0, prompt)
	return math.floor((prompt - cached) * price.input + cached * price.cached + completion * price.output + 0.5)
end

local function num(v)
	if v == nil then
		return 0
	end
	return tonumber(v) or 0
end

-- The budgets that apply: { kind, id, nano, period }.
local function budgets()
	local out = {}
	local key = weir.ctx_get("key")
	if key ~= nil then
		local usd = tonumber(weir.ctx_get("key.budget_usd") or "")
		local b
		if usd ~= nil then
			b = check_budget({ usd = usd, period = weir.ctx_get("key.budget_period") or "month" }, "key budget")
		else
			b = cfg.key_default
		end
		if b ~= nil then
			table.insert(out, { kind = "key", id = key, nano = b.nano, period = b.period })
		end
	end
	local tenant = weir.ctx_get("tenant")
	if tenant ~= nil then
		local b = cfg.tenants[tenant] or cfg.tenant_default
		if b ~= nil then
			table.insert(out, { kind = "tenant", id = tenant, nano = b.nano, period = b.period })
		end
	end
	return out
end

local function refusal(req, b, spent)
	local message = string.format(
		"Budget exceeded for %s %s: %.6f of %.2f USD spent this %s.",
		b.kind,
		b.id,
		spent / NANO,
		b.nano / NANO,
		if b.period == "total" then "lifetime" else b.period
	)
	weir.counter("rejected", 1)
	if req.dialect == "anthropic" then
		return weir.reply(402, { type = "error", error = { type = "billing_error", message = message } })
	end
	return weir.reply(402, {
		error = { message = message, type = "insufficient_quota", param = weir.json.null, code = "budget_exceeded" },
	})
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

function M.on_request(req)
	local list = budgets()
	if #list == 0 and weir.ctx_get("key") == nil and weir.ctx_get("tenant") == nil then
		return nil
	end
	local prompt = 0
	for _, m in req.messages do
		prompt += weir.count_tokens(m.content) + cfg.per_message_tokens
	end
	local max_tokens = cfg.default_max_tokens
	if req.body ~= nil then
		local v = json_int(req.body, '"max_completion_tokens"')
			or json_int(req.body, '"max_tokens"')
		if v ~= nil then
			max_tokens = tonumber(v)
		end
	end
	local price_model = weir.ctx_get("route.model") or req.model
	local price = price_of(price_model, req.model)
	local worst = cost_nano(price, prompt, max_tokens, 0)
	local now = weir.now_ms()
	local ids = period_ids(now)
	local bucket = now // BUCKET_MS
	local holds, limits = {}, {}
	local tightest = nil
	for _, b in list do
		local base = b.kind .. "/" .. b.id .. "/" .. ids[b.period]
		local hk = "hold/" .. base .. "/" .. int(bucket)
		local held = weir.kv.incr(hk, worst, HOLD_TTL_MS)
		local prev = math.max(0, num(weir.kv.get("hold/" .. base .. "/" .. int(bucket - 1))))
		local spent = num(weir.kv.get("spend/" .. base))
		if spent >= b.nano or spent + held + prev > b.nano then
			weir.kv.incr(hk, -worst, HOLD_TTL_MS)
			for _, k in holds do
				weir.kv.incr(k, -worst, HOLD_TTL_MS)
			end
			return refusal(req, b, spent)
		end
		table.insert(holds, hk)
		table.insert(limits, base .. "=" .. int(b.nano))
		local left = b.nano - spent - held - prev
		if tightest == nil or left < tightest then
			tightest = left
		end
	end
	local out = {
		set_metadata = {
			["budget.model"] = price_model,
			["budget.prompt"] = int(prompt),
			["budget.hold"] = int(worst),
			["budget.holds"] = table.concat(holds, " "),
			["budget.limits"] = table.concat(limits, " "),
			["budget.out_reserved"] = int(max_tokens),
			["budget.out_price"] = tostring(if price then price.output else 0),
		},
	}
	if cfg.headers and tightest ~= nil then
		out.set_response_headers = { ["x-weir-budget-remaining-usd"] = string.format("%.6f", math.max(0, tightest) / NANO) }
	end
	return out
end

-- Streams: grow the reservation with the streamed text; abort when it cannot grow.
function M.on_response_chunk(event)
	if event.type ~= "text_delta" and event.type ~= "tool_call_delta" then
		return nil
	end
	local holds = weir.ctx_get("budget.holds")
	if holds == nil then
		return nil
	end
	local text = event.text or event.arguments or ""
	local chars = num(weir.ctx_get("budget.chars")) + #text
	weir.ctx_set("budget.chars", int(chars))
	local reserved = num(weir.ctx_get("budget.out_reserved"))
	local est = math.ceil(chars / 4)
	if est <= reserved or holds == "" then
		return nil
	end
	local ext = math.max(cfg.stream_step_tokens, est - reserved)
	local ext_nano = math.floor(ext * num(weir.ctx_get("budget.out_price")) + 0.5)
	weir.ctx_set("budget.out_reserved", int(reserved + ext))
	weir.ctx_set("budget.hold", int(num(weir.ctx_get("budget.hold")) + ext_nano))
	local over = nil
	local limits = string.split(weir.ctx_get("budget.limits") or "", " ")
	local i = 0
	for hk in string.gmatch(holds, "%S+") do
		i += 1
		local held = weir.kv.incr(hk, ext_nano, HOLD_TTL_MS)
		local base, nano = string.match(limits[i] or "", "^(.*)=(%d+)$")
		if base ~= nil then
			local spent = num(weir.kv.get("spend/" .. base))
			if spent + held > tonumber(nano) then
				over = base
			end
		end
	end
	if over ~= nil then
		weir.counter("streams_aborted", 1)
		local kind, id = string.match(over, "^(%a+)/(.*)/[^/]+$")
		return weir.abort(string.format("Budget exceeded for %s %s; the stream was stopped.", kind or "?", id or "?"))
	end
	return nil
end

-- Releases the hold and records the real cost (estimated from streamed text when the
-- provider sent no usage).
function M.on_log(entry)
	local md = entry.metadata
	if md["budget.model"] == nil then
		return
	end
	local hold = num(md["budget.hold"])
	for hk in string.gmatch(md["budget.holds"] or "", "%S+") do
		weir.kv.incr(hk, -hold, HOLD_TTL_MS)
	end
	local prompt, completion, cached
	if entry.usage ~= nil then
		prompt, completion, cached = entry.usage.prompt_tokens, entry.usage.completion_tokens, entry.usage.cached_tokens
	elseif md["budget.chars"] ~= nil then
		prompt, completion, cached = num(md["budget.prompt"]), math.ceil(num(md["budget.chars"]) / 4), 0
	else
		-- No answer reached the client (error before any output): nothing was spent.
		return
	end
	local cost = cost_nano(price_of(entry.target_model, entry.model, md["budget.model"]), prompt, completion, cached)
	local ids = period_ids(weir.now_ms())
	local ttl = { day = DAY_TTL_MS, month = MONTH_TTL_MS, total = nil }
	for _, scope in { { "key", md["key"] }, { "tenant", md["tenant"] } } do
		local id = scope[2]
		if id ~= nil then
			for _, period in { "day", "month", "total" } do
				local base = scope[1] .. "/" .. id .. "/" .. ids[period]
				weir.kv.incr("spend/" .. base, cost, ttl[period])
				weir.kv.incr("tokens/" .. base, prompt + completion, ttl[period])
				weir.kv.incr("requests/" .. base, 1, ttl[period])
			end
		end
	end
end

return M
