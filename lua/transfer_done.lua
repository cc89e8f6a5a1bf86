-- transfer_done.lua: closes a transfer once the destination has been credited.
--
-- KEYS: 1 outbox hash of the source slot   2 xcodes hash of the source slot (the codes the
--       transfer carried, if any)
-- ARGV: 1 transfer id
-- Returns: 1 removed, 0 not there (already closed).

redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
