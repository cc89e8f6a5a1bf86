-- transfer_in.lua: second half of a stock transfer; credits the destination slot once.
--
-- KEYS (one hash tag, the destination slot):
--   1 stock   string stock of the destination
--   2 inbox   string marker "<transfer id> was credited" (key name carries the transfer id)
--   3 xseq    string transfer sequence of the destination
--   4 codes   hash   the destination's code queue (lua/claim.lua KEYS[9])
-- ARGV:
--   1 amount (> 0)   2 marker lifetime in seconds (> 0)
--   3 the codes that came with the stock, joined by ',' ('' = the batch has no codes;
--     otherwise exactly `amount` of them), appended to the tail of the queue in blocks of
--     at most 64
-- Returns: 1 credited now; 0 already credited earlier (nothing written).

local amount = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
if not amount or amount <= 0 then return redis.error_reply('ERR transfer_in: bad amount') end
if not ttl or ttl <= 0 then return redis.error_reply('ERR transfer_in: bad ttl') end
local codes, blob = {}, ARGV[3] or ''
if blob ~= '' then
  for c in string.gmatch(blob, '[^,]+') do codes[#codes + 1] = c end
  if #codes ~= amount then
    return redis.error_reply('ERR transfer_in: ' .. #codes .. ' codes for ' .. amount .. ' stock')
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('INCRBY', KEYS[1], amount)
redis.call('SET', KEYS[2], ARGV[1], 'EX', ttl)
redis.call('INCR', KEYS[3])
if #codes > 0 then
  local fmt = string.format
  local q = redis.call('HMGET', KEYS[4], 't', 'n')
  local t, n = tonumber(q[1] or '0') or 0, tonumber(q[2] or '0') or 0
  for i = 1, #codes, 64 do
    redis.call('HSET', KEYS[4], fmt('%d', t), table.concat(codes, ',', i, math.min(i + 63, #codes)))
    t = t + 1
  end
  redis.call('HSET', KEYS[4], 't', fmt('%d', t), 'n', fmt('%d', n + #codes))
end
return 1
