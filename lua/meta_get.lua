-- meta_get.lua: the whole metadata hash of one slot.
--
-- KEYS: 1 meta hash
-- ARGV: none
-- Returns: flat { field, value, ... } (empty when the slot does not exist)

return redis.call('HGETALL', KEYS[1])
