-- routing: model aliases, weighted / latency / least-busy / cost / priority choice, fallback
-- chains, conditional routes and per-target circuit breakers. Full reference: README.md.
--
-- For a request whose model is an alias (or that a rule sends to one), the plugin orders the
-- alias's targets by its strategy, skips targets whose breaker is open, and hands the list to
-- the gateway with `set_targets`: the first is tried first, the others are the fallback chain
-- the gateway walks on errors, timeouts and 429s.
--
-- Health comes from the gateway: `weir.target_stats(provider, model)` (latency EWMA, error
-- rate, attempts in flight, kept by the upstream layer) for the latency and least-busy
-- strategies. The breakers are the plugin's, per target `<provider>/<model>`, in its
-- namespace, fed by on_log from every upstream attempt of the request (`entry.attempts`):
--   fail/<t>   consecutive failures          open/<t>  present while the breaker is open (TTL)
-- A failure is a connect error, a timeout, a broken or invalid answer, a 5xx or a 429.

local M = {}

local cfg = {
	aliases = {},
	rules = {},
	prices = {},
	failure_threshold = 5,
	cooldown_ms = 30000,
	error_penalty_ms = 2000,
	max_error_rate = nil :: number?,
}

local STRATEGIES = { weighted = true, latency = true, least_busy = true, cost = true, priority = true }

