-- retire.lua: drops every key of one slot of a batch whose claim window ended long ago
-- (src/recovery/retire.rs): the database is the batch's record from then on (wallet,
-- replays, transitions, reconcile read it), and Redis holds nothing of it. Called on each
-- shard first, then on the pool (whose meta makes the batch visible in Redis), after the
-- database marked the batch retired. Atomic; one hash slot. Nothing is dropped unless
-- everything the slot holds is already in the database: the checks come first, then the
-- deletes (a script that errors half-way keeps its writes).
--
-- KEYS (all share the hash tag {<batch>:pool} or {<batch>:<shard>}):
--   1 meta  hash    2 stock  string   3 users  hash    4 daily  hash   5 req  hash
--   6 deny  set     7 claimed string  8 xseq   string  9 outbox hash  10 log  stream
--   11 repair string  12 codes hash   13 xcodes hash   14 coupons hash  15 ack  string
--   16 loads  set     17 req2 hash (the second request-id generation, lua/rotate.lua)
-- ARGV: none (retire), or 1 'check' (only the checks: nothing is written; what the pass
--   asks of the pool before it drops any shard, so no open transfer from the pool lands on
--   a shard already dropped).
-- Returns { code, n }:
--   { 2, 0 }              'check': the slot could be retired now
--   { 1, keys deleted }   retired now (also when only some keys were left: n counts them)
--   { 0, 0 }              nothing left: the slot was retired before (idempotent)
--   { -1, log length }    the log holds records the database may not have: nothing dropped
--   { -2, open transfers } the outbox holds transfers not yet settled: nothing dropped
--   { -3, 0 }             a repairer holds the slot's repair lock: nothing dropped

local check = ARGV[1] == 'check'
if #ARGV > 1 or (#ARGV == 1 and not check) then
  return redis.error_reply('ERR retire: takes no argument, or check')
end

local xlen = redis.call('XLEN', KEYS[10])
if xlen > 0 then return { -1, xlen } end
local open = redis.call('HLEN', KEYS[9])
if open > 0 then return { -2, open } end
if redis.call('EXISTS', KEYS[11]) == 1 then return { -3, 0 } end
if check then return { 2, 0 } end

local n = 0
for i = 1, #KEYS do
  n = n + redis.call('UNLINK', KEYS[i])
end
if n == 0 then return { 0, 0 } end
return { 1, n }
