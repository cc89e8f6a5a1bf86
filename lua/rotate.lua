-- rotate.lua: request-id retention for one shard (src/recovery/rotate.rs). The shard keeps its
-- request-id records (lua/claim.lua) in two generations, KEYS 2 and 3; claims write to the
-- current one and look up both. Once the current generation is W ms old, the previous one is
-- dropped and the current becomes the previous: a record stays findable at least W (and at
-- most about 2W plus the time the persister takes). A record is dropped only once the
-- database holds its claim: the generation dropped was closed by an earlier rotation, and
-- rotating waits until the shard's log holds no entry from before that rotation (the
-- persister deletes an entry once its transaction committed). From the first drop on, the
-- meta says so ('rqd'), and a claim that misses a record of a user who claimed before asks
-- the database (lua/claim.lua -12). Atomic; one hash slot. Writes nothing unless it rotates.
--
-- KEYS (all share the hash tag {<batch>:<shard>}):
--   1 meta  hash    'rqc' ('1' = KEYS[3] is current, else KEYS[2]; absent = not started),
--                   'rqg' (the current generation's start mark, ms), 'rqo' ('1' = the
--                   previous generation holds records), 'rqd' ('1' = records were dropped)
--   2 req   hash    request-id generation 0 (lua/claim.lua KEYS[5])
--   3 req2  hash    request-id generation 1 (lua/claim.lua KEYS[11])
--   4 log   stream  the shard's claim log (lua/claim.lua KEYS[6])
-- ARGV: 1 the retention W, ms (an integer >= 1)
-- Returns { code, ms }:
--   { 1, mark }    rotated now: the previous generation was dropped, the current one became
--                  the previous, and the new one starts at mark
--   { 2, mark }    started: the first call on this shard; the current generation (KEYS[2],
--                  with every record written so far) starts at mark
--   { 0, mark }    not due: the current generation started at mark (due at mark + W)
--   { -1, 0 }      no meta: no batch in this slot (or it is being repaired)
--   { -2, first }  due, but the log still holds an entry from before the current generation
--                  started (its id's ms: first): its claim may not be in the database yet
--                  (the persister is behind or down). Nothing written; try again later.
-- The mark is the later of TIME and the ms of the log's newest entry, so every entry written
-- before it carries an id at or below the mark, whatever the clock did.

local W = tonumber(ARGV[1])
if #ARGV ~= 1 or not W or W < 1 or W ~= math.floor(W) then
  return redis.error_reply('ERR rotate: expects the retention in ms, an integer >= 1')
end
local m = redis.call('HMGET', KEYS[1], 'state', 'rqc', 'rqg')
if not m[1] then return { -1, 0 } end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function ms_of(entry) return tonumber(string.match(entry[1], '^(%d+)')) end
local newest = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)[1]
local mark = math.max(now, newest and ms_of(newest) or 0)

if not m[2] then
  redis.call('HSET', KEYS[1], 'rqc', '0', 'rqg', string.format('%d', mark))
  return { 2, mark }
end
local start = tonumber(m[3])
if not start then return redis.error_reply('ERR rotate: meta rqg is not a number') end
if now - start < W then return { 0, start } end
local oldest = redis.call('XRANGE', KEYS[4], '-', '+', 'COUNT', 1)[1]
if oldest and ms_of(oldest) <= start then return { -2, ms_of(oldest) } end

local cur, prev, next = KEYS[2], KEYS[3], '1'
if m[2] == '1' then cur, prev, next = KEYS[3], KEYS[2], '0' end
local dropped = redis.call('UNLINK', prev) == 1
local kept = redis.call('EXISTS', cur) == 1
redis.call('HSET', KEYS[1], 'rqc', next, 'rqg', string.format('%d', mark), 'rqo', kept and '1' or '0')
if dropped then redis.call('HSET', KEYS[1], 'rqd', '1') end
return { 1, mark }
