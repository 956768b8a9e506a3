-- routing: model aliases, weighted / latency / cost / priority choice, fallback chains,
-- conditional routes and per-target circuit breakers. Full reference: README.md.
--
-- For a request whose model is an alias (or that a rule sends to one), the plugin orders the
-- alias's targets by its strategy, skips targets whose breaker is open, and hands the list to
-- the gateway with `set_targets`: the first is tried first, the others are the fallback chain
-- the gateway walks on errors, timeouts and 429s.
--
-- Health, per target `<provider>/<model>`, in the plugin's namespace, fed by on_log:
--   lat/<t>    EWMA of latency (ms)          err/<t>   EWMA of the error rate (0..1)
--   fail/<t>   consecutive failures          open/<t>  present while the breaker is open (TTL)
-- A failure is a 5xx or 429 from the target, or the target being skipped over for a
-- fallback (the served target differs from the primary the plugin chose).

local M = {}

local cfg = {
	aliases = {},
	rules = {},
	prices = {},
	failure_threshold = 5,
	cooldown_ms = 30000,
	ewma_alpha = 0.3,
	error_penalty_ms = 2000,
}

local STRATEGIES = { weighted = true, latency = true, cost = true, priority = true }

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
	assert(STRATEGIES[strategy], where .. ".strategy must be weighted, latency, cost or priority")
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
			assert(type(v) == "number" and v > 0 and v <= 1, "ewma_alpha must be in (0, 1]")
			cfg.ewma_alpha = v
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
		if req.headers[name] ~= value then
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

local function num(v, default)
	if v == nil then
		return default
	end
	return tonumber(v) or default
end

-- The price of a target (input + output per 1M tokens) for the cost strategy.
local function price(t)
	return cfg.prices[t.id] or cfg.prices[t.model] or math.huge
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
		if s == "latency" then
			-- Unknown targets score 0 so they get tried; errors cost a fixed penalty.
			local lat = num(weir.kv.get("lat/" .. t.id), 0)
			local err = num(weir.kv.get("err/" .. t.id), 0)
			score[t.id] = lat + err * cfg.error_penalty_ms + i * 1e-6
		else
			score[t.id] = price(t) + i * 1e-9
		end
	end
	local out = table.clone(targets)
	table.sort(out, function(a, b)
		return score[a.id] < score[b.id]
	end)
	return out
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
	local ordered = order(alias, name, healthy)
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

local function observe(id, ok, latency_ms)
	local a = cfg.ewma_alpha
	if latency_ms ~= nil then
		local lat = num(weir.kv.get("lat/" .. id), nil)
		lat = if lat == nil then latency_ms else lat + a * (latency_ms - lat)
		weir.kv.set("lat/" .. id, string.format("%.3f", lat))
	end
	local err = num(weir.kv.get("err/" .. id), 0)
	err += a * ((if ok then 0 else 1) - err)
	weir.kv.set("err/" .. id, string.format("%.4f", err))
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

-- Feeds health from what happened to the request.
function M.on_log(entry)
	local primary = entry.metadata["route.target"]
	if primary == nil then
		return
	end
	local served = if entry.provider ~= "" then entry.provider .. "/" .. entry.target_model else nil
	if served ~= nil and served ~= primary then
		-- The primary failed over to a fallback.
		observe(primary, false, nil)
	end
	local failed = entry.status >= 500 or entry.status == 429
	if served == nil and not failed then
		-- Answered by a plugin (a 402 from budget...): says nothing about the target.
		return
	end
	-- Latency only from successful answers (time to first token for streams), so timeouts
	-- do not look like slow successes.
	local latency = if entry.stream then entry.ttft_ms else entry.latency_ms
	observe(served or primary, not failed, if failed then nil else latency)
end

return M
