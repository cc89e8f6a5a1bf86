-- claim.lua: the claims against one home shard of a batch, group-committed: n claims (1 at
-- light load, more while an earlier call to the shard was in flight; src/stock/group.rs) in
-- ONE atomic call, decided one after the other in argument order exactly as n calls of one
-- claim each would be: a later claim of the call sees every effect of the earlier ones (a
-- user's count and day count, a request id minted earlier in the call, the stock and log
-- length left). Reads and writes are per call, not per claim: one HMGET each of meta,
-- request ids, counts and day counts, one TIME, one XLEN, one GET of the stock (and of the
-- claim counter when the caller gives the highest sequence it saw), one write of each hash,
-- one XADD for all the coupons minted; per claim only a SISMEMBER when the shard has a deny
-- list.
-- Atomic; one hash slot.
--
-- KEYS (all share the hash tag {<batch>:<shard>}):
--   1 meta     hash   state, start, end, limit, daily, vdays, vfrom, vto, ver, epoch (the
--                     coupon-id epoch, absent = 0: bumped, durably first, by every rebuild);
--                     and the request-id generations lua/rotate.lua keeps: 'rqc' (which
--                     generation is current: '1' = KEYS[11], else KEYS[5]; absent = no
--                     rotation yet), 'rqo' ('1' = the other one holds records), 'rqd' ('1'
--                     = records were dropped: a request id may have succeeded before
--                     without a record here, and only the database knows)
--   2 stock    string coupons left in this shard
--   3 users    hash   user -> coupons claimed from this batch (per-user limit)
--   4 daily    hash   user -> "<local day>:<count>" (per-user daily limit; the day number in
--                     the batch's zone, see ARGV 5)
--   5 req      hash   "<user>|<request id>" -> "<coupon>|<valid_from>|<valid_to>|<claimed_at>|<nonce>":
--                     one of the two request-id generations (meta 'rqc' says which is
--                     current: records are written there, and looked up in both)
--   6 log      stream claim records for the persister
--   7 deny     set    users of this shard denied by the batch's eligibility rules
--   8 claimed  string coupons claimed from this shard (also the coupon sequence)
--   9 codes    hash   the shard's codes, when the batch hands out codes (meta 'codes' = '1'):
--                     a queue of blocks, fields 'h' (index of the head block), 't' (index
--                     the next block is written at), 'n' (codes held: always equal to the
--                     stock), and '<index>' -> a block of codes joined by ',' (at most
--                     sixty-four of them). A claim that
--                     mints takes the code at the head; a transfer moves codes with the
--                     stock (lua/transfer_out.lua, lua/transfer_in.lua).
--  10 coupons hash   optional: the coupon states of the shard (lua/coupon.lua): seq ->
--                     '<version>|<state>|<order>|<step>|<lock until>|<user>|<valid_from>|
--                     <valid_to>|<claimed_at>|<code>'. Given, every coupon minted gets its
--                     entry ('0|unused||||<user>|...'), its claim record the field m '1' (its
--                     state lives here, src/coupons/), and the coupon can be locked,
--                     redeemed and released at once, with the database down or behind.
--  11 req2     hash   optional: the other request-id generation (as KEYS[5]). Required once
--                     the meta has 'rqc' (a rotation started): the call fails without it.
-- ARGV:
--   1 n, the number of claims in this call: an integer, 1 <= n <= 1000
--   2 max log length, in entries (0 = unbounded)   3 batch id   4 shard index
--   5 the batch's UTC offset in ms now (an integer, |offset| < 86400000; east positive): the
--     day is floor((now + offset) / 86400000), now from TIME, so the per-user daily limit
--     resets at midnight in the batch's time zone ('0' = UTC). The gateway computes the
--     offset for its own clock's now (src/domain/time.rs Zone) and groups only claims with
--     the same offset. Edge: on a day a DST change happens, the offset passed can be the one
--     before the change for claims right after it (gateway and Redis clocks differ by ms).
--     Most zones change at 01:00 to 03:00 local, far from midnight, so the day a claim
--     counts on is the same with either offset; in the few that change at midnight
--     (America/Santiago, Asia/Beirut, ...) a claim in the milliseconds after the change may
--     count on the day before it.
--   then, column by column (claim i = 1..n):
--   5 + i        user id of claim i (non-empty)
--   5 + n + i    request id of claim i ('' = none)
--   5 + 2n + i   nonce of claim i's HTTP request (recorded with the request id, returned
--                on replay, so a caller that repeats its own call after a lost reply can
--                tell it minted the coupon)
--   then, optionally (absent = '0'):
--   6 + 3n       the highest coupon sequence the caller saw this shard hand out (an integer
--                >= 0, '0' = none; src/domain/ids.rs MintWindow): a shard whose next
--                sequence is at or below it was rolled back (a failover to a replica that
--                lagged) and would mint an id already handed out. Then no claim of the call
--                mints (-11), and nothing is written: a claim written here would reach the
--                database as the owner of that id when the claim it first went to was lost,
--                and a repair would restore it for its retry to replay.
--   7 + 3n       optional (absent = none): n characters '0' / '1', character i for claim i;
--                '1' = the caller asked the database about claim i's request id and it
--                holds no success of it (or the request id is the gateway's own, fresh), so
--                a miss here is a new request even where records were dropped (no -12)
-- Returns an array of n answers, answer i for claim i:
--   { 1, coupon_id, valid_from_ms, valid_to_ms, claimed_at_ms }   claimed now
--   { 1, coupon_id, valid_from_ms, valid_to_ms, claimed_at_ms, '', code }   claimed now, in
--                   a batch that hands out codes: the code it got
--   { 2, coupon_id, valid_from_ms, valid_to_ms, claimed_at_ms, nonce [, code] }   replay of
--                   an earlier success of this user and request id, in an earlier call or
--                   earlier in this one ('' nonce if none was recorded; the code when the
--                   coupon has one)
--   { 0, code } refused, nothing written for this claim; code:
--     -1 no such batch in this shard (every claim of the call)   -2 window not started
--     -3 window ended   -4 paused   -5 user denied   -6 per-user limit
--     -7 per-user daily limit
--     -8 shard has no stock (the caller refills or declares sold out). This is also the
--        budget check: a batch with a money budget has at most floor(budget / face value)
--        stock in all (src/domain/batch.rs), so each shard's stock is its share of the
--        budget, and decrementing only stock that is there never spends past it.
--     -9 claim log backlog at its bound (shed, nothing claimed)
--     -11 the shard was rolled back: its next sequence is at or below ARGV 6 + 3n (the
--        caller seals the shard and has it repaired; nothing claimed)
--     -12 ask the database: the request id has no record here, records were dropped (meta
--        'rqd', request-id retention), the user had a success before this call and the
--        claim is not marked checked (ARGV 7 + 3n). It may be the replay of a success
--        whose record expired: the caller answers that success from the database, or
--        resubmits the claim marked checked. A user with no success yet needs no look.
--   Each claim is checked in this order: replay, -12, -11, -4, -2, -3, -5, -6, -7, -9, -8.
-- Validates every argument and decides every claim before the first write (a script that
-- errors half-way keeps its writes): a bad argument fails the whole call with an error
-- reply, nothing written.
-- Coupon id: '<batch>.<shard>.<seq>', seq = epoch * 10^12 + KEYS[8] after its increment
--   (1, 2, ...). The claim counter never goes back while Redis keeps it; a Redis that lost it
--   (data loss, a failover to a lagging replica) is rebuilt in a new epoch, so an id minted
--   before the loss is never minted again (src/domain/ids.rs EPOCH_SPAN is the same 10^12).
-- Claims record: ONE XADD to KEYS[6] per call that mints (k coupons, k >= 1), these fields
--   in this order (src/contract/claim_record.rs reads them):
--   k 'claims'   b batch id   s shard index   q the first coupon's sequence (coupon j of the
--   call, from 0, has q + j)   t claimed at (ms)   vf valid from (ms)   vt valid to (ms)
--   u the k users, in sequence order, joined by '|'   r their request ids joined by '|'
--   ('' = none)   [cd their codes joined by '|': only in a batch that hands out codes]
--   [m '1': given KEYS[10]]. Ids and codes never hold '|' (src/domain/ids.rs).
--   The backlog bound (ARGV 2) counts these entries: a call is refused -9 when the log
--   already holds that many, so it holds at most that many calls' claims.
-- Request-id record (KEYS[5] value): '<coupon>|<vf>|<vt>|<at>|<nonce>', then '|<code>' when
--   the coupon has a code.

