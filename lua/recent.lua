-- recent.lua: the coupons of one user changed lately (claimed, or changed by a transition),
-- so that the wallet shows them at once, while the database has not caught up, or is down
-- (src/coupons/wallet.rs). The gateway touches a coupon here before it answers the claim or
-- the transition; a wallet read takes what was touched within the window and reads those
-- coupons' state from their shards. One hash slot: the user's own tag {w:<user>}.
--
-- KEYS: 1 recent  hash  coupon id -> when it was last touched (ms, the gateway's clock)
-- ARGV[1] = op, 2 the window (ms, > 0; the key lives that long after its last touch),
--   3 now (ms):
--   'touch'  4 the most coupons kept (> 0: past it the oldest are forgotten), 5.. coupon ids
--            (at least one)
--   'get'    (no more ARGV) reads the coupons touched within the window, and forgets older
--            ones
-- Returns:
--   touch: { 1 }
--   get:   { coupon id, touched ms, coupon id, touched ms, ... } (touched within the window)
-- A bad argument fails the call with an error reply, nothing written.

local call, tonumber, floor = redis.call, tonumber, math.floor
local A = ARGV

local function fail(msg) return redis.error_reply('ERR recent: ' .. msg) end
local function int(v) local n = tonumber(v); if n and n == floor(n) then return n end end

local op, window, now = A[1], int(A[2]), int(A[3])
if not window or window <= 0 then return fail('bad window') end
if not now or now < 0 then return fail('bad now') end
local stamp = string.format('%d', now)

if op == 'touch' then
  local cap = int(A[4])
  if not cap or cap <= 0 then return fail('bad cap') end
  if #A < 5 then return fail('touch takes at least one coupon id') end
  local pairs_ = {}
  for i = 5, #A do
    if A[i] == '' then return fail('empty coupon id') end
    pairs_[#pairs_ + 1] = A[i]
    pairs_[#pairs_ + 1] = stamp
  end
  call('HSET', KEYS[1], unpack(pairs_))
  call('PEXPIRE', KEYS[1], window)
  if call('HLEN', KEYS[1]) > cap then
    local all = call('HGETALL', KEYS[1])
    local items = {}
    for i = 1, #all, 2 do items[#items + 1] = { all[i], tonumber(all[i + 1]) or 0 } end
    table.sort(items, function(a, b) return a[2] > b[2] end)
    for i = cap + 1, #items do call('HDEL', KEYS[1], items[i][1]) end
  end
  return { 1 }
elseif op == 'get' then
  if #A ~= 3 then return fail('get takes no more arguments') end
  local all = call('HGETALL', KEYS[1])
  local out, old = {}, {}
  for i = 1, #all, 2 do
    local t = tonumber(all[i + 1]) or 0
    if t > now - window then
      out[#out + 1] = all[i]
      out[#out + 1] = t
    else
      old[#old + 1] = all[i]
    end
  end
  if #old > 0 then call('HDEL', KEYS[1], unpack(old)) end
  return out
end
return fail('unknown op')
