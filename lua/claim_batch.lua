-- claim_batch.lua: MANY claims against one shard of a batch in ONE call (group commit), each
-- decided exactly as lua/claim.lua decides a single claim, in argument order: a later claim
-- of the call sees every effect of the earlier ones (a user's count, a request id minted
-- earlier in the call, the stock left). Atomic; one hash slot. Every read is per call, not per
-- claim: whatever n is, a call makes at most ~12 redis.calls.
-- Validates everything before the first write (a script that errors half-way keeps its writes):
-- a bad argument anywhere fails the WHOLE call with an error reply and nothing written.
--
-- KEYS (all share the hash tag {<batch>:<shard>}):
--   1 meta     hash   state, start, end, limit, daily, vdays, vfrom, vto, ver, ...; read here:
--                     'epoch' (shard epoch, default 1), 'fenced' ('1' = refuse everything),
--                     'rqc' / 'rqp' (start ms of the current / previous request-id generation;
--                     written here, see "Request-id records")
--   2 stock    string coupons left in this shard (unchanged layout: transfer_in/out, probe,
--                     patch, setup and restore keep working as they are)
--   3 users    hash   user -> "<count>" or "<count>:<utc day>:<count that day>" (per-user limit
--                     and per-day limit in ONE field; a plain "<count>" has no day yet)
--   4 req      (prefix, never accessed itself) request-id records live in the hashes
--                     "<KEYS[4]>:<generation start ms>": derived here from the declared prefix,
--                     so they carry the same hash tag and stay in this slot (Redis Cluster
--                     allows a script undeclared keys of its own slot; the embedded backend
--                     enforces slot locality the same way)
--   5 log      stream ONE entry per call holding all of its successful claims (format below)
--   6 deny     set    users of this shard denied by the batch's eligibility rules
--   7 claimed  string coupons claimed from this shard, also the coupon sequence
-- ARGV:
--   1 op: 'claim'  decide and record every claim;
--         'replay' read-only: answer each claim from its request-id record (code 2) or -10;
--                  nothing else is checked and nothing is written (replaces replay.lua)
--   2 n  number of claims in this call, 1 .. 1000
--   3 max log entries (0 = unbounded): claims that would succeed are refused -9 when the log
--     already holds this many ENTRIES (one entry per call with successes, up to n claims each)
--   4 request-id retention W in ms (> 0): a record stays findable at least W, at most ~2W
--   5 batch id   6 shard label (written into the log entry so the persister can check them)
--   7 .. 6+3n: per claim  user (non-empty), request id ('' = none; no '|'), nonce of the HTTP
--     request (no '|'; recorded with the request id and returned on replay, so a caller that
--     repeats its own call after a lost reply can tell it minted the coupon; '' costs no bytes)
-- Returns a flat array: { epoch, seq_after, at, vf, vt, r_1, ..., r_n }
--   epoch      the shard's epoch (0 when the shard has no meta)
--   seq_after  the shard's coupon sequence after this call (the caller checks it never goes
--              backwards for an epoch: rollback detection)
--   at         claimed-at ms of every coupon minted by this call (one TIME per call)
--   vf, vt     validity (ms) of every coupon minted by this call
--   r_i        the answer to claim i, one of
--     integer > 0   claimed now: r_i is its sequence; coupon id "<batch>.<shard>.<epoch>.<r_i>",
--                   valid vf .. vt, claimed at `at`
--     { 2, epoch, seq, valid_from_ms, valid_to_ms, claimed_at_ms, nonce }  a replay of an
--                   earlier success of this user and request id (earlier in this call, or in
--                   an earlier call): coupon id "<batch>.<shard>.<epoch>.<seq>"; nonce = the
--                   minting request's ('' if none was recorded)
--     integer < 0   refused, nothing written for this claim:
--       -1 no such batch in this shard   -2 window not started   -3 window ended
--       -4 paused   -5 user denied   -6 per-user limit   -7 per-user daily limit
--       -8 shard has no stock (the caller refills and resubmits these claims, in order)
--       -9 claim log backlog at its bound (shed)   -10 ('replay' op) no earlier success
--       -11 shard fenced (rollback suspected; nothing claimed, the caller answers 503)
--   Codes -1 and -11 apply to the whole call. Checks run per claim in this order: replay,
--   -4, -2, -3, -5, -6, -7, -9, -8 (as in claim.lua).
--
-- Coupon id: "<batch>.<shard>.<epoch>.<seq>" (the caller formats it; epoch >= 1).
--
-- Log entry (XADD <log> * ...), record format version 2, field order fixed:
--   v 2  b <batch>  s <shard>  e <epoch>  q <seq of the first claim>  t <claimed at ms>
--   vf <valid from ms>  vt <valid to ms>, then one pair per claim in sequence order:
--   <user> <request id or ''>   (claim k of the entry, k = 0.., has sequence q + k)
--   Decode by position, never into a map: a user's name is a field name, so names repeat
--   (a user claiming twice in one call) and may equal a header name. Only calls with at
--   least one success write an entry. The persister acks/deletes whole entries.
--
-- Request-id records: hash "<KEYS[4]>:<g>", g = generation start ms, field "<user>|<rid>",
--   value "<epoch>.<seq>|<claimed_at ms>|<valid_from - claimed_at>|<valid_to - claimed_at>|<nonce>".
--   New records go to the current generation (meta rqc); lookups read the current and the
--   previous (meta rqp) generation. A call at now >= rqc + W starts a new generation at now
--   (the current one becomes the previous one, the older one is dropped). Each generation
--   hash expires at g + 2W (PEXPIRE), so a record lives between W and 2W. Generation names
--   come from meta, not from now / W, so gateways configured with different W still find
--   each other's records (retention is then the smallest W) instead of missing them.
--   A request id older than the retention is not found: the caller answers such replays
--   from the database.

