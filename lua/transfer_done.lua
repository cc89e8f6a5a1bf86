-- transfer_done.lua: closes a transfer once the destination has been credited.
--
-- KEYS: 1 outbox hash of the source slot
-- ARGV: 1 transfer id
-- Returns: 1 removed, 0 not there (already closed).

return redis.call('HDEL', KEYS[1], ARGV[1])
