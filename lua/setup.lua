-- setup.lua: create one slot of a batch (the pool or one shard). Idempotent.
-- A slot created here starts a fresh claim counter (coupon ids from .1), so the caller runs
-- it only for a batch whose setup never completed (the database records that): a batch
-- Redis lost is restored by restore.lua (rebuild), never set up again.
--
-- KEYS (one hash tag: {<batch>:pool} or {<batch>:<shard>}):
--   1 meta   hash   batch metadata (fields from ARGV), including 'fp', the definition fingerprint
--   2 stock  string stock held by this slot
--   3 deny   set    denied users whose home is this slot (may stay empty)
--   4 xseq   string transfer sequence of this slot (bumped whenever its stock moves)
-- ARGV:
--   1 initial stock of the slot (>= 0)
--   2 n = number of meta field/value pairs that follow
--   3 .. 2+2n  meta field/value pairs (must include 'fp' and 'state')
--   3+2n ..    denied user ids
-- Returns: 1 created; 0 already created with the same fingerprint (a retry);
--          -1 a different batch already owns this id.

local fp
local n = tonumber(ARGV[2])
if not n or n < 1 or #ARGV < 2 + 2 * n then return redis.error_reply('ERR setup: bad pair count') end
local initial = tonumber(ARGV[1])
if not initial or initial < 0 then return redis.error_reply('ERR setup: bad initial stock') end
for i = 3, 2 + 2 * n, 2 do
  if ARGV[i] == 'fp' then fp = ARGV[i + 1] end
end
if not fp then return redis.error_reply('ERR setup: missing fp') end

local existing = redis.call('HGET', KEYS[1], 'fp')
if existing then
  if existing == fp then return 0 end
  return -1
end

local pairs_ = {}
for i = 3, 2 + 2 * n do pairs_[#pairs_ + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(pairs_))
redis.call('SET', KEYS[2], initial)
redis.call('INCR', KEYS[4])
local first = 3 + 2 * n
if #ARGV >= first then
  local deny = {}
  for i = first, #ARGV do deny[#deny + 1] = ARGV[i] end
  redis.call('SADD', KEYS[3], unpack(deny))
end
return 1
