-- patch.lua: bring one slot of a batch (the pool or one shard) to a version of its
-- definition. Idempotent and order-independent per version: the database assigns versions
-- (a compare-and-set on the batch row), each call carries the WHOLE state at its version and
-- the absolute total stock, and a slot applies a version only if it is newer than its own,
-- so repeats, retries and calls that arrive out of order converge on the newest version.
--
-- KEYS (one hash tag):
--   1 meta   hash   batch metadata
--   2 stock  string stock held by this slot
--   3 xseq   string transfer sequence of this slot
-- ARGV:
--   1 version: an integer > 0; applied only if greater than the slot's 'ver'
--   2 total stock of the batch at this version: on the pool, which owns the total, the
--     difference to its current total is added to its stock (a total never shrinks);
--     '' on shards (they hold no total)
--   3 .. field/value pairs to set in meta (the full metadata at this version; not 'ver',
--     'total', 'soldout', 'fp' or 'cap', which this script or others own)
-- Returns: { 1, version } applied; { 0, current version } stale or repeated version,
--          nothing written; { -1, 0 } no such batch in this slot;
--          { -2, current total } the total would shrink (nothing written);
--          { -3, cap } the total would pass the pool's 'cap' (the most stock the batch's
--          money budget pays for, written by setup/restore; nothing written).
-- Validates everything before the first write.

local ver = tonumber(ARGV[1])
if not ver or ver < 1 or ver ~= math.floor(ver) then
  return redis.error_reply('ERR patch: bad version')
end
if #ARGV < 2 or (#ARGV - 2) % 2 ~= 0 then return redis.error_reply('ERR patch: odd field list') end
local total
if ARGV[2] ~= '' then
  total = tonumber(ARGV[2])
  if not total or total < 0 or total ~= math.floor(total) then
    return redis.error_reply('ERR patch: bad total')
  end
end
for i = 3, #ARGV, 2 do
  local f = ARGV[i]
  if f == 'ver' or f == 'total' or f == 'soldout' or f == 'fp' or f == 'cap' then
    return redis.error_reply('ERR patch: field ' .. f .. ' is not settable')
  end
end

local cur = redis.call('HGET', KEYS[1], 'ver')
if not cur then return { -1, 0 } end
cur = tonumber(cur) or 0
if ver <= cur then return { 0, cur } end

local add = 0
if total then
  local had = tonumber(redis.call('HGET', KEYS[1], 'total'))
  if not had then return redis.error_reply('ERR patch: this slot holds no total') end
  if total < had then return { -2, had } end
  local cap = tonumber(redis.call('HGET', KEYS[1], 'cap'))
  if cap and total > cap then return { -3, cap } end
  add = total - had
end

if #ARGV > 2 then
  local kv = {}
  for i = 3, #ARGV do kv[#kv + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(kv))
end
redis.call('HSET', KEYS[1], 'ver', string.format('%d', ver))
if add > 0 then
  redis.call('INCRBY', KEYS[2], add)
  redis.call('HSET', KEYS[1], 'total', string.format('%d', total))
  redis.call('HSET', KEYS[1], 'soldout', '0')
  redis.call('INCR', KEYS[3])
end
return { 1, ver }