local call = redis.call
local find, match, fmt = string.find, string.match, string.format
local tonumber = tonumber

local op = ARGV[1]
local claiming = op == 'claim'
if not claiming and op ~= 'replay' then
  return redis.error_reply('ERR claim_batch: op must be claim or replay')
end
local n = tonumber(ARGV[2])
if not n or n < 1 or n > 1000 or n ~= math.floor(n) then
  return redis.error_reply('ERR claim_batch: n must be an integer in 1..1000')
end
if #ARGV ~= 6 + 3 * n then
  return redis.error_reply('ERR claim_batch: expects 6 + 3n arguments')
end
local maxlog, W = tonumber(ARGV[3]), tonumber(ARGV[4])
if not maxlog or maxlog < 0 or maxlog ~= math.floor(maxlog) then
  return redis.error_reply('ERR claim_batch: bad max log length')
end
if not W or W < 1 or W ~= math.floor(W) then
  return redis.error_reply('ERR claim_batch: bad retention')
end
for b = 7, 6 + 3 * n, 3 do
  if ARGV[b] == '' then return redis.error_reply('ERR claim_batch: empty user id') end
  if find(ARGV[b + 1], '|', 1, true) or find(ARGV[b + 2], '|', 1, true) then
    return redis.error_reply("ERR claim_batch: request id and nonce must not contain '|'")
  end
end

local out = { 0, 0, 0, 0, 0 }
local m = call('HMGET', KEYS[1], 'state', 'start', 'end', 'limit', 'daily', 'vdays', 'vfrom',
  'vto', 'epoch', 'fenced', 'rqc', 'rqp')
if not m[1] then
  out[1], out[2], out[3], out[4], out[5] = 0, 0, 0, 0, 0
  for i = 1, n do out[5 + i] = -1 end
  return out
end
local epoch = tonumber(m[9] or '1')
if m[10] == '1' then
  out[1], out[2], out[3], out[4], out[5] = epoch, 0, 0, 0, 0
  for i = 1, n do out[5 + i] = -11 end
  return out
end

local t = call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sepoch = fmt('%d', epoch)

-- Request-id generations. A generation whose start is in the future (a clock that went back
-- after a failover) stays current.
local cur, prev = tonumber(m[11]), tonumber(m[12])
local rotated = false
if not cur then
  cur, prev, rotated = now, nil, true
