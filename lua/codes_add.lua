-- codes_add.lua: adds a chunk of codes to a batch's pool (a create's generated codes, or an
-- import), with the stock they are: the pool's total, stock and code queue grow together.
-- Idempotent per chunk id, for ever: the database records the chunk as loaded only after
-- this answered, so a chunk can arrive twice (a retry, a crash between the two), and must
-- count once.
--
-- KEYS (one hash tag, the pool {<batch>:pool}):
--   1 meta   hash    the pool's meta: 'codes' = '1' for a batch that hands out codes,
--                    'total' (stock ever added), 'cap' (the most stock the batch may hold:
--                    its declared stock, or what its budget pays for), 'soldout'
--   2 stock  string  stock of the pool
--   3 codes  hash    the pool's code queue (lua/claim.lua KEYS[9])
--   4 loads  set     chunk ids added so far
--   5 xseq   string  transfer sequence of the pool (bumped: its stock moved)
-- ARGV:
--   1 chunk id (non-empty)   2 the codes, joined by ',' (at least one; the gateway has
--     deduplicated them against every code the batch ever had)
-- Returns: { 1, total after } added now; { 0, total } the chunk was added before (nothing
--          written); { -1, 0 } no such batch; { -2, 0 } the batch does not hand out codes;
--          { -3, cap } the codes would take the total past the cap (nothing written).

if ARGV[1] == '' or #ARGV ~= 2 or ARGV[2] == '' then
  return redis.error_reply('ERR codes_add: expects a chunk id and a list of codes')
end
local m = redis.call('HMGET', KEYS[1], 'codes', 'total', 'cap')
local total = tonumber(m[2])
if not total then return { -1, 0 } end
if m[1] ~= '1' then return { -2, 0 } end
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then return { 0, total } end
local codes = {}
for c in string.gmatch(ARGV[2], '[^,]+') do codes[#codes + 1] = c end
local cap = tonumber(m[3])
if cap and total + #codes > cap then return { -3, cap } end

local fmt = string.format
local q = redis.call('HMGET', KEYS[3], 't', 'n')
local t, n = tonumber(q[1] or '0') or 0, tonumber(q[2] or '0') or 0
for i = 1, #codes, 64 do
  redis.call('HSET', KEYS[3], fmt('%d', t), table.concat(codes, ',', i, math.min(i + 63, #codes)))
  t = t + 1
end
redis.call('HSET', KEYS[3], 't', fmt('%d', t), 'n', fmt('%d', n + #codes))
redis.call('INCRBY', KEYS[2], #codes)
redis.call('HSET', KEYS[1], 'total', fmt('%d', total + #codes), 'soldout', '0')
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('INCR', KEYS[5])
return { 1, total + #codes }
