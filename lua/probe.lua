-- probe.lua: read-only view of one slot, for sold-out detection, conservation and stats.
--
-- KEYS (one hash tag):
--   1 stock  2 outbox  3 xseq  4 claimed  5 log  6 meta
-- ARGV: none
-- Returns: { stock, xseq, claimed, log length, oldest log entry id or '',
--            meta version (0 = slot missing), { outbox id, outbox value, ... } }

local stock = tonumber(redis.call('GET', KEYS[1]) or '0')
local xseq = tonumber(redis.call('GET', KEYS[3]) or '0')
local claimed = tonumber(redis.call('GET', KEYS[4]) or '0')
local loglen = redis.call('XLEN', KEYS[5])
local oldest = ''
if loglen > 0 then
  local first = redis.call('XRANGE', KEYS[5], '-', '+', 'COUNT', 1)
  if first[1] then oldest = first[1][1] end
end
local ver = tonumber(redis.call('HGET', KEYS[6], 'ver') or '0')
return { stock, xseq, claimed, loglen, oldest, ver, redis.call('HGETALL', KEYS[2]) }
