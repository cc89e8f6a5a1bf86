-- replay.lua: read-only lookup of an earlier successful request id, for requests the local
-- cache would refuse (sold out, at limit, paused, outside the window): the same user and
-- request id must always get the same answer, so a replay still returns its coupon.
--
-- KEYS (all share the hash tag {<batch>:<shard>}, the user's home shard):
--   1 req    hash  request-id generation 0 ("<user>|<request id>" ->
--                  "<coupon>|<vf>|<vt>|<at>[|<nonce>[|<code>]]", lua/claim.lua's record)
--   2 req2   hash  optional: request-id generation 1 (lua/claim.lua KEYS[11])
--   3 meta   hash  optional: 'rqd' ('1' = request-id records were dropped, lua/rotate.lua)
--   4 users  hash  optional: user -> coupons claimed (lua/claim.lua KEYS[3])
--   (KEYS[2], KEYS[3] and KEYS[4] come together or not at all; without them only KEYS[1]
--   is looked at)
-- ARGV: 1 user id   2 request id
-- Returns: { 2, coupon_id, valid_from_ms, valid_to_ms, claimed_at_ms, nonce [, code] } a
--          replay (the code when the coupon has one);
--          { 0, -10 } no earlier success with this request id;
--          { 0, -12 } not here, but records were dropped and the user claimed before: only
--                     the database can tell (request-id retention). Writes nothing.

if #KEYS ~= 1 and #KEYS ~= 4 then return redis.error_reply('ERR replay: takes 1 or 4 keys') end
local field = ARGV[1] .. '|' .. ARGV[2]
local prev = redis.call('HGET', KEYS[1], field)
if not prev and KEYS[2] then prev = redis.call('HGET', KEYS[2], field) end
if not prev then
  if KEYS[3] and redis.call('HGET', KEYS[3], 'rqd') == '1'
    and (tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0') or 0) > 0 then
    return { 0, -12 }
  end
  return { 0, -10 }
end
local c, vf, vt, at, nonce, code = string.match(prev, '^([^|]*)|(%d+)|(%d+)|(%d+)|([^|]*)|([^|]*)$')
if c then
  return { 2, c, tonumber(vf), tonumber(vt), tonumber(at), nonce, code }
end
c, vf, vt, at, nonce = string.match(prev, '^([^|]*)|(%d+)|(%d+)|(%d+)|?([^|]*)$')
return { 2, c, tonumber(vf), tonumber(vt), tonumber(at), nonce or '' }
