-- claim.lua: one claim against the user's home shard of a batch. Atomic; one hash slot.
--
-- KEYS (all share the hash tag {<batch>:<shard>}):
--   1 meta     hash   state, start, end, limit, daily, vdays, vfrom, vto, ver, epoch (the
--                     coupon-id epoch, absent = 0: bumped, durably first, by every rebuild)
--   2 stock    string coupons left in this shard
--   3 users    hash   user -> coupons claimed from this batch (per-user limit)
--   4 daily    hash   user -> "<local day>:<count>" (per-user daily limit; the day number in
--                     the batch's zone, see ARGV 7)
--   5 req      hash   "<user>|<request id>" -> "<coupon>|<valid_from>|<valid_to>|<claimed_at>|<nonce>"
--   6 log      stream claim records for the persister
--   7 deny     set    users of this shard denied by the batch's eligibility rules
--   8 claimed  string coupons claimed from this shard (also the coupon sequence)
-- ARGV:
--   1 user id   2 request id ('' = none)   3 max log length (0 = unbounded)
--   4 batch id  5 shard index
--   6 nonce of this HTTP request (recorded with the request id, returned on replay, so a
--     caller that repeats its own call after a lost reply can tell it minted the coupon)
--   7 (optional, absent = '0') the batch's UTC offset in ms now (an integer, |offset| <
--     86400000; east positive): the day is floor((now + offset) / 86400000), now from TIME,
--     so the per-user daily limit resets at midnight in the batch's time zone ('0' = UTC,
--     as before this argument existed). The gateway computes the offset for its own clock's
--     now (src/domain/time.rs Zone). Edge: on a day a DST change happens, the offset passed
--     can be the one before the change for claims right after it (gateway and Redis clocks
--     differ by ms). Most zones change at 01:00 to 03:00 local, far from midnight, so the
--     day a claim counts on is the same with either offset; in the few that change at
--     midnight (America/Santiago, Asia/Beirut, ...) a claim in the milliseconds after the
--     change may count on the day before it.
-- Returns:
--   { 1, coupon_id, valid_from_ms, valid_to_ms, claimed_at_ms }   claimed now
--   { 2, coupon_id, valid_from_ms, valid_to_ms, claimed_at_ms, nonce }   replay of an earlier
--                                                    request id ('' nonce if none recorded)
--   { 0, code } refused, nothing written; code:
--     -1 no such batch in this shard   -2 window not started   -3 window ended
--     -4 paused   -5 user denied   -6 per-user limit   -7 per-user daily limit
--     -8 shard has no stock (the caller refills or declares sold out). This is also the
--        budget check: a batch with a money budget has at most floor(budget / face value)
--        stock in all (src/domain/batch.rs), so each shard's stock is its share of the
--        budget, and decrementing only stock that is there never spends past it.
--     -9 claim log backlog at its bound (shed, nothing claimed)
-- Validates everything before the first write: a script that errors half-way keeps its writes.
-- Coupon id: '<batch>.<shard>.<seq>', seq = epoch * 10^12 + KEYS[8] after INCR (1, 2, ...).
--   The claim counter never goes back while Redis keeps it; a Redis that lost it (data loss,
--   a failover to a lagging replica) is rebuilt in a new epoch, so an id minted before the
--   loss is never minted again (src/domain/ids.rs EPOCH_SPAN is the same 10^12).
-- Claim record: one XADD to KEYS[6] per coupon minted, these fields in this order:
--   k 'claimed'   c coupon id   u user id   r request id ('' = none)   b batch id
--   s shard index   t claimed at (ms)   vf valid from (ms)   vt valid to (ms)

if (#ARGV ~= 6 and #ARGV ~= 7) or not tonumber(ARGV[3]) then
  return redis.error_reply('ERR claim: expects 6 or 7 arguments (user, request id, max log, batch, shard, nonce[, day offset])')
end
local offset = tonumber(ARGV[7] or '0')
if not offset or offset ~= math.floor(offset) or offset <= -86400000 or offset >= 86400000 then
  return redis.error_reply('ERR claim: the day offset must be an integer of ms, |offset| < 86400000')
end
local user, rid = ARGV[1], ARGV[2]
local m = redis.call('HMGET', KEYS[1], 'state', 'start', 'end', 'limit', 'daily', 'vdays', 'vfrom',
  'vto', 'epoch')
if not m[1] then return { 0, -1 } end

local reqf
if rid ~= '' then
  reqf = user .. '|' .. rid
  local prev = redis.call('HGET', KEYS[5], reqf)
  if prev then
    local c, vf, vt, at, nonce = string.match(prev, '^([^|]*)|(%d+)|(%d+)|(%d+)|?([^|]*)$')
    return { 2, c, tonumber(vf), tonumber(vt), tonumber(at), nonce or '' }
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if m[1] ~= 'active' then return { 0, -4 } end
if now < tonumber(m[2]) then return { 0, -2 } end
if now >= tonumber(m[3]) then return { 0, -3 } end
if redis.call('SISMEMBER', KEYS[7], user) == 1 then return { 0, -5 } end

local used = tonumber(redis.call('HGET', KEYS[3], user) or '0')
if used >= tonumber(m[4]) then return { 0, -6 } end

local daily = tonumber(m[5])
local day = math.floor((now + offset) / 86400000)
local today = 0
if daily > 0 then
  local d = redis.call('HGET', KEYS[4], user)
  if d then
    local dd, cnt = string.match(d, '^(%d+):(%d+)$')
    if tonumber(dd) == day then today = tonumber(cnt) end
  end
  if today >= daily then return { 0, -7 } end
end

local maxlog = tonumber(ARGV[3])
if maxlog > 0 and redis.call('XLEN', KEYS[6]) >= maxlog then return { 0, -9 } end

local stock = tonumber(redis.call('GET', KEYS[2]) or '0')
if stock <= 0 then return { 0, -8 } end

-- every check passed: write
redis.call('DECR', KEYS[2])
local seq = redis.call('INCR', KEYS[8]) + (tonumber(m[9] or '0') or 0) * 1000000000000
local coupon = ARGV[4] .. '.' .. ARGV[5] .. '.' .. string.format('%d', seq)
local vf, vt
local vdays = tonumber(m[6])
if vdays > 0 then
  vf = now
  vt = now + vdays * 86400000
else
  vf = tonumber(m[7])
  vt = tonumber(m[8])
end
local sf, st, sn = string.format('%d', vf), string.format('%d', vt), string.format('%d', now)
redis.call('HINCRBY', KEYS[3], user, 1)
if daily > 0 then
  redis.call('HSET', KEYS[4], user, string.format('%d:%d', day, today + 1))
end
if reqf then
  redis.call('HSET', KEYS[5], reqf, coupon .. '|' .. sf .. '|' .. st .. '|' .. sn .. '|' .. ARGV[6])
end
redis.call('XADD', KEYS[6], '*', 'k', 'claimed', 'c', coupon, 'u', user, 'r', rid,
  'b', ARGV[4], 's', ARGV[5], 't', sn, 'vf', sf, 'vt', st)
return { 1, coupon, vf, vt, now }
