-- log_count.lua: the claims one shard's log holds, counted in pages (reconcile: claims minted
-- and not yet in the database). A 'claims' entry (lua/claim.lua, one per claim call) holds as
-- many claims as its 'u' field holds users ('|'-joined); a 'claimed' entry (the earlier
-- one-claim format) one; a 'changed' entry (lua/coupon.lua) none. Read-only.
--
-- KEYS: 1 log  stream
-- ARGV: 1 after: the id of the last entry already counted ('' = from the log's start)
--       2 page: most entries read by this call (an integer, 1..10000)
-- Returns: { claims in the entries read, entries read, the id of the last entry read ('' =
--   none: the log holds nothing after ARGV 1) }

local page = tonumber(ARGV[2])
if not page or page < 1 or page > 10000 or page ~= math.floor(page) then
  return redis.error_reply('ERR log_count: page must be an integer in 1..10000')
end
local from = '-'
if ARGV[1] ~= '' then from = '(' .. ARGV[1] end
local entries = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', page)
local claims, last = 0, ''
for _, e in ipairs(entries) do
  last = e[1]
  local f, kind, users = e[2], nil, nil
  for i = 1, #f, 2 do
    if f[i] == 'k' then kind = f[i + 1] elseif f[i] == 'u' then users = f[i + 1] end
  end
  if kind == 'claims' then
    local _, bars = string.gsub(users or '', '|', '')
    claims = claims + bars + 1
  elseif kind == 'claimed' then
    claims = claims + 1
  end
end
return { claims, #entries, last }
