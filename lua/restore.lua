-- restore.lua: rebuilds one slot of a batch (the pool or one shard) from the database,
-- after Redis lost it (the whole batch: `claimgate rebuild`; one shard that was lost or
-- rolled back by a failover: the automatic repair). Called in steps: ['fence'], 'begin',
-- any number of 'hset' / 'deny' chunks, then 'finish', which writes the slot's meta LAST:
-- the claim script refuses a slot without meta, so a slot goes live only once it is
-- complete. Every step validates its arguments before its first write. One hash slot.
--
-- KEYS (all share the hash tag {<batch>:pool} or {<batch>:<shard>}):
--   1 meta  hash    2 stock  string   3 users  hash    4 daily  hash   5 req  hash
--   6 deny  set     7 claimed string  8 xseq   string  9 outbox hash  10 log  stream
--   11 repair string  the repair lock: the id of the repairer working on the slot (expires)
--   12 codes  hash    the slot's code queue (lua/claim.lua KEYS[9])
--   13 xcodes hash    the codes of the slot's open transfers (lua/transfer_out.lua)
--   14 coupons hash   optional: the coupon states of a shard (lua/coupon.lua); 'begin'
--                     deletes it, so every coupon of the slot goes back to the database's
--                     transitions (the log is empty then: the database holds every change)
--   15 req2   hash     optional: the shard's second request-id generation (lua/rotate.lua);
--                     'begin' deletes it with KEYS[5] (the meta's generation fields go with
--                     the meta: the records the rebuild writes start a fresh generation)
-- ARGV[1] = op:
--   'fence'  ARGV 2 repairer id, 3 lock lifetime ms (> 0). Takes the repair lock unless
--            another repairer holds it; then deletes the meta: every claim on the slot is
--            refused (-1) from now on, by every gateway, until 'finish'.
--   'seal'   (no more ARGV) Deletes the meta, nothing else: the gateway that saw the slot
--            mint a coupon id again stops every claim and replay on it at once; the
--            repairer fences and restores it next.
--   'begin'  ARGV 2 force ('1' = also when the slot's meta exists, '0' = refuse then).
--            Refuses while the log holds records (not yet persisted: the database does not
--            know them). Otherwise deletes meta, stock, users, daily, req (both
--            generations), deny, outbox, codes and coupons (the claim counter, transfer sequence and log are kept), and answers the
--            stock it deleted (a repair writes it off, with its codes: part of it may have
--            been sold by a primary that was lost).
--   'hset'   ARGV 2 target ('users' | 'daily' | 'req'), 3.. field/value pairs.
--   'deny'   ARGV 2.. user ids to add to the deny set.
--   'codes'  ARGV 2 codes joined by ',' (at least one), appended to the code queue.
--   'finish' ARGV 2 stock (>= 0), 3 claim counter floor (>= 0), 4 n = number of meta
--            field/value pairs, 5 .. 4+2n the pairs (must include 'fp', 'state' and 'ver').
--            ADDS the stock (a transfer credited since 'begin' is kept; in a batch with
--            codes, meta 'codes' = '1', the stock after must equal the codes queued, or
--            nothing is written and the step fails), raises the claim
--            counter to the floor (never lowers it, so coupon ids are never reused), bumps
--            the transfer sequence, writes the meta, releases the repair lock.
-- Returns { code, n [, m] }:
--   fence:  { 1, 0 } fenced (lock taken)   { 0, 0 } another repairer holds the lock
--   seal:   { 1, 0 }
--   begin:  { 1, claim counter, stock deleted }  { -1, 0 } meta exists (not forced)
--           { -2, log length }
--   hset:   { 1, pairs written }  deny: { 1, members added }  codes: { 1, codes queued }
--   finish: { 1, claim counter after }
--   hset / deny / codes / finish: { -1, 0 } the slot's meta exists (it is live: nothing written)

local op = ARGV[1]

local function live()
  return redis.call('EXISTS', KEYS[1]) == 1
end

local function nonneg(v)
  local n = tonumber(v)
  if not n or n < 0 or n ~= math.floor(n) then return nil end
  return n
end

if op == 'fence' then
  local ttl = nonneg(ARGV[3])
  if #ARGV ~= 3 or ARGV[2] == '' or not ttl or ttl == 0 then
    return redis.error_reply('ERR restore: fence expects a repairer id and a lifetime')
  end
  local holder = redis.call('GET', KEYS[11])
  if holder and holder ~= ARGV[2] then return { 0, 0 } end
  redis.call('SET', KEYS[11], ARGV[2], 'PX', ttl)
  redis.call('DEL', KEYS[1])
  return { 1, 0 }

elseif op == 'seal' then
  if #ARGV ~= 1 then return redis.error_reply('ERR restore: seal takes no arguments') end
  redis.call('DEL', KEYS[1])
  return { 1, 0 }

elseif op == 'begin' then
  local force = ARGV[2]
  if force ~= '0' and force ~= '1' then return redis.error_reply('ERR restore: bad force flag') end
  if force ~= '1' and live() then return { -1, 0 } end
  local len = redis.call('XLEN', KEYS[10])
  if len > 0 then return { -2, len } end
  local stock = tonumber(redis.call('GET', KEYS[2]) or '0')
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[9], KEYS[12],
    KEYS[13])
  if KEYS[14] then redis.call('DEL', KEYS[14]) end
  if KEYS[15] then redis.call('UNLINK', KEYS[15]) end
  return { 1, tonumber(redis.call('GET', KEYS[7]) or '0'), stock }

