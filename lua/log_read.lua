-- log_read.lua: the persister's read of one shard's claim log (consumer group).
-- First takes over entries another consumer left pending for too long (XAUTOCLAIM), then
-- reads new ones. Creates the group at the log's start when it is missing (NOGROUP after a
-- Redis restart without the group): entries still in the log are not yet persisted.
--
-- KEYS: 1 log stream
-- ARGV: 1 group   2 consumer   3 count (> 0)   4 min idle ms before taking over
-- Returns: { { id, { field, value, ... } }, ... } (taken-over entries first); the fields are
--   claim.lua's claim record (see its header).

local count = tonumber(ARGV[3])
if not count or count <= 0 then return redis.error_reply('ERR log_read: bad count') end
local claimed = redis.pcall('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], '0-0', 'COUNT', count)
if type(claimed) == 'table' and claimed.err then
  if string.find(claimed.err, 'NOGROUP', 1, true) then
    redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
    claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], '0-0', 'COUNT', count)
  else
    return redis.error_reply(claimed.err)
  end
end
local out = {}
for _, e in ipairs(claimed[2]) do
  if e and e ~= false then out[#out + 1] = e end
end
local left = count - #out
if left > 0 then
  local fresh = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left, 'STREAMS', KEYS[1], '>')
  if fresh and fresh[1] then
    for _, e in ipairs(fresh[1][2]) do out[#out + 1] = e end
  end
end
return out