local call, tonumber, floor, fmt, unpack = redis.call, tonumber, math.floor, string.format, unpack
local A = ARGV

local function fail(msg) return redis.error_reply('ERR claim: ' .. msg) end

local n = tonumber(A[1])
if not n or n < 1 or n > 1000 or n ~= floor(n) then return fail('n must be an integer in 1..1000') end
if #A < 5 + 3 * n or #A > 7 + 3 * n then
  return fail('expects n, max log, batch, shard, day offset, then n users, n request ids, n nonces'
    .. ' [, the highest sequence seen [, n checked flags]]')
end
local maxlog = tonumber(A[2])
if not maxlog or maxlog < 0 or maxlog ~= floor(maxlog) then return fail('bad max log length') end
local offset = tonumber(A[5])
if not offset or offset ~= floor(offset) or offset <= -86400000 or offset >= 86400000 then
  return fail('the day offset must be an integer of ms, |offset| < 86400000')
end
local U, R, N = 5, 5 + n, 5 + 2 * n -- claim i: user A[U + i], request id A[R + i], nonce A[N + i]
local seenmax = tonumber(A[6 + 3 * n] or '0')
if not seenmax or seenmax < 0 or seenmax ~= floor(seenmax) then return fail('bad highest sequence seen') end
for i = U + 1, U + n do
  if A[i] == '' then return fail('empty user id') end
