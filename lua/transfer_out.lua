-- transfer_out.lua: first half of a stock transfer; takes stock out of the source slot
-- and records it in the source's outbox. Idempotent per transfer id.
--
-- KEYS (one hash tag, the source slot):
--   1 stock   string stock of the source
--   2 outbox  hash   transfer id -> "<destination>|<amount>|<created ms>"
--   3 xseq    string transfer sequence of the source
--   4 meta    hash   the source's meta: a slot without it (lost, or fenced for repair) gives
--                    nothing (its stock may be stale: the repair writes it off)
-- ARGV:
--   1 transfer id   2 most to take (> 0)   3 destination (shard index)
--   4 '1' = take at most half of what the source holds (rounded up), '0' = no such cap
-- Returns: the amount moved out (0 = nothing to move, no outbox entry written). A repeated
--          transfer id returns the amount recorded the first time and writes nothing.

local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev then
  return tonumber(string.match(prev, '^[^|]*|(%d+)|'))
end
if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
local want = tonumber(ARGV[2])
if not want or want <= 0 then return redis.error_reply('ERR transfer_out: bad amount') end
local stock = tonumber(redis.call('GET', KEYS[1]) or '0')
local take = math.min(want, stock)
if ARGV[4] == '1' then take = math.min(take, math.ceil(stock / 2)) end
if take <= 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DECRBY', KEYS[1], take)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. '|' .. string.format('%d', take) .. '|' .. string.format('%d', now))
redis.call('INCR', KEYS[3])
return take
