-- log_ack.lua: acknowledges persisted claim records and removes them from the log,
-- so Redis memory stays bounded. Call only after the database transaction committed.
--
-- KEYS: 1 log stream
-- ARGV: 1 group   2 .. entry ids
-- Returns: number of entries removed.

if #ARGV < 2 then return 0 end
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
return redis.call('XDEL', KEYS[1], unpack(ids))
