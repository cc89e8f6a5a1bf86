-- inbox_check.lua: was a transfer credited at its destination?
--
-- KEYS: 1 inbox marker of the destination slot for the transfer id
-- ARGV: none
-- Returns: 1 credited, 0 not credited.

return redis.call('EXISTS', KEYS[1])
