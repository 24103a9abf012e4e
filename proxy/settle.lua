-- Settlement: after the response, replace a request's reservation with what it used.
--
-- KEYS: as for admit.lua.
-- ARGV: 1 (unused)  2 request id  3 key id  4 reserved tokens  5 used tokens
--       6 used cost (micro-dollars)  7 settled-set lifetime ms
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