local function check_targets(list, where)
	assert(type(list) == "table" and #list > 0, where .. " must be a non-empty list of { provider, model }")
	local out = {}
	for i, t in list do
		local w = where .. "[" .. i .. "]"
		assert(type(t) == "table", w .. " must be a table")
		for k, _ in t do
			assert(k == "provider" or k == "model" or k == "weight", w .. ": unknown key '" .. tostring(k) .. "'")
		end
		assert(type(t.provider) == "string" and t.provider ~= "", w .. ".provider must be a provider name")
		assert(type(t.model) == "string" and t.model ~= "", w .. ".model must be an upstream model")
		local weight = t.weight or 1
		assert(type(weight) == "number" and weight >= 0, w .. ".weight must be a number >= 0")
		table.insert(out, { provider = t.provider, model = t.model, weight = weight, id = t.provider .. "/" .. t.model })
	end
	return out
end

local function check_alias(a, where)
	assert(type(a) == "table", where .. " must be a table")
	for k, _ in a do
		assert(k == "strategy" or k == "targets" or k == "fallback", where .. ": unknown key '" .. tostring(k) .. "'")
	end
	local strategy = a.strategy or "priority"
	assert(STRATEGIES[strategy], where .. ".strategy must be weighted, latency, least_busy, cost or priority")
	local fallback = a.fallback
	if fallback == nil then
		fallback = true
	end
	assert(type(fallback) == "boolean", where .. ".fallback must be true or false")
	return { strategy = strategy, targets = check_targets(a.targets, where .. ".targets"), fallback = fallback }
end

local function check_rule(r, where)
	assert(type(r) == "table", where .. " must be a table")
	local when = r.when or {}
	for k, _ in r do
		assert(k == "when" or k == "alias", where .. ": unknown key '" .. tostring(k) .. "'")
	end
	for k, _ in when do
		assert(
			k == "model" or k == "tenant" or k == "headers" or k == "metadata",
			where .. ".when: unknown key '" .. tostring(k) .. "' (model, tenant, headers, metadata)"
		)
	end
	assert(type(r.alias) == "string", where .. ".alias must name an alias")
	local headers = {}
	for name, value in when.headers or {} do
		headers[string.lower(name)] = value
	end
	return { model = when.model, tenant = when.tenant, headers = headers, metadata = when.metadata or {}, alias = r.alias }
end

function M.init(config)
	config = config or {}
	for k, v in config do
		if k == "aliases" then
			for name, a in v do
				cfg.aliases[name] = check_alias(a, "aliases." .. name)
			end
		elseif k == "rules" then
			for i, r in v do
				table.insert(cfg.rules, check_rule(r, "rules[" .. i .. "]"))
			end
		elseif k == "prices" then
			for model, p in v do
				assert(type(p) == "table", "prices." .. model .. " must be a table { input, output }")
				cfg.prices[model] = (p.input or 0) + (p.output or 0)
			end
		elseif k == "failure_threshold" or k == "cooldown_ms" or k == "error_penalty_ms" then
			assert(type(v) == "number" and v >= 1, k .. " must be a number >= 1")
			cfg[k] = v
		elseif k == "ewma_alpha" then
			-- Accepted for old configs: the gateway keeps the EWMAs now (weir.target_stats).
			assert(type(v) == "number" and v > 0 and v <= 1, "ewma_alpha must be in (0, 1]")
		elseif k == "max_error_rate" then
			assert(type(v) == "number" and v >= 0 and v <= 1, "max_error_rate must be in [0, 1]")
			cfg.max_error_rate = v
		else
			error("unknown config key '" .. tostring(k) .. "'")
		end
	end
	for i, r in cfg.rules do
		assert(cfg.aliases[r.alias] ~= nil, "rules[" .. i .. "].alias: no alias named '" .. r.alias .. "'")
	end
end

local function rule_matches(r, req)
	if r.model ~= nil and r.model ~= req.model then
		return false
	end
	if r.tenant ~= nil and r.tenant ~= weir.ctx_get("tenant") then
		return false
	end
	for name, value in r.headers do
		if req.header(name) ~= value then
			return false
		end
	end
	for name, value in r.metadata do
		if weir.ctx_get(name) ~= value then
			return false
		end
	end
	return true
end

-- The price of a target (input + output per 1M tokens) for the cost strategy: this
-- plugin's `prices` for the target, the gateway's `[prices]` for the model, this plugin's
-- `prices` for the model.
local function price(t)
	local p = cfg.prices[t.id]
	if p ~= nil then
		return p
	end
	local g = weir.price(t.model)
	if g ~= nil then
		return g.input + g.output
	end
	return cfg.prices[t.model] or math.huge
end

-- What the gateway measured for a target; nil when it was never tried.
local function stats(t)
	return weir.target_stats(t.provider, t.model)
end

-- Latency score: EWMA latency plus a penalty per unit of error rate; an untried target
-- scores 0, so it gets tried.
local function latency_score(s)
	if s == nil or s.attempts == 0 then
		return 0
	end
	return s.latency_ewma_ms + s.error_rate * cfg.error_penalty_ms
end

local function sorted(targets, score)
	local out = table.clone(targets)
	table.sort(out, function(a, b)
		return score[a.id] < score[b.id]
	end)
	return out
end

-- Orders `targets` (healthy ones) by the alias's strategy.
local function order(alias, name, targets)
	local s = alias.strategy
	if s == "priority" then
		return targets
	end
	if s == "weighted" then
		local total = 0
		for _, t in targets do
			total += t.weight
		end
		if total <= 0 then
			return targets
		end
		-- A shared counter spreads requests exactly by weight across all workers.
		local n = weir.kv.incr("rr/" .. name, 1) % total
		local pick = #targets
		for i, t in targets do
			if n < t.weight then
				pick = i
				break
			end
			n -= t.weight
		end
		local out = { targets[pick] }
		for i, t in targets do
			if i ~= pick then
				table.insert(out, t)
			end
		end
		return out
	end
	local score = {}
	for i, t in targets do
		-- The list position breaks ties.
		if s == "latency" then
			score[t.id] = latency_score(stats(t)) + i * 1e-6
		elseif s == "least_busy" then
			local st = stats(t)
			local busy = if st then st.in_flight else 0
			score[t.id] = busy * 1e9 + latency_score(st) + i * 1e-6
		else
			score[t.id] = price(t) + i * 1e-9
		end
	end
	return sorted(targets, score)
end

-- With `max_error_rate`: targets whose error rate (the gateway's EWMA) is above it go last,
-- in their order (demoted, not dropped: they are still fallbacks).
local function demote_erroring(targets)
	local limit = cfg.max_error_rate
	if limit == nil or #targets < 2 then
		return targets
	end
	local good, bad = {}, {}
	for _, t in targets do
		local st = stats(t)
		if st ~= nil and st.attempts > 0 and st.error_rate > limit then
			table.insert(bad, t)
		else
			table.insert(good, t)
		end
	end
	if #bad == 0 or #good == 0 then
		return targets
	end
	for _, t in bad do
		table.insert(good, t)
	end
	return good
end

function M.on_request(req)
	local name = req.model
	for _, r in cfg.rules do
		if rule_matches(r, req) then
			name = r.alias
			break
		end
	end
	local alias = cfg.aliases[name]
	if alias == nil then
		return nil
	end
	local healthy = {}
	for _, t in alias.targets do
		if weir.kv.get("open/" .. t.id) == nil then
			table.insert(healthy, t)
		end
	end
	if #healthy == 0 then
		-- Every breaker is open: try them all rather than fail without trying.
		healthy = alias.targets
	end
	local ordered = demote_erroring(order(alias, name, healthy))
	local targets = {}
	for i, t in ordered do
		table.insert(targets, { provider = t.provider, model = t.model })
		if not alias.fallback then
			break
		end
	end
	local primary = ordered[1]
	return {
		set_targets = targets,
		set_metadata = {
			["route.alias"] = name,
			["route.target"] = primary.id,
			["route.model"] = primary.model,
		},
	}
end

-- The breaker of target `id` after one attempt.
local function observe(id, ok)
	if ok then
		if weir.kv.get("fail/" .. id) ~= nil then
			weir.kv.delete("fail/" .. id)
		end
		return
	end
	local fails = weir.kv.incr("fail/" .. id, 1)
	if fails >= cfg.failure_threshold then
		weir.kv.set("open/" .. id, "1", cfg.cooldown_ms)
		weir.counter("breaker_opened", 1)
	end
end

-- What an attempt says about its target: "ok" (it answered, even a 4xx about the request),
-- "failed" (no answer, a broken one, a 5xx or a 429), or nil (nothing: the gateway did not
-- send it, `unsupported` or `internal`).
local function verdict(a)
	local e = a.error
	if e == nil then
		return "ok"
	elseif e == "unsupported" or e == "internal" then
		return nil
	elseif e == "status" and a.status ~= 0 and a.status < 500 and a.status ~= 429 then
		return "ok"
	end
	return "failed"
end

-- Feeds the breakers from what happened to a request this plugin routed.
function M.on_log(entry)
	local primary = entry.metadata["route.target"]
	if primary == nil then
		return
	end
	local attempts = entry.attempts
	if attempts ~= nil and #attempts > 0 then
		-- Every target tried, in order: retries and fallbacks each made an attempt.
		for _, a in attempts do
			local v = verdict(a)
			if v ~= nil then
				observe(a.provider .. "/" .. a.target_model, v == "ok")
			end
		end
		return
	end
	-- No attempts listed (a plugin answered, or a host that does not report them): judge by
	-- the target that served.
	local served = if entry.provider ~= "" then entry.provider .. "/" .. entry.target_model else nil
	if served ~= nil and served ~= primary then
		-- The primary failed over to a fallback.
		observe(primary, false)
	end
	local failed = entry.status >= 500 or entry.status == 429
	if served == nil and not failed then
		-- Answered by a plugin (a 402 from budget...): says nothing about the target.
		return
	end
	observe(served or primary, not failed)
end

return M
