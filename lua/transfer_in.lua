-- transfer_in.lua: second half of a stock transfer; credits the destination slot once.
--
-- KEYS (one hash tag, the destination slot):
--   1 stock   string stock of the destination
--   2 inbox   string marker "<transfer id> was credited" (key name carries the transfer id)
--   3 xseq    string transfer sequence of the destination
-- ARGV:
--   1 amount (> 0)   2 marker lifetime in seconds (> 0)
-- Returns: 1 credited now; 0 already credited earlier (nothing written).

local amount = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
if not amount or amount <= 0 then return redis.error_reply('ERR transfer_in: bad amount') end
if not ttl or ttl <= 0 then return redis.error_reply('ERR transfer_in: bad ttl') end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('INCRBY', KEYS[1], amount)
redis.call('SET', KEYS[2], ARGV[1], 'EX', ttl)
redis.call('INCR', KEYS[3])
return 1