elseif now >= cur + W then
  if now < cur + 2 * W then prev = cur else prev = nil end
  cur, rotated = now, true
end
if prev and now >= prev + 2 * W then prev = nil end -- expired: nothing to read there
local curkey = KEYS[4] .. ':' .. fmt('%d', cur)

-- Look up every request id of the call: current generation first, then the previous one.
local fields, fidx, fieldof = {}, {}, {}
for i = 1, n do
  local rid = ARGV[5 + 3 * i]
  if rid ~= '' then
    local f = ARGV[4 + 3 * i] .. '|' .. rid
    fields[#fields + 1] = f
    fidx[#fidx + 1] = i
    fieldof[i] = f
  end
end
local found = {} -- claim index -> stored record
if #fields > 0 then
  local miss, missidx = fields, fidx
  if not rotated then
    local got = call('HMGET', curkey, unpack(fields))
    miss, missidx = {}, {}
    for k = 1, #fields do
      if got[k] then found[fidx[k]] = got[k]
      else miss[#miss + 1] = fields[k]; missidx[#missidx + 1] = fidx[k] end
    end
  end
  if prev and #miss > 0 then
    local got = call('HMGET', KEYS[4] .. ':' .. fmt('%d', prev), unpack(miss))
    for k = 1, #miss do
      if got[k] then found[missidx[k]] = got[k] end
    end
  end
end

local function stored_replay(rec)
  local e, s, at, dvf, dvt, nonce =
    match(rec, '^(%d+)%.(%d+)|(%d+)|(%-?%d+)|(%-?%d+)|(.*)$')
  if not e then
    return redis.error_reply('ERR claim_batch: corrupt request-id record')
  end
  at = tonumber(at)
  return { 2, tonumber(e), tonumber(s), at + tonumber(dvf), at + tonumber(dvt), at, nonce }
end

if not claiming then
  out[1], out[3], out[4], out[5] = epoch, 0, 0, 0
  out[2] = tonumber(call('GET', KEYS[7]) or '0')
  for i = 1, n do
    local rec = found[i]
    if rec then
      local r = stored_replay(rec)
      if r.err then return r end
      out[5 + i] = r
    else
      out[5 + i] = -10
    end
  end
  return out
end

-- The batch definition, read once.
local active = m[1] == 'active'
local wstart, wend = tonumber(m[2]), tonumber(m[3])
local limit, daily = tonumber(m[4]), tonumber(m[5])
local day = math.floor(now / 86400000)
local vf, vt
local vdays = tonumber(m[6])
if vdays > 0 then
  vf, vt = now, now + vdays * 86400000
else
  vf, vt = tonumber(m[7]), tonumber(m[8])
end
local dvf, dvt = fmt('%d', vf - now), fmt('%d', vt - now)
local snow = fmt('%d', now)

-- Per-user state, loaded lazily (only once a claim gets past the window checks).
local cnt, uday, udc -- user -> count, day of the day count (nil = none), day count
local denied -- user -> true
local function load_users()
  cnt, uday, udc, denied = {}, {}, {}, {}
  local list = {}
  for i = 1, n do
    local u = ARGV[4 + 3 * i]
    if not cnt[u] then cnt[u] = 0; list[#list + 1] = u end
  end
  local vals = call('HMGET', KEYS[3], unpack(list))
  local dm = call('SMISMEMBER', KEYS[6], unpack(list))
  for k = 1, #list do
    local u, v = list[k], vals[k]
    if v then
      local c, d, dc = match(v, '^(%d+):(%d+):(%d+)$')
      if c then
        cnt[u], uday[u], udc[u] = tonumber(c), tonumber(d), tonumber(dc)
      else
        c = match(v, '^%d+$')
        if not c then return 'ERR claim_batch: corrupt user record' end
        cnt[u] = tonumber(c)
      end
    end
    if dm[k] == 1 then denied[u] = true end
  end
end

local stock -- loaded lazily
local loglen -- loaded lazily
local taken = 0
local mintidx = {} -- k -> claim index of the k-th success
local minted = {} -- "<user>|<rid>" -> k, for request ids minted in this call
local mintnonce = {} -- k -> nonce
local dirty, dirtylist = {}, {}
local pending = {} -- claim index -> k of the earlier success it replays

for i = 1, n do
  local b = 4 + 3 * i
  local user = ARGV[b]
  local f = fieldof[i]
  local r
  if f and minted[f] then
    pending[i] = minted[f]
  elseif found[i] then
    r = stored_replay(found[i])
    if r.err then return r end
  elseif not active then r = -4
  elseif now < wstart then r = -2
  elseif now >= wend then r = -3
  else
    if not cnt then
      local err = load_users()
      if err then return redis.error_reply(err) end
    end
    local today = 0
    if daily > 0 and uday[user] == day then today = udc[user] end
    if denied[user] then r = -5
    elseif cnt[user] >= limit then r = -6
    elseif daily > 0 and today >= daily then r = -7
    else
      if maxlog > 0 and not loglen then loglen = call('XLEN', KEYS[5]) end
      if maxlog > 0 and loglen >= maxlog then r = -9
      else
        if not stock then
          local s = call('GET', KEYS[2])
          if s and not match(s, '^%-?%d+$') then
            return redis.error_reply('ERR claim_batch: stock is not an integer')
          end
          stock = tonumber(s or '0')
        end
        if stock - taken <= 0 then r = -8
        else
          taken = taken + 1
          mintidx[taken] = i
          mintnonce[taken] = ARGV[b + 2]
          if f then minted[f] = taken end
          cnt[user] = cnt[user] + 1
          if daily > 0 then uday[user], udc[user] = day, today + 1 end
          if not dirty[user] then dirty[user] = true; dirtylist[#dirtylist + 1] = user end
          r = 0 -- filled with the sequence below
        end
      end
    end
  end
  out[5 + i] = r
end

-- Every check passed and every answer is decided: write.
local first, last
if taken > 0 then
  last = call('INCRBY', KEYS[7], taken) -- first write: an error here leaves nothing written
  first = last - taken + 1
  call('DECRBY', KEYS[2], taken)
  local kv = {}
  for k = 1, #dirtylist do
    local u = dirtylist[k]
    kv[2 * k - 1] = u
    if uday[u] then
      kv[2 * k] = fmt('%d:%d:%d', cnt[u], uday[u], udc[u])
    else
      kv[2 * k] = fmt('%d', cnt[u])
    end
  end
  call('HSET', KEYS[3], unpack(kv))
  local rq, lg = {}, { 'XADD', KEYS[5], '*', 'v', '2', 'b', ARGV[5], 's', ARGV[6], 'e', sepoch,
    'q', fmt('%d', first), 't', snow, 'vf', fmt('%d', vf), 'vt', fmt('%d', vt) }
  local tail = ('|' .. snow .. '|' .. dvf .. '|' .. dvt .. '|')
  for k = 1, taken do
    local i = mintidx[k]
    local b = 4 + 3 * i
    local rid = ARGV[b + 1]
    out[5 + i] = first + k - 1
    lg[#lg + 1] = ARGV[b]
    lg[#lg + 1] = rid
    if rid ~= '' then
      rq[#rq + 1] = fieldof[i]
      rq[#rq + 1] = sepoch .. '.' .. fmt('%d', first + k - 1) .. tail .. mintnonce[k]
    end
  end
  if #rq > 0 then
    call('HSET', curkey, unpack(rq))
    call('PEXPIRE', curkey, fmt('%d', cur + 2 * W - now))
    if rotated then
      call('HSET', KEYS[1], 'rqc', fmt('%d', cur), 'rqp', prev and fmt('%d', prev) or '')
    end
  end
  call(unpack(lg))
  for i, k in pairs(pending) do
    out[5 + i] = { 2, epoch, first + k - 1, vf, vt, now, mintnonce[k] }
  end
else
  last = tonumber(call('GET', KEYS[7]) or '0')
end
out[1], out[2], out[3], out[4], out[5] = epoch, last, now, vf, vt
return out
