-- Admission: check and reserve in one atomic step, for one request of one key.
--
-- KEYS (all under the account's hash tag, see shared/redis_names.admission_keys):
--   1 state   2 req:a  3 req:k  4 tok:a  5 tok:k  6 toktot  7 conc:a  8 conc:k
--   9 resv   10 settled
--   and, only for a key with a credit limit: 11 kspend (the key's spend per period)
--   12 kspend:held (its reservations in flight)
-- ARGV: 1 mode: 0 admit, 1 count only  2 request id  3 key id  4 window_ms  5 key rpm  6 key tpm
--       7 key conc  8 tokens to reserve  9 cost to reserve (micro-dollars)
--       10 in-flight lifetime ms (a crashed proxy's slots free themselves after it)
--       with keys 11 and 12: 11 the key's credit limit (micro-dollars)  12 the period it
--       holds for: day | week | month | total (no reset)
--
-- Time is Redis's own clock, so every proxy in the fleet shares one, whatever the
-- skew between their hosts.
--
-- Request and token limits are sliding logs over the last window: a request is
-- admitted only if the window ending now holds fewer than `rpm` requests and at most
-- `tpm` tokens with it. Token log members are "<id>:<tokens>" so an expired entry
-- says what to subtract from the running total.
--
-- Count only (mode 1) is for a request refused before admission (unknown model, bad
-- body) after its key authenticated: it takes a place in the request windows, so
-- refusals are not free, and reserves nothing (no tokens, concurrency or credit), so
-- there is nothing to settle.
--
-- Returns {0, rpm_limit, rpm_left, rpm_reset_ms, tpm_limit, tpm_left, tpm_reset_ms}
--      or {1, which, retry_ms}   rate limited (which: "requests"|"tokens"|"concurrency")
--      or {2, balance}           insufficient credit
--      or {3}                    account suspended
--      or {4}                    no account state published (caller degrades)
--      or {5, remaining}         the key's credit limit for its period does not cover it
--
-- A key's credit limit: the request's cost must fit in limit - spent in the current
-- period - reserved by requests in flight. Periods follow Redis's clock in UTC (days
-- from midnight, weeks from Monday, months from the 1st); the kspend hash keeps every
-- period's spend and rolls a period over in place when it ends, so old periods leave
-- nothing behind and changing a limit, or its reset, never resets what was spent.
-- Keys without a credit limit pass neither key nor argument, and cost what they did.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, kid = ARGV[2], ARGV[3]
local window = tonumber(ARGV[4])
local cutoff = now - window
local tokens, cost = tonumber(ARGV[8]), tonumber(ARGV[9])
local count_only = ARGV[1] == '1'

local st = redis.call('HMGET', KEYS[1], 'bal', 'status', 'rpm', 'tpm', 'conc')
if not st[1] then return {4} end
if st[2] == 'suspended' then return {3} end

-- A retried call for a request already admitted changes nothing.
if redis.call('HEXISTS', KEYS[9], id) == 1 or redis.call('ZSCORE', KEYS[2], id)
    or redis.call('ZSCORE', KEYS[10], id) then
  return {0, 0, -1, 0, 0, -1, 0}
end

-- A key with a credit limit (and a request that costs something): its spend is read
-- and checked here; a key without one pays for none of this, not even the closures.
local klimit = #KEYS >= 12 and not count_only and cost > 0 and tonumber(ARGV[11]) or nil
local key_credit_check, key_credit_reserve
if klimit then
  -- Days, Monday weeks and months since the epoch, UTC (months: civil_from_days, after
  -- Howard Hinnant). shared/redis_names.spend_periods computes the same in Python.
  local function periods(secs)
    local day = math.floor(secs / 86400)
    local z = day + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                            - math.floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    local m = mp < 10 and mp + 3 or mp - 9
    local y = yoe + era * 400
    if m <= 2 then y = y + 1 end
    return day, math.floor((day + 3) / 7), y * 12 + m - 1
  end

  local spend  -- the key's spend, its ended periods rolled over to 0 (not yet in Redis)

  -- Refuses ({5, remaining}) when the limit does not cover `cost`. The hold of a
  -- request whose proxy died before settling frees itself after the in-flight lifetime.
  key_credit_check = function()
    local stale = redis.call('ZRANGEBYSCORE', KEYS[12], '-inf', now)
    local freed = 0
    for _, m in ipairs(stale) do freed = freed + tonumber(string.match(m, ':(%d+)$')) end
    if #stale > 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[12], '-inf', now)
      redis.call('HINCRBY', KEYS[11], 'held', 0 - freed)
    end
    local f = redis.call('HMGET', KEYS[11], 'day', 'week', 'month', 'spent_day',
                         'spent_week', 'spent_month', 'spent_total', 'held')
    local day, week, month = periods(tonumber(t[1]))
    spend = {day = day, week = week, month = month, spent_total = tonumber(f[7]) or 0,
             held = math.max(0, tonumber(f[8]) or 0)}
    spend.spent_day = tonumber(f[1]) == day and (tonumber(f[4]) or 0) or 0
    spend.spent_week = tonumber(f[2]) == week and (tonumber(f[5]) or 0) or 0
    spend.spent_month = tonumber(f[3]) == month and (tonumber(f[6]) or 0) or 0
    local left = klimit - (spend['spent_' .. ARGV[12]] or spend.spent_total) - spend.held
    if cost > left then return {5, left} end
    return nil
  end

  key_credit_reserve = function()
    -- The member names the cost as sent, so settle (given the same string) finds it.
    -- No TTL on the holds: one lapsing unseen would leave `held` counting it for ever;
    -- settled and lapsed holds leave the set, so it holds only requests in flight.
    redis.call('ZADD', KEYS[12], now + tonumber(ARGV[10]), id .. ':' .. ARGV[9])
    redis.call('HSET', KEYS[11], 'day', spend.day, 'week', spend.week, 'month', spend.month,
               'spent_day', spend.spent_day, 'spent_week', spend.spent_week,
               'spent_month', spend.spent_month, 'spent_total', spend.spent_total,
               'held', spend.held + cost)
  end
end

local function lim(v) v = tonumber(v) or 0; if v > 0 then return v end; return nil end
local a_rpm, a_tpm, a_conc = lim(st[3]), lim(st[4]), lim(st[5])
local k_rpm, k_tpm, k_conc = lim(ARGV[5]), lim(ARGV[6]), lim(ARGV[7])
local bal = tonumber(st[1])

-- No limit applies to this key or account: credit is the only check, and no log is
-- kept (settlement finds nothing to swap or free, which it tolerates).
if not (a_rpm or a_tpm or a_conc or k_rpm or k_tpm or k_conc) then
  if cost > 0 then
    if bal < cost then return {2, bal} end
    if klimit then
      local refused = key_credit_check()
      if refused then return refused end
      key_credit_reserve()
    end
    redis.call('HINCRBY', KEYS[1], 'bal', 0 - cost)
    redis.call('HSET', KEYS[9], id, cost)
  end
  return {0, -1, -1, 0, -1, -1, 0}
end

local function expire_tokens(log, field)
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  if #old == 0 then return end
  local sum = 0
  for _, m in ipairs(old) do sum = sum + tonumber(string.match(m, ':(%d+)$')) end
  redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
  redis.call('HINCRBY', KEYS[6], field, 0 - sum)
end

redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', cutoff)
expire_tokens(KEYS[4], 'a')
expire_tokens(KEYS[5], 'k:' .. kid)
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', now)

-- Concurrency (a counted refusal holds no slot).
for _, c in ipairs({{KEYS[7], a_conc}, {KEYS[8], k_conc}}) do
  if c[2] and not count_only and redis.call('ZCARD', c[1]) >= c[2] then
    return {1, 'concurrency', 1000}
  end
end

-- Requests per window: full when the log holds `limit` entries; the oldest one's
-- expiry is when a place frees up.
local function req_check(log, limit)
  if not limit then return nil end
  local n = redis.call('ZCARD', log)
  if n < limit then return nil end
  local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  return tonumber(oldest[2]) + window - now
end
for _, c in ipairs({{KEYS[2], a_rpm}, {KEYS[3], k_rpm}}) do
  local wait = req_check(c[1], c[2])
  if wait then return {1, 'requests', wait} end
end

-- Tokens per window: the wait is until enough of the oldest entries expire.
local function tok_check(log, field, limit)
  if not limit then return nil end
  local used = tonumber(redis.call('HGET', KEYS[6], field) or '0')
  if used + tokens <= limit then return nil end
  if tokens > limit then return window end
  local need = used + tokens - limit
  local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    need = need - tonumber(string.match(entries[i], ':(%d+)$'))
    if need <= 0 then return tonumber(entries[i + 1]) + window - now end
  end
  return window
end
local tok_fields = {{KEYS[4], 'a', a_tpm}, {KEYS[5], 'k:' .. kid, k_tpm}}
for _, c in ipairs(tok_fields) do
  local wait = not count_only and tok_check(c[1], c[2], c[3])
  if wait then return {1, 'tokens', wait} end
end

-- Credit: the reservation must be covered by the live balance.
if cost > 0 and bal < cost then return {2, bal} end
if klimit then
  local refused = key_credit_check()
  if refused then return refused end
end

-- Admitted: record everything (a counted refusal only its place in the windows).
redis.call('ZADD', KEYS[2], now, id)
redis.call('ZADD', KEYS[3], now, id)
if not count_only then
  local member = id .. ':' .. tokens
  redis.call('ZADD', KEYS[4], now, member)
  redis.call('ZADD', KEYS[5], now, member)
  redis.call('HINCRBY', KEYS[6], 'a', tokens)
  redis.call('HINCRBY', KEYS[6], 'k:' .. kid, tokens)
  local lifetime = tonumber(ARGV[10])
  redis.call('ZADD', KEYS[7], now + lifetime, id)
  redis.call('ZADD', KEYS[8], now + lifetime, id)
  redis.call('PEXPIRE', KEYS[7], lifetime)
  redis.call('PEXPIRE', KEYS[8], lifetime)
  if cost > 0 then
    redis.call('HINCRBY', KEYS[1], 'bal', 0 - cost)
    redis.call('HSET', KEYS[9], id, cost)
  end
  if klimit then key_credit_reserve() end
end
for _, k in ipairs({KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}) do
  redis.call('PEXPIRE', k, window * 2)
end

-- What is left, for the x-ratelimit-* headers: the tighter of key and account.
local function tighter(a, k, log_a, log_k, used_a, used_k)
  local best_lim, best_left, best_log = -1, -1, nil
  for _, c in ipairs({{a, log_a, used_a}, {k, log_k, used_k}}) do
    if c[1] then
      local left = c[1] - c[3]
      if best_left < 0 or left < best_left then best_lim, best_left, best_log = c[1], left, c[2] end
    end
  end
  local reset = 0
  if best_log then
    local oldest = redis.call('ZRANGE', best_log, 0, 0, 'WITHSCORES')
    if oldest[2] then reset = tonumber(oldest[2]) + window - now end
  end
  return best_lim, best_left, reset
end
local ra = redis.call('ZCARD', KEYS[2])
local rk = redis.call('ZCARD', KEYS[3])
local r_lim, r_left, r_reset = tighter(a_rpm, k_rpm, KEYS[2], KEYS[3], ra, rk)
local ta = tonumber(redis.call('HGET', KEYS[6], 'a') or '0')
local tk = tonumber(redis.call('HGET', KEYS[6], 'k:' .. kid) or '0')
local t_lim, t_left, t_reset = tighter(a_tpm, k_tpm, KEYS[4], KEYS[5], ta, tk)
return {0, r_lim, r_left, r_reset, t_lim, t_left, t_reset}
