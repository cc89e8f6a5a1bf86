-- patch.lua: apply a batch change (pause/resume, window end, added stock) to one slot.
--
-- KEYS (one hash tag):
--   1 meta   hash   batch metadata
--   2 stock  string stock held by this slot
--   3 xseq   string transfer sequence of this slot
-- ARGV:
--   1 version: '+' = next version of this slot (used on the pool, which owns the
--     version), or an explicit version (used on shards; applied only if newer)
--   2 stock to add to this slot (>= 0; only the pool is given stock)
--   3 .. field/value pairs to set in meta (may be none)
-- Returns: { 1, version } applied; { 0, version } stale or repeated version, nothing written;
--          { -1, 0 } no such batch in this slot.

local cur = redis.call('HGET', KEYS[1], 'ver')
if not cur then return { -1, 0 } end
cur = tonumber(cur)
local add = tonumber(ARGV[2])
if not add or add < 0 then return redis.error_reply('ERR patch: bad stock') end
if (#ARGV - 2) % 2 ~= 0 then return redis.error_reply('ERR patch: odd field list') end
local ver
if ARGV[1] == '+' then
  ver = cur + 1
else
  ver = tonumber(ARGV[1])
  if not ver then return redis.error_reply('ERR patch: bad version') end
  if ver <= cur then return { 0, cur } end
end

if #ARGV > 2 then
  local kv = {}
  for i = 3, #ARGV do kv[#kv + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(kv))
end
redis.call('HSET', KEYS[1], 'ver', ver)
if add > 0 then
  redis.call('INCRBY', KEYS[2], add)
  redis.call('HINCRBY', KEYS[1], 'total', add)
  redis.call('HSET', KEYS[1], 'soldout', '0')
  redis.call('INCR', KEYS[3])
end
return { 1, ver }
