-- mark_soldout.lua: records "sold out" on the pool, unless stock was added meanwhile.
--
-- KEYS: 1 pool meta hash   2 pool xseq
-- ARGV: 1 the pool's xseq seen by the caller's sold-out scan
-- Returns: 1 marked; 0 the pool's stock moved since the scan (not marked); -1 no batch.

if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local xseq = tonumber(redis.call('GET', KEYS[2]) or '0')
if xseq ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'soldout', '1')
return 1
