-- winners.lua: every user of one shard who claimed at least one coupon of the batch, with
-- their count. Read once per instance when a batch is sold out: from then on the set is
-- final, and a user outside it cannot be replaying a success, so their claims are answered
-- 410 from memory even when they carry a request id.
--
-- KEYS: 1 users hash of the shard (user -> coupons claimed)
-- ARGV: none
-- Returns: flat { user, count, ... }. Writes nothing.

return redis.call('HGETALL', KEYS[1])
