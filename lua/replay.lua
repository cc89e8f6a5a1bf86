-- replay.lua: read-only lookup of an earlier successful request id, for requests the local
-- cache would refuse (sold out, at limit, paused, outside the window): the same user and
-- request id must always get the same answer, so a replay still returns its coupon.
--
-- KEYS: 1 req hash of the user's home shard ("<user>|<request id>" ->
--       "<coupon>|<vf>|<vt>|<at>[|<nonce>[|<code>]]", lua/claim.lua's request-id record)
-- ARGV: 1 user id   2 request id
-- Returns: { 2, coupon_id, valid_from_ms, valid_to_ms, claimed_at_ms, nonce [, code] } a
--          replay (the code when the coupon has one);
--          { 0, -10 } no earlier success with this request id. Writes nothing.

local prev = redis.call('HGET', KEYS[1], ARGV[1] .. '|' .. ARGV[2])
if not prev then return { 0, -10 } end
local c, vf, vt, at, nonce, code = string.match(prev, '^([^|]*)|(%d+)|(%d+)|(%d+)|([^|]*)|([^|]*)$')
if c then
  return { 2, c, tonumber(vf), tonumber(vt), tonumber(at), nonce, code }
end
c, vf, vt, at, nonce = string.match(prev, '^([^|]*)|(%d+)|(%d+)|(%d+)|?([^|]*)$')
return { 2, c, tonumber(vf), tonumber(vt), tonumber(at), nonce or '' }