end
local checked = A[7 + 3 * n] or ''
if checked ~= '' and (#checked ~= n or string.find(checked, '[^01]')) then
  return fail('checked flags must be n characters 0 or 1')
end
local batch, shard = A[3], A[4]

local out = {}
local m = call('HMGET', KEYS[1], 'state', 'start', 'end', 'limit', 'daily', 'vdays', 'vfrom',
  'vto', 'epoch', 'codes', 'rqc', 'rqo', 'rqd')
if not m[1] then
  local none = { 0, -1 }
  for i = 1, n do out[i] = none end
  return out
end

-- The request-id generations: records are written to the current one, looked up in both.
local cur, old = KEYS[5], KEYS[11]
if m[11] then
  if not old then return fail('the shard rotates request ids: KEYS[11] is required') end
  if m[11] == '1' then cur, old = old, cur end
end
local dropped = m[13] == '1'

-- Earlier successes of the call's request ids: one read for all of them (and one of the
-- other generation for those not found, while it holds records).
local F, fields, prev, nf = {}, {}, {}, 0 -- F[i]: claim i's request field (false: none)
for i = 1, n do
  local rid = A[R + i]
  if rid ~= '' then
    local f = A[U + i] .. '|' .. rid
    F[i] = f
    nf = nf + 1
    fields[nf] = f
  else
    F[i] = false
  end
end
local missed = 0 -- request fields found in neither generation
if nf > 0 then
  local got = call('HMGET', cur, unpack(fields))
  local rest, nr = {}, 0
  for j = 1, nf do
    if got[j] then prev[fields[j]] = got[j] else nr = nr + 1; rest[nr] = fields[j] end
  end
  if nr > 0 and m[12] == '1' then
    got = call('HMGET', old, unpack(rest))
    for j = 1, nr do
      if got[j] then prev[rest[j]] = got[j] end
    end
  end
  for j = 1, nr do
    if not prev[rest[j]] then missed = missed + 1 end
  end
end

-- Rolled back: the next sequence this shard would mint was already handed out.
local rolled = seenmax > 0
  and (tonumber(m[9] or '0') or 0) * 1000000000000 + (tonumber(call('GET', KEYS[8]) or '0') or 0) + 1
    <= seenmax

