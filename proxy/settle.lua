-- Settlement: after the response, replace a request's reservation with what it used.
--
-- KEYS: as for admit.lua (11 and 12 for a key that had a credit limit when admitted).
-- ARGV: 1 (unused)  2 request id  3 key id  4 reserved tokens  5 used tokens
--       6 used cost (micro-dollars)  7 settled-set lifetime ms
--       with keys 11 and 12: 8 the cost reserved against the key's limit
--
-- A credit-limited key's spend counts the real cost in the period the request settles
-- in (every period at once: day, week, month, total), and its hold is released; a
-- request admitted without a hold (Redis unreachable, or the hold outlived the
-- in-flight lifetime) is counted all the same.
--
-- Idempotent: a request settles once (the settled set remembers it), so a retried call
-- cannot refund or charge twice. A request with no reservation on record (admitted
-- while Redis was unreachable, or reserved before Redis lost its data) is charged its
-- cost directly, so the live balance still ends equal to the ledger.
-- Returns the balance after settlement, or false when no account state exists.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, kid = ARGV[2], ARGV[3]
local reserved, used = tonumber(ARGV[4]), tonumber(ARGV[5])
local cost = tonumber(ARGV[6])

redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now - tonumber(ARGV[7]))
if redis.call('ZSCORE', KEYS[10], id) then
  return tonumber(redis.call('HGET', KEYS[1], 'bal') or '0')
end
redis.call('ZADD', KEYS[10], now, id)
redis.call('PEXPIRE', KEYS[10], tonumber(ARGV[7]))

redis.call('ZREM', KEYS[7], id)
redis.call('ZREM', KEYS[8], id)

-- Tokens: swap the reserved amount for the used one, keeping the entry's time.
local old, new = id .. ':' .. reserved, id .. ':' .. used
for _, c in ipairs({{KEYS[4], 'a'}, {KEYS[5], 'k:' .. kid}}) do
  local at = redis.call('ZSCORE', c[1], old)
  if at then
    redis.call('ZREM', c[1], old)
    redis.call('ZADD', c[1], at, new)
    redis.call('HINCRBY', KEYS[6], c[2], used - reserved)
  end
end

if #KEYS >= 12 then
  -- The same periods as admit.lua's (the tests hold the two to spend_periods).
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
  local day, week, month = periods(tonumber(t[1]))
  local f = redis.call('HMGET', KEYS[11], 'day', 'week', 'month', 'spent_day', 'spent_week',
                       'spent_month', 'spent_total', 'held')
  local function spent(at, now_id, v)
    if tonumber(at) == now_id then return (tonumber(v) or 0) + cost end
    return cost
  end
  local kheld = tonumber(f[8]) or 0
  if redis.call('ZREM', KEYS[12], id .. ':' .. ARGV[8]) == 1 then
    kheld = math.max(0, kheld - tonumber(ARGV[8]))
  end
  redis.call('HSET', KEYS[11], 'day', day, 'week', week, 'month', month,
             'spent_day', spent(f[1], day, f[4]), 'spent_week', spent(f[2], week, f[5]),
             'spent_month', spent(f[3], month, f[6]),
             'spent_total', (tonumber(f[7]) or 0) + cost, 'held', kheld)
end

-- The reservation goes whether or not the state exists: a rebuild (ledger minus
-- reservations) must not subtract a request that is already settled.
local held = redis.call('HGET', KEYS[9], id)
if held then redis.call('HDEL', KEYS[9], id) end
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if held then
  return redis.call('HINCRBY', KEYS[1], 'bal', tonumber(held) - cost)
end
-- "0 - cost", not "-cost": Lua's -0 becomes the string "-0", which Redis 7.0 refuses
-- as an integer (Valkey accepts it).
return redis.call('HINCRBY', KEYS[1], 'bal', 0 - cost)
