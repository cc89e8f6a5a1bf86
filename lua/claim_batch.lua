-- claim_batch.lua: MANY claims against one shard of a batch in ONE call (group commit), each
-- decided exactly as lua/claim.lua decides a single claim, in argument order: a later claim
-- of the call sees every effect of the earlier ones (a user's count and day count, a request
-- id minted earlier in the call, the stock left). Atomic; one hash slot. Reads and writes are
-- per call, not per claim: whatever n is, a call makes at most 16 redis.calls (typically 11).
-- Validates everything before the first write (a script that errors half-way keeps its
-- writes): a bad argument anywhere fails the WHOLE call with an error reply, nothing written.
--
-- KEYS (all share the hash tag {<batch>:<shard>}):
--   1 meta     hash   state, start, end, limit, daily, vdays, vfrom, vto, ver, ...; also read
--                     here: 'epoch' (shard epoch, default 1), 'fenced' ('1' = refuse every
--                     claim); written here: 'rqc' / 'rqp' (start ms of the current / previous
--                     request-id generation, '' = none) and 'rqcq' / 'rqpq' (first sequence
--                     recorded in each)
--   2 stock    string coupons left in this shard (layout unchanged: transfer_in/out, probe,
--                     patch, setup and restore keep working as they are)
--   3 users    hash   user -> "<count>[:<utc day>:<count that day>][/<epoch>.<q>]...": the
--                     per-user limit, the per-day limit (no day part: no claim counted on any
--                     day yet, as restore.lua's 'users' pairs write it) and references to the
--                     request-id records of the user's successes (see below), in ONE field
--   4 req      string, never accessed: the PREFIX of the request-id generation hashes
--                     "<KEYS[4]>:<generation start ms>". Derived in the script from this
--                     declared name, they carry the same hash tag, so they stay in this slot
--                     (Redis Cluster lets a script use undeclared keys of its own slot; the
--                     embedded backend enforces slot locality the same way).
--   5 log      stream ONE entry per call with successes, holding all of them (format below)
--   6 deny     set    users of this shard denied by the batch's eligibility rules
--   7 claimed  string coupons claimed from this shard, also the coupon sequence
-- ARGV:
--   1 op: 'claim'  decide and record every claim;
--         'replay' read-only: answer each claim from its request-id record (code 2) or -10;
--                  no other check, nothing written (the batched form of replay.lua)
--   2 n  number of claims in this call, 1 .. 1000
--   3 max log ENTRIES (0 = unbounded): claims that would succeed are refused -9 when the log
--     already holds this many entries (an entry holds the successes of one call, 1 .. n)
--   4 request-id retention W in ms (> 0): a record stays findable at least W, at most 2W
--   5 .. 4+n       users, one per claim (non-empty)
--   5+n .. 4+2n    request ids, one per claim ('' = none)
--   5+2n .. 4+3n   nonces of the HTTP requests, one per claim (recorded with the request id
--                  and returned on replay, so a caller repeating its own call after a lost
--                  reply can tell it minted the coupon; '' costs no memory)
--   (column by column, not claim by claim: the users go to HMGET / SMISMEMBER as they are)
--   No user, request id or nonce may contain '|' (the record separator).
-- Returns a flat array { epoch, seq_after, at, vf, vt, r_1, ..., r_n }:
--   epoch      the shard's epoch (0 when the shard has no meta)
--   seq_after  the shard's coupon sequence after the call (0 with no meta or when fenced);
--              the caller checks it never goes back within an epoch (rollback detection)
--   at         claimed-at ms of every coupon minted by this call (one TIME per call)
--   vf, vt     validity (ms) of every coupon minted by this call
--   r_i        the answer to claim i, one of
--     integer > 0   claimed now: r_i is its sequence; coupon id "<batch>.<shard>.<epoch>.<r_i>",
--                   valid vf .. vt, claimed at `at`
--     { 2, epoch, seq, valid_from_ms, valid_to_ms, claimed_at_ms, nonce }   a replay of an
--                   earlier success of this user and request id (earlier in this call or in
--                   an earlier one); coupon id "<batch>.<shard>.<epoch>.<seq>"; nonce: the
--                   minting request's ('' if none was recorded)
--     integer < 0   refused, nothing written for this claim:
--       -1 no such batch in this shard   -2 window not started   -3 window ended
--       -4 paused   -5 user denied   -6 per-user limit   -7 per-user daily limit
--       -8 shard has no stock (the caller refills and resubmits these claims, in order)
--       -9 claim log backlog at its bound (shed)   -10 ('replay' op) no earlier success
--       -11 shard fenced (rollback suspected; nothing claimed, the caller answers 503)
--   -1 and -11 answer every claim of the call. Otherwise each claim is checked in this order:
--   replay, -4, -2, -3, -5, -6, -7, -9, -8 (claim.lua's order).
--
-- Coupon id: "<batch>.<shard>.<epoch>.<seq>" (formatted by the caller; epoch >= 1).
--
-- Log entry (XADD <log> * h <header> c <claims>), record format version 2:
--   h "2|<epoch>|<q>|<claimed at ms>|<valid from ms>|<valid to ms>", q = sequence of the
--     entry's first claim
--   c "<user>|<request id>|<nonce>|<user>|<request id>|<nonce>|..." in sequence order:
--     triple k (k = 0..) is the claim with sequence q + k ('' request id or nonce: none).
--     Split on '|', take triples.
--   Batch and shard are the log's own (the persister reads the log of one shard). Only a
--   call with at least one success writes an entry.
--
-- Request-id records: ONE per call that has a success with a request id, field
--   "@<epoch>.<q>" of the current generation hash "<KEYS[4]>:<rqc>", value
--   "<h>|<c>" (the call's log header and claims, as above). Each such success appends the
--   reference "/<epoch>.<q>" to its user's field; a later claim of that user with a request
--   id reads the records its references name (current, then previous generation) and looks
--   for its (user, request id) in them. A user without references (a first-time claimant)
--   costs no request-id read. References to expired generations (q below the previous
--   generation's first sequence) or to another epoch are dropped when the user's field is
--   next written, so a field holds at most the records of the last 2W (and never more than
--   the per-user limit).
--   Generations: a call at now >= rqc + W starts a new one at now: the current becomes the
--   previous (rqp, rqpq), the previous is dropped. Each generation hash expires at start +
--   2W (PEXPIRE when started), so a record lives between W and 2W. Generation names come
--   from meta, not from now / W: gateways configured with different W still find each
--   other's records (retention is then the smallest W) instead of missing them.
--   A request id older than the retention is not found: the caller answers such replays
--   from the database. A rebuild writes counts ("<count>[:<day>:<n>]") and either no
--   references (replays then go to the database) or records in this format with them.

local call = redis.call
local find, match, fmt, concat, gmatch, sub =
  string.find, string.match, string.format, table.concat, string.gmatch, string.sub
local tonumber, floor, unpack = tonumber, math.floor, unpack
local A, KEYS = ARGV, KEYS

local function fail(msg) return redis.error_reply('ERR claim_batch: ' .. msg) end

local op = A[1]
local claiming = op == 'claim'
if not claiming and op ~= 'replay' then return fail('op must be claim or replay') end
local n = tonumber(A[2])
if not n or n < 1 or n > 1000 or n ~= floor(n) then
  return fail('n must be an integer in 1..1000')
end
if #A ~= 4 + 3 * n then return fail('expects 4 + 3n arguments') end
local maxlog, W = tonumber(A[3]), tonumber(A[4])
if not maxlog or maxlog < 0 or maxlog ~= floor(maxlog) then return fail('bad max log length') end
if not W or W < 1 or W ~= floor(W) then return fail('bad retention') end
local U, R, N = 4, 4 + n, 4 + 2 * n -- claim i: user A[U + i], request id A[R + i], nonce A[N + i]
-- every user, request id and nonce at once: one scan, not one per claim
if find(concat(A, '', U + 1, N + n), '|', 1, true) then
  return fail("user, request id and nonce must not contain '|'")
end
for i = U + 1, U + n do
  if A[i] == '' then return fail('empty user id') end
end

local out = { unpack(A, 1, n + 5) } -- sized once; every slot is overwritten below
out[1], out[2], out[3], out[4], out[5] = 0, 0, 0, 0, 0
local m = call('HMGET', KEYS[1], 'state', 'start', 'end', 'limit', 'daily', 'vdays', 'vfrom',
  'vto', 'epoch', 'fenced', 'rqc', 'rqp', 'rqcq', 'rqpq')
if not m[1] then
  for i = 1, n do out[5 + i] = -1 end
  return out
end
local epoch = tonumber(m[9] or '1')
if not epoch then return fail('meta epoch is not a number') end
if m[10] == '1' then
  out[1] = epoch
  for i = 1, n do out[5 + i] = -11 end
  return out
end

local t = call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)

-- Request-id generations (nothing written yet). A generation whose start is in the future (a
-- clock that went back after a failover) stays current.
local cur, prev = tonumber(m[11]), tonumber(m[12])
local curq, prevq = tonumber(m[13]), tonumber(m[14]) -- first sequence recorded in each
local rotated = false
if not cur then
  cur, curq, prev, prevq, rotated = now, nil, nil, nil, true
elseif now >= cur + W then
  if now < cur + 2 * W then prev, prevq = cur, curq else prev, prevq = nil, nil end
  cur, curq, rotated = now, nil, true
end
if prev and now >= prev + 2 * W then prev, prevq = nil, nil end -- expired: nothing to read

-- Claims of one user share the state kept at the user's first claim: j = idx[user].
local idx, rep = {}, false
for i = 1, n do
  local u = A[U + i]
  if idx[u] then rep = true else idx[u] = i end
end
-- cnt[i]: count of claim i's user (false: no field, never claimed); uday / udc: its day
-- count; urefs: its record references "/<epoch>.<q>..."
local cnt = call('HMGET', KEYS[3], unpack(A, U + 1, U + n))
local uday, udc, urefs
for i = 1, n do
  local v = cnt[i]
  if v then
    local c, rest = match(v, '^(%d+)(.*)$')
    if not c then return fail('corrupt user record') end
    cnt[i] = tonumber(c)
    if rest ~= '' then
      local d, dc, refs = match(rest, '^:(%d+):(%d+)(.*)$')
      if d then
        if not uday then uday, udc = {}, {} end
        uday[i], udc[i], rest = tonumber(d), tonumber(dc), refs
      end
      if rest ~= '' then
        if find(rest, '[^/%.%d]') or not match(rest, '^/%d+%.%d+') then
          return fail('corrupt user record')
        end
        if not urefs then urefs = {} end
        urefs[i] = rest
      end
    end
  end
end

-- Request-id records: only users with references can have one. A reference names the
-- record of a call ("@<epoch>.<q>" in the current or previous generation), which lists that
-- call's claims in sequence order after a header.
local function search(rec, u, rid)
  -- a cheap test first; then walk the entries, since a match must start at an entry
  if not find(rec, '|' .. u .. '|' .. rid .. '|', 1, true) then return nil end
  local e, q, at, vf, vt, pos = match(rec, '^2|(%d+)|(%d+)|(%d+)|(%-?%d+)|(%-?%d+)()')
  if not e then return false end
  local k = 0
  for eu, er, en in gmatch(sub(rec, pos), '|([^|]*)|([^|]*)|([^|]*)') do
    if eu == u and er == rid then
      return { 2, tonumber(e), tonumber(q) + k, tonumber(vf), tonumber(vt), tonumber(at), en }
    end
    k = k + 1
  end
  return nil
end
local found -- claim index -> replay answer
if urefs then
  local want, wl, nw = {}, {}, 0
  for i = 1, n do
    if urefs[i] and A[R + i] ~= '' then
      for ref in gmatch(urefs[i], '/(%d+%.%d+)') do
        if not want[ref] then
          nw = nw + 1
          wl[nw], want[ref] = '@' .. ref, true
        end
      end
    end
  end
  if nw > 0 then
    local recs = {}
    local miss, nm = wl, nw
    if not rotated then -- a generation started by this call is still empty
      local got = call('HMGET', KEYS[4] .. ':' .. fmt('%d', cur), unpack(wl, 1, nw))
      miss, nm = {}, 0
      for k = 1, nw do
        if got[k] then recs[wl[k]] = got[k] else nm = nm + 1; miss[nm] = wl[k] end
      end
    end
    if prev and nm > 0 then
      local got = call('HMGET', KEYS[4] .. ':' .. fmt('%d', prev), unpack(miss, 1, nm))
      for k = 1, nm do
        if got[k] then recs[miss[k]] = got[k] end
      end
    end
    for i = 1, n do
      local rid = A[R + i]
      if urefs[i] and rid ~= '' then
        for ref in gmatch(urefs[i], '/(%d+%.%d+)') do
          local rec = recs['@' .. ref]
          if rec then
            local r = search(rec, A[U + i], rid)
            if r == false then return fail('corrupt request-id record') end
            if r then
              found = found or {}
              found[i] = r
              break
            end
          end
        end
      end
    end
  end
end

if not claiming then
  out[1] = epoch
  out[2] = tonumber(call('GET', KEYS[7]) or '0')
  for i = 1, n do
    out[5 + i] = found and found[i] or -10
  end
  return out
end

-- The batch definition, read once; the window and state decide for every claim alike.
local wstart, wend = tonumber(m[2]), tonumber(m[3])
local limit, daily, vdays = tonumber(m[4]), tonumber(m[5]), tonumber(m[6])
if not (wstart and wend and limit and daily and vdays) then return fail('corrupt meta') end
local vf, vt
if vdays > 0 then
  vf, vt = now, now + vdays * 86400000
else
  vf, vt = tonumber(m[7]), tonumber(m[8])
  if not (vf and vt) then return fail('corrupt meta') end
end
local gate -- the refusal of every claim that is not a replay, if any
if m[1] ~= 'active' then gate = -4
elseif now < wstart then gate = -2
elseif now >= wend then gate = -3 end
local day = floor(now / 86400000)

local denied -- nil: not read yet; false: the shard denies nobody; else claim i -> 1 / 0
local stock, loglen -- read when first needed
local taken = 0
local mint, mj = {}, {} -- k -> claim index / user state index of the k-th success
local minted -- "<user>|<rid>" -> k, kept only in calls where some user has several claims
local pending -- claim index -> k of the earlier success in this call that it replays
local withrid -- user state index -> true: the user has a success with a request id here

for i = 1, n do
  local r, f
  if rep then
    local rid = A[R + i]
    if rid ~= '' then
      f = A[U + i] .. '|' .. rid
      minted = minted or {}
    end
  end
  if f and minted[f] then
    pending = pending or {}
    pending[i] = minted[f]
  elseif found and found[i] then
    r = found[i]
  elseif gate then
    r = gate
  else
    if denied == nil then
      denied = call('SCARD', KEYS[6]) > 0 and call('SMISMEMBER', KEYS[6], unpack(A, U + 1, U + n))
    end
    local j = idx[A[U + i]]
    local c = cnt[j] or 0
    if denied and denied[i] == 1 then r = -5
    elseif c >= limit then r = -6
    else
      local today = 0
      if uday and uday[j] == day then today = udc[j] end
      if daily > 0 and today >= daily then r = -7
      else
        if loglen == nil then loglen = maxlog > 0 and call('XLEN', KEYS[5]) end
        if loglen and loglen >= maxlog then r = -9
        else
          if not stock then
            local s = call('GET', KEYS[2])
            if s and not match(s, '^%-?%d+$') then return fail('stock is not an integer') end
            stock = tonumber(s or '0')
          end
          if taken >= stock then r = -8
          else
            taken = taken + 1
            mint[taken], mj[taken] = i, j
            if f then minted[f] = taken end
            if A[R + i] ~= '' then
              if not withrid then withrid = {} end
              withrid[j] = true
            end
            cnt[j] = c + 1
            if daily > 0 then
              if not uday then uday, udc = {}, {} end
              uday[j], udc[j] = day, today + 1
            end
          end
        end
      end
    end
  end
  if r then out[5 + i] = r end -- a success gets its sequence below
end

-- Every answer is decided: write.
local last
if taken > 0 then
  last = call('INCRBY', KEYS[7], taken) -- first write: if it fails, nothing is written
  local first = last - taken + 1
  call('DECRBY', KEYS[2], taken)
  local DIGITS = { '0', '1', '2', '3', '4', '5', '6', '7', '8', '9' }
  local ref = fmt('%d.%d', epoch, first) -- this call's record: "@<epoch>.<first>"
  if rotated then curq = first end
  -- references to records of older generations (expired) or of another epoch are dropped
  local floorq = (prev and (prevq or 0)) or curq or 0
  local function prune(refs)
    local keep, nk = {}, 0
    for e, q in gmatch(refs, '/(%d+)%.(%d+)') do
      if tonumber(e) == epoch and tonumber(q) >= floorq then
        nk = nk + 1
        keep[nk] = '/' .. e .. '.' .. q
      end
    end
    return concat(keep, '', 1, nk)
  end
  local kv, E = { unpack(A, 1, 2 * taken) }, { unpack(A, 1, 3 * taken) } -- sized once
  for k = 1, taken do
    local i, j = mint[k], mj[k]
    local u = A[U + i]
    out[5 + i] = first + k - 1
    E[3 * k - 2], E[3 * k - 1], E[3 * k] = u, A[R + i], A[N + i]
    -- a user with several successes in the call gets several pairs, all with its final value
    local c = cnt[j]
    local v
    if uday and uday[j] then
      v = fmt('%d:%d:%d', c, uday[j], udc[j])
    else
      v = DIGITS[c + 1] or fmt('%d', c)
    end
    local refs = urefs and urefs[j]
    if refs then refs = prune(refs) end
    if withrid and withrid[j] then
      v = v .. (refs or '') .. '/' .. ref
    elseif refs and refs ~= '' then
      v = v .. refs
    end
    kv[2 * k - 1], kv[2 * k] = u, v
  end
  call('HSET', KEYS[3], unpack(kv, 1, 2 * taken))
  local hdr = fmt('2|%d|%d|%d|%d|%d', epoch, first, now, vf, vt)
  local claims = concat(E, '|', 1, 3 * taken)
  call('XADD', KEYS[5], '*', 'h', hdr, 'c', claims)
  if withrid then
    local curkey = KEYS[4] .. ':' .. fmt('%d', cur)
    call('HSET', curkey, '@' .. ref, hdr .. '|' .. claims)
    if rotated then
      call('PEXPIRE', curkey, fmt('%d', cur + 2 * W - now))
      call('HSET', KEYS[1], 'rqc', fmt('%d', cur), 'rqp', prev and fmt('%d', prev) or '',
        'rqcq', fmt('%d', curq), 'rqpq', prevq and fmt('%d', prevq) or '')
    end
  end
  if pending then
    for i, k in pairs(pending) do
      out[5 + i] = { 2, epoch, first + k - 1, vf, vt, now, A[N + mint[k]] }
    end
  end
else
  last = tonumber(call('GET', KEYS[7]) or '0')
end
out[1], out[2], out[3], out[4], out[5] = epoch, last, now, vf, vt
return out