local t = call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
local closed -- the refusal of every claim that is not a replay, if the window says so
if m[1] ~= 'active' then closed = -4
elseif now < tonumber(m[2]) then closed = -2
elseif now >= tonumber(m[3]) then closed = -3
end

local limit, daily = tonumber(m[4]), tonumber(m[5])
local day = floor((now + offset) / 86400000)
local used, had, today, deny, loglen, stock = {}, {}, {}, 0, 0, 0
-- had[u]: the user's count before this call (a claim that may need the database's look
-- needs it even when the window is closed)
if not closed or (dropped and missed > 0) then
  local got = call('HMGET', KEYS[3], unpack(A, U + 1, U + n))
  for i = 1, n do
    local u = A[U + i]
    if used[u] == nil then
      used[u] = tonumber(got[i] or '0')
      if not used[u] then return fail('corrupt per-user count of ' .. u) end
      had[u] = used[u]
    end
  end
end
if not closed then
  deny = call('SCARD', KEYS[7])
  if daily > 0 then
    local got = call('HMGET', KEYS[4], unpack(A, U + 1, U + n))
    for i = 1, n do
      local u = A[U + i]
      if today[u] == nil then
        local cnt = 0
        if got[i] then
          local dd, c = string.match(got[i], '^(%-?%d+):(%d+)$')
          if tonumber(dd) == day then cnt = tonumber(c) end
        end
        today[u] = cnt
      end
    end
  end
  if maxlog > 0 then loglen = call('XLEN', KEYS[6]) end
  stock = tonumber(call('GET', KEYS[2]) or '0')
  if not stock then return fail('corrupt stock') end
end

-- Decide every claim, in order; nothing written yet.
local minted = {}   -- request field -> index of the claim of this call that minted it
local wins = {}     -- indexes of the claims that mint, in sequence order
local k = 0
for i = 1, n do
  local u, f = A[U + i], F[i]
  local p = f and prev[f]
  if p then
    local c, vf, vt, at, nonce, code = string.match(p, '^([^|]*)|(%d+)|(%d+)|(%d+)|([^|]*)|([^|]*)$')
    if c then
      out[i] = { 2, c, tonumber(vf), tonumber(vt), tonumber(at), nonce, code }
    else
      c, vf, vt, at, nonce = string.match(p, '^([^|]*)|(%d+)|(%d+)|(%d+)|?([^|]*)$')
      out[i] = { 2, c, tonumber(vf), tonumber(vt), tonumber(at), nonce or '' }
    end
  elseif f and minted[f] then
    out[i] = minted[f] -- resolved to a replay once its coupon id is known (below)
  elseif f and dropped and had[u] > 0 and string.byte(checked, i) ~= 49 then -- 49: '1'
    out[i] = { 0, -12 }
  elseif rolled then
    out[i] = { 0, -11 }
  elseif closed then
    out[i] = { 0, closed }
  elseif deny > 0 and call('SISMEMBER', KEYS[7], u) == 1 then
    out[i] = { 0, -5 }
  elseif used[u] >= limit then
    out[i] = { 0, -6 }
  elseif daily > 0 and today[u] >= daily then
    out[i] = { 0, -7 }
  elseif maxlog > 0 and loglen >= maxlog then
    out[i] = { 0, -9 }
  elseif stock <= 0 then
    out[i] = { 0, -8 }
  else
    k = k + 1
    wins[k] = i
    used[u] = used[u] + 1
    if daily > 0 then today[u] = today[u] + 1 end
    stock = stock - 1
    if f then minted[f] = i end
  end
end
if k == 0 then return out end

-- Write: every check passed for the k winners.
local vf, vt
local vdays = tonumber(m[6])
if vdays > 0 then
  vf = now
  vt = now + vdays * 86400000
else
  vf = tonumber(m[7])
  vt = tonumber(m[8])
end
local sf, st, sn = fmt('%d', vf), fmt('%d', vt), fmt('%d', now)