elseif op == 'hset' then
  local target
  if ARGV[2] == 'users' then target = KEYS[3]
  elseif ARGV[2] == 'daily' then target = KEYS[4]
  elseif ARGV[2] == 'req' then target = KEYS[5]
  else return redis.error_reply('ERR restore: bad hset target') end
  if #ARGV < 4 or (#ARGV - 2) % 2 ~= 0 then return redis.error_reply('ERR restore: bad pair list') end
  if ARGV[2] == 'users' then
    for i = 4, #ARGV, 2 do
      if not nonneg(ARGV[i]) then return redis.error_reply('ERR restore: bad user count') end
    end
  end
  if live() then return { -1, 0 } end
  local kv = {}
  for i = 3, #ARGV do kv[#kv + 1] = ARGV[i] end
  redis.call('HSET', target, unpack(kv))
  return { 1, (#ARGV - 2) / 2 }

elseif op == 'deny' then
  if #ARGV < 2 then return redis.error_reply('ERR restore: no members') end
  if live() then return { -1, 0 } end
  local members = {}
  for i = 2, #ARGV do members[#members + 1] = ARGV[i] end
  return { 1, redis.call('SADD', KEYS[6], unpack(members)) }

elseif op == 'codes' then
  if #ARGV ~= 2 or ARGV[2] == '' then return redis.error_reply('ERR restore: codes expects one list') end
  local codes = {}
  for c in string.gmatch(ARGV[2], '[^,]+') do codes[#codes + 1] = c end
  if live() then return { -1, 0 } end
  local fmt = string.format
  local q = redis.call('HMGET', KEYS[12], 't', 'n')
  local t, n = tonumber(q[1] or '0') or 0, tonumber(q[2] or '0') or 0
  for i = 1, #codes, 64 do
    redis.call('HSET', KEYS[12], fmt('%d', t), table.concat(codes, ',', i, math.min(i + 63, #codes)))
    t = t + 1
  end
  redis.call('HSET', KEYS[12], 't', fmt('%d', t), 'n', fmt('%d', n + #codes))
  return { 1, n + #codes }

elseif op == 'finish' then
  local stock, floor, n = nonneg(ARGV[2]), nonneg(ARGV[3]), nonneg(ARGV[4])
  if not stock then return redis.error_reply('ERR restore: bad stock') end
  if not floor then return redis.error_reply('ERR restore: bad claim counter') end
  if not n or n < 1 or #ARGV ~= 4 + 2 * n then return redis.error_reply('ERR restore: bad pair count') end
  local has = {}
  for i = 5, 4 + 2 * n, 2 do has[ARGV[i]] = true end
  if not (has.fp and has.state and has.ver) then
    return redis.error_reply('ERR restore: meta needs fp, state and ver')
  end
  if live() then return { -1, 0 } end
  for i = 5, 4 + 2 * n, 2 do
    if ARGV[i] == 'codes' and ARGV[i + 1] == '1' then
      local after = tonumber(redis.call('GET', KEYS[2]) or '0') + stock
      local queued = tonumber(redis.call('HGET', KEYS[12], 'n') or '0')
      if after ~= queued then
        return redis.error_reply('ERR restore: stock ' .. after .. ' but ' .. queued .. ' codes queued')
      end
    end
  end
  redis.call('INCRBY', KEYS[2], string.format('%d', stock))
  local claimed = tonumber(redis.call('GET', KEYS[7]) or '0')
  if floor > claimed then
    claimed = floor
    redis.call('SET', KEYS[7], string.format('%d', claimed))
  end
  redis.call('INCR', KEYS[8])
  local kv = {}
  for i = 5, 4 + 2 * n do kv[#kv + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(kv))
  redis.call('DEL', KEYS[11])
  return { 1, claimed }
end

return redis.error_reply('ERR restore: unknown op')
