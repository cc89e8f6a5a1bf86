-- coupon.lua: the state of the coupons minted on one shard, the source of truth of their
-- transitions (lock, redeem, release, refund, expiry, lock timeout). lua/claim.lua writes a
-- coupon's entry in the call that mints it; every change after that is a compare-and-set
-- here, on the entry's version, in the same call as the change record the persister writes
-- to the database. The gateway decides each change with the state machine
-- (src/domain/coupon.rs) on the entry it read, and sends the entry after it: so a change
-- applies only to the state it was decided on, and of two concurrent changes of one
-- version exactly one is written (the other is answered the entry as it is now, and
-- decided again). Atomic; one hash slot.
--
-- KEYS (all share the hash tag {<batch>:<shard>}):
--   1 meta     hash    the shard's metadata: absent while the shard is lost, sealed or under
--                      repair (then nothing is read or written here: -1)
--   2 coupons  hash    seq -> '<version>|<state>|<order>|<step>|<lock until>|<user>|
--                      <valid_from>|<valid_to>|<claimed_at>|<code>' (src/contract/coupon.rs)
--   3 log      stream  the shard's claim log: change records go after the claim records
-- ARGV[1] = op:
--   'get'  ARGV 2.. the seqs of 1 to 1000 coupons of the shard. Reads only.
--   'set'  ARGV 2 seq, 3 the version the change was decided on (an integer >= 0), 4 the
--          entry after the change (its version must be ARGV 3 + 1), 5 max log length (0 =
--          unbounded; the claim script's bound, so changes are shed like claims when the
--          persister is that far behind), 6.. the change record's field/value pairs (at
--          least one pair; src/contract/claim_record.rs change_fields).
-- Returns:
--   get:  { 1, entry or '' for each seq, in order }   { -1 } the shard has no meta
--   set:  { 1 } written (entry and change record)
--         { 0, entry } the entry is at another version now: decide again on this one
--         { 0, '' } the shard holds no such coupon
--         { -1 } the shard has no meta   { -9 } the log is at its bound: nothing written
-- A bad argument fails the call with an error reply, nothing written.

local call, tonumber, floor = redis.call, tonumber, math.floor
local A = ARGV

local function fail(msg) return redis.error_reply('ERR coupon: ' .. msg) end
local function seq_ok(s) return s and string.match(s, '^%d+$') ~= nil end

local op = A[1]
if op == 'get' then
  local n = #A - 1
  if n < 1 or n > 1000 then return fail('get takes 1 to 1000 seqs') end
  for i = 2, #A do
    if not seq_ok(A[i]) then return fail('bad seq') end
  end
  if call('EXISTS', KEYS[1]) ~= 1 then return { -1 } end
  local got = call('HMGET', KEYS[2], unpack(A, 2))
  local out = { 1 }
  for i = 1, n do out[i + 1] = got[i] or '' end
  return out
elseif op == 'set' then
  if #A < 7 or (#A - 5) % 2 ~= 0 then
    return fail('set expects seq, version, entry, max log and field/value pairs')
  end
  local seq, ver, entry = A[2], tonumber(A[3]), A[4]
  if not seq_ok(seq) then return fail('bad seq') end
  if not ver or ver < 0 or ver ~= floor(ver) then return fail('bad version') end
  local maxlog = tonumber(A[5])
  if not maxlog or maxlog < 0 or maxlog ~= floor(maxlog) then return fail('bad max log length') end
  local nv = tonumber(string.match(entry, '^(%d+)|'))
  if nv ~= ver + 1 then return fail('the entry after must be at the next version') end
  if call('EXISTS', KEYS[1]) ~= 1 then return { -1 } end
  local cur = call('HGET', KEYS[2], seq)
  if not cur then return { 0, '' } end
  if tonumber(string.match(cur, '^(%d+)|')) ~= ver then return { 0, cur } end
  if maxlog > 0 and call('XLEN', KEYS[3]) >= maxlog then return { -9 } end
  call('HSET', KEYS[2], seq, entry)
  call('XADD', KEYS[3], '*', unpack(A, 6))
  return { 1 }
end
return fail('unknown op')