-- The k codes at the head of the shard's queue (read here, written below: nothing is written
-- unless all k are there).
local codes, blocks, head, held
if m[10] == '1' then
  local q = call('HMGET', KEYS[9], 'h', 'n')
  head, held = tonumber(q[1] or '0'), tonumber(q[2] or '0')
  if not head or not held or held < k then return fail('the shard holds fewer codes than stock') end
  codes, blocks = {}, {}
  local b = head
  while #codes < k do
    local block = call('HGET', KEYS[9], fmt('%d', b))
    if not block then return fail('code block ' .. b .. ' missing') end
    local rest = {}
    for c in string.gmatch(block, '[^,]+') do
      if #codes < k then codes[#codes + 1] = c else rest[#rest + 1] = c end
    end
    blocks[#blocks + 1] = { b, table.concat(rest, ',') }
    b = b + 1
  end
end

call('DECRBY', KEYS[2], k)
local base = call('INCRBY', KEYS[8], k) - k + (tonumber(m[9] or '0') or 0) * 1000000000000
local prefix = batch .. '.' .. shard .. '.'
local counts, days, reqs, seen, nc, nr = {}, {}, {}, {}, 0, 0
local managed, states = KEYS[10] ~= nil, {}
local tail = '|' .. sf .. '|' .. st .. '|' .. sn .. '|'
if codes then
  for _, blk in ipairs(blocks) do
    if blk[2] == '' then
      call('HDEL', KEYS[9], fmt('%d', blk[1]))
      head = blk[1] + 1
    else
      call('HSET', KEYS[9], fmt('%d', blk[1]), blk[2])
    end
  end
  call('HSET', KEYS[9], 'h', fmt('%d', head), 'n', fmt('%d', held - k))
end
local lu, lr, lc = {}, {}, {} -- the log entry's users, request ids, codes
local first -- the first coupon's sequence, formatted
for j = 1, k do
  local i = wins[j]
  local u, f = A[U + i], F[i]
  local seq = fmt('%d', base + j)
  if j == 1 then first = seq end
  local coupon = prefix .. seq
  local code = codes and codes[j]
  if code then
    out[i] = { 1, coupon, vf, vt, now, '', code }
    lc[j] = code
  else
    out[i] = { 1, coupon, vf, vt, now }
  end
  lu[j] = u
  lr[j] = A[R + i]
  if not seen[u] then
    seen[u] = true
    counts[nc + 1] = u
    counts[nc + 2] = used[u]
    if daily > 0 then
      days[nc + 1] = u
      days[nc + 2] = day .. ':' .. today[u]
    end
    nc = nc + 2
  end
  if f then
    reqs[nr + 1] = f
    reqs[nr + 2] = code and (coupon .. tail .. A[N + i] .. '|' .. code) or (coupon .. tail .. A[N + i])
    nr = nr + 2
  end
  if managed then
    states[2 * j - 1] = seq
    states[2 * j] = '0|unused||||' .. u .. '|' .. sf .. '|' .. st .. '|' .. sn .. '|' .. (code or '')
  end
end
-- ONE log entry for the k coupons of this call.
local users, rids = lu[1], lr[1] -- one coupon: nothing to join
if k > 1 then users, rids = table.concat(lu, '|'), table.concat(lr, '|') end
local entry = { 'k', 'claims', 'b', batch, 's', shard, 'q', first, 't', sn, 'vf', sf, 'vt', st,
  'u', users, 'r', rids }
if codes then
  entry[#entry + 1] = 'cd'
  entry[#entry + 1] = table.concat(lc, '|')
end
if managed then
  entry[#entry + 1] = 'm'
  entry[#entry + 1] = '1'
end
call('XADD', KEYS[6], '*', unpack(entry))
if managed and k > 0 then call('HSET', KEYS[10], unpack(states)) end
call('HSET', KEYS[3], unpack(counts))
if daily > 0 then call('HSET', KEYS[4], unpack(days)) end
if nr > 0 then call('HSET', cur, unpack(reqs)) end
-- A repeat of a request id minted earlier in this call: the minting claim's coupon.
for i = 1, n do
  local w = out[i]
  if type(w) == 'number' then
    local c = out[w]
    out[i] = { 2, c[2], vf, vt, now, A[N + w], c[7] }
  end
end
return out
