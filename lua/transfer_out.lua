-- transfer_out.lua: first half of a stock transfer; takes stock out of the source slot
-- and records it in the source's outbox. Idempotent per transfer id.
--
-- KEYS (one hash tag, the source slot):
--   1 stock   string stock of the source
--   2 outbox  hash   transfer id -> "<destination>|<amount>|<created ms>"
--   3 xseq    string transfer sequence of the source
--   4 meta    hash   the source's meta: a slot without it (lost, or fenced for repair) gives
--                    nothing (its stock may be stale: the repair writes it off)
--   5 codes   hash   the source's code queue (lua/claim.lua KEYS[9]), used when the meta
--                    says the batch hands out codes ('codes' = '1')
--   6 xcodes  hash   transfer id -> the codes that left with the stock, joined by ','
-- ARGV:
--   1 transfer id   2 most to take (> 0; '0' = only look up what transfer id ARGV 1 moved,
--     never take)   3 destination (shard index)
--   4 '1' = take at most half of what the source holds (rounded up), '0' = no such cap
-- Returns: { amount moved out, codes moved out joined by ',' ('' when the batch has no
--          codes) }. { 0, '' } = nothing to move, no outbox entry written. A repeated
--          transfer id returns what was recorded the first time and writes nothing (so the
--          sweeper finishing an interrupted transfer learns its codes this way).
-- Codes leave from the head of the source's queue, as claims take them; the amount always
-- equals the number of codes.

local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev then
  return { tonumber(string.match(prev, '^[^|]*|(%d+)|')), redis.call('HGET', KEYS[6], ARGV[1]) or '' }
end
local want = tonumber(ARGV[2])
if not want or want < 0 then return redis.error_reply('ERR transfer_out: bad amount') end
if want == 0 or redis.call('EXISTS', KEYS[4]) == 0 then return { 0, '' } end
local hascodes = redis.call('HGET', KEYS[4], 'codes') == '1'
local stock = tonumber(redis.call('GET', KEYS[1]) or '0')
local take = math.min(want, stock)
if ARGV[4] == '1' then take = math.min(take, math.ceil(stock / 2)) end
if take <= 0 then return { 0, '' } end

-- The codes that leave (read first: nothing is written unless all are there).
local fmt = string.format
local codes, blocks, head, held = {}, {}, 0, 0
if hascodes then
  local q = redis.call('HMGET', KEYS[5], 'h', 'n')
  head, held = tonumber(q[1] or '0'), tonumber(q[2] or '0')
  if not head or not held or held < take then
    return redis.error_reply('ERR transfer_out: the slot holds fewer codes than stock')
  end
  local b = head
  while #codes < take do
    local block = redis.call('HGET', KEYS[5], fmt('%d', b))
    if not block then return redis.error_reply('ERR transfer_out: code block missing') end
    local rest = {}
    for c in string.gmatch(block, '[^,]+') do
      if #codes < take then codes[#codes + 1] = c else rest[#rest + 1] = c end
    end
    blocks[#blocks + 1] = { b, table.concat(rest, ',') }
    b = b + 1
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DECRBY', KEYS[1], take)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. '|' .. fmt('%d', take) .. '|' .. fmt('%d', now))
redis.call('INCR', KEYS[3])
local moved = ''
if hascodes then
  for _, blk in ipairs(blocks) do
    if blk[2] == '' then
      redis.call('HDEL', KEYS[5], fmt('%d', blk[1]))
      head = blk[1] + 1
    else
      redis.call('HSET', KEYS[5], fmt('%d', blk[1]), blk[2])
    end
  end
  redis.call('HSET', KEYS[5], 'h', fmt('%d', head), 'n', fmt('%d', held - take))
  moved = table.concat(codes, ',')
  redis.call('HSET', KEYS[6], ARGV[1], moved)
end
return { take, moved }
