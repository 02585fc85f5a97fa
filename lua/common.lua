-- common.lua — helpers shared by every presence script. The gateway prepends this file to each
-- script when it loads them (gateway/src/redis/scripts.rs), so a script's text in Redis is
-- common.lua followed by the script; each script still runs as one atomic call.
--
-- Every presence script takes the same KEYS, all hash-tagged with the room:
--   KEYS[1] <p>:room:{R}            HASH  room record (exists = the room exists)
--   KEYS[2] <p>:room:{R}:presence   HASH  conn id '<node>.<n>' -> meta JSON (signed-in only)
--   KEYS[3] <p>:room:{R}:anon       HASH  node id -> anonymous viewers on that node
--   KEYS[4] <p>:room:{R}:nodes      ZSET  node id -> lease expiry (ms, Redis clock)
--   KEYS[5] <p>:room:{R}:seq        STRING presence change counter
--   KEYS[6] <p>:room:{R}:events     channel for room events and presence changes
--   KEYS[7] <p>:room:{R}:members    HASH  user id -> that user's connections in KEYS[2] (the events
--                                         hook's member edges; kept in step by every script)
--   KEYS[8] <p>:room:{R}:unacked    HASH  the events hook's outbox: event id ->
--                                         '<owner node>|<since ms>|<at ms>|<username>' (see outbox)
--
-- A node's presence fields and anonymous count are live only while its lease in KEYS[4] is; every
-- script sweeps the entries of nodes without one (see sweep). Nothing is written to a room whose
-- record KEYS[1] is gone.
--
-- A change is published on KEYS[6] as one JSON envelope with absolute values where possible:
--   {"seq":S,"anon":<anonymous total>,"joins":{"<conn>":<meta>,...},"leaves":["<conn>",...]}
-- seq grows by exactly one per published change, so a gap tells a node it missed something.

local K_ROOM, K_PRESENCE, K_ANON, K_NODES, K_SEQ, K_EVENTS, K_MEMBERS, K_UNACKED =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]

-- Lease times come from Redis's clock, never from a gateway's.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Integers up to 2^53 as plain digits (tostring would print 1.8e+15).
local function int(n)
  return string.format('%.0f', n)
end

-- The current seq. A missing counter (first use, expired, or a Redis restart) starts at the Redis
-- time in microseconds, so it is always above any seq the room had before: mirrors see a jump and
-- re-snapshot instead of dropping new changes as old ones. Like every presence key it expires
-- key_ttl_ms after the room's last change or heartbeat.
local function current_seq(key_ttl_ms)
  local s = redis.call('GET', K_SEQ)
  if s then return tonumber(s) end
  local t = redis.call('TIME')
  local v = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', K_SEQ, v, 'PX', key_ttl_ms)
  return tonumber(v)
end

local function next_seq(key_ttl_ms)
  current_seq(key_ttl_ms)
  return redis.call('INCR', K_SEQ)
end

-- Sum of the live nodes' anonymous counts (call after sweep: only live nodes' fields are left).
local function anon_total()
  local n = 0
  for _, v in ipairs(redis.call('HVALS', K_ANON)) do
    local x = tonumber(v) or 0
    if x > 0 then n = n + x end
  end
  return n
end

-- The room's leases, read once: the set of nodes whose lease is live (expiry after now), the list
-- of lapsed ones, the smallest live node id, and whether the lease set exists at all. O(nodes).
local function leases(now)
  local flat = redis.call('ZRANGEBYSCORE', K_NODES, '-inf', '+inf', 'WITHSCORES')
  local live, lapsed, first = {}, {}, nil
  for i = 1, #flat, 2 do
    local n = flat[i]
    if (tonumber(flat[i + 1]) or 0) > now then
      live[n] = true
      if first == nil or n < first then first = n end
    else
      lapsed[#lapsed + 1] = n
    end
  end
  return live, lapsed, first, #flat > 0
end

-- The events hook (DESIGN §12). A script call reports the edges its own change caused, in its
-- reply, so the change and the fact that it is to be reported are one atomic step: exactly one
-- node (the caller) learns of each edge, whichever node's sockets it concerns.
--   member_added / member_removed: a user's count in K_MEMBERS went 0 -> >0 / >0 -> 0. Every
--     script adds up its changes per user (count_conn) and applies them at the end with one
--     HINCRBY per user (members_begin / members_finish).
--   room_occupied / room_vacated: the room's viewers (signed-in connections + the live anonymous
--     counts the scripts keep per node) went 0 -> >0 / >0 -> 0 across the call.
-- The reply's edges part: {} (none), or {seq, at_ms, type1, user1, username1, type2, ...} with
-- user '' on room_* edges; seq is the one this call's change was published with.
local m_delta, m_order, m_occupied, m_has, m_total = {}, {}, false, false, nil

-- The user id and username of a meta JSON (nil for an unreadable one).
local function meta_user(meta)
  if not meta then return nil end
  local ok, m = pcall(cjson.decode, meta)
  if not ok or type(m) ~= 'table' or type(m.user_id) ~= 'string' then return nil end
  return m.user_id, type(m.username) == 'string' and m.username or ''
end

-- One connection of the user of `meta` came (d = 1) or went (d = -1) in this call.
local function count_conn(meta, d)
  local u, name = meta_user(meta)
  if not u then return end
  local e = m_delta[u]
  if not e then
    e = { 0, name }
    m_delta[u] = e
    m_order[#m_order + 1] = u
  end
  e[1] = e[1] + d
  if d > 0 or e[2] == '' then e[2] = name end
end

-- Whether the room has a viewer: a signed-in connection or a live anonymous count.
local function occupied()
  return redis.call('HLEN', K_PRESENCE) > 0 or anon_total() > 0
end

-- Call first in a script that may change presence. Notes whether the room was occupied, and
-- heals a members hash that drifted from the presence hash in a way seen at no cost here:
--   - presence without a members hash (evicted or deleted on its own): rebuilt from the metas,
--     without edges (those users were reported when they came);
--   - a members hash without presence: its users are gone, reported as member_removed.
local function members_begin()
  local conns = redis.call('HLEN', K_PRESENCE)
  local has = redis.call('EXISTS', K_MEMBERS) == 1
  m_has = has or conns > 0
  if conns > 0 and not has then
    local n = {}
    for _, meta in ipairs(redis.call('HVALS', K_PRESENCE)) do
      local u = meta_user(meta)
      if u then n[u] = (n[u] or 0) + 1 end
    end
    for u, c in pairs(n) do redis.call('HSET', K_MEMBERS, u, c) end
  elseif conns == 0 and has then
    local flat = redis.call('HGETALL', K_MEMBERS)
    for i = 1, #flat, 2 do
      local u = flat[i]
      m_delta[u] = { -(tonumber(flat[i + 1]) or 0), '' }
      m_order[#m_order + 1] = u
    end
  end
  m_occupied = conns > 0 or anon_total() > 0
end

-- The full check, for the heartbeat's scan (about once per room per interval across all nodes):
-- the members hash must hold, per user, the number of that user's fields in the presence hash.
-- O(users) when it does; when it does not (a mixed-version cluster, a lost write), every user's
-- count is set to the truth and the differences are reported like any change.
local function members_check()
  -- no members hash and no connection (members_begin saw both): nothing can disagree
  if not m_has and #m_order == 0 then return end
  local sum, have = 0, {}
  local flat = redis.call('HGETALL', K_MEMBERS)
  for i = 1, #flat, 2 do
    local c = tonumber(flat[i + 1]) or 0
    have[flat[i]] = c
    sum = sum + c
  end
  for _, e in pairs(m_delta) do sum = sum + e[1] end
  if sum == redis.call('HLEN', K_PRESENCE) then return end
  local truth, names = {}, {}
  for _, meta in ipairs(redis.call('HVALS', K_PRESENCE)) do
    local u, name = meta_user(meta)
    if u then
      truth[u] = (truth[u] or 0) + 1
      names[u] = name
    end
  end
  local function fix(u, d)
    local e = m_delta[u]
    if not e then
      e = { 0, names[u] or '' }
      m_delta[u] = e
      m_order[#m_order + 1] = u
    end
    e[1] = e[1] + d
  end
  for u, c in pairs(have) do
    local pending = m_delta[u] and m_delta[u][1] or 0
    local want = truth[u] or 0
    if c + pending ~= want then fix(u, want - c - pending) end
  end
  for u, c in pairs(truth) do
    if have[u] == nil then
      local pending = m_delta[u] and m_delta[u][1] or 0
      if pending ~= c then fix(u, c - pending) end
    end
  end
end

-- Applies this call's per-user changes to the members hash (one HINCRBY per changed user) and
-- returns the edges they and the viewer count caused: {type, user, username, ...} ({} if none).
local function members_finish()
  local added, removed = {}, {}
  for _, u in ipairs(m_order) do
    local e = m_delta[u]
    if e[1] ~= 0 then
      local after = redis.call('HINCRBY', K_MEMBERS, u, e[1])
      local before = after - e[1]
      if after <= 0 then redis.call('HDEL', K_MEMBERS, u) end
      if before <= 0 and after > 0 then
        added[#added + 1] = u
      elseif before > 0 and after <= 0 then
        removed[#removed + 1] = u
      end
    end
  end
  local conns = redis.call('HLEN', K_PRESENCE)
  -- (a room that had no members hash and no member change this call has none now: no EXISTS)
  if conns == 0 and (m_has or #m_order > 0) and redis.call('EXISTS', K_MEMBERS) == 1 then
    -- no connection left, yet counts remain (drift): those users are gone as well
    local flat = redis.call('HGETALL', K_MEMBERS)
    for i = 1, #flat, 2 do
      local u = flat[i]
      if (tonumber(flat[i + 1]) or 0) > 0 then
        if not m_delta[u] then m_delta[u] = { 0, '' } end
        removed[#removed + 1] = u
      end
    end
    redis.call('DEL', K_MEMBERS)
  end
  local now_occupied = conns > 0
  if not now_occupied then
    m_total = anon_total()
    now_occupied = m_total > 0
  end
  local edges = {}
  local function edge(t, u, name)
    edges[#edges + 1] = t
    edges[#edges + 1] = u
    edges[#edges + 1] = name
  end
  if now_occupied and not m_occupied then edge('room_occupied', '', '') end
  for _, u in ipairs(added) do edge('member_added', u, m_delta[u][2]) end
  for _, u in ipairs(removed) do edge('member_removed', u, m_delta[u][2]) end
  if m_occupied and not now_occupied then edge('room_vacated', '', '') end
  return edges
end

-- The anonymous total after members_finish, read again only if members_finish did not need it
-- (the scripts change no anonymous count after members_finish).
local function total_after()
  return m_total or anon_total()
end

-- The events hook's outbox (DESIGN §12). With the hook on (the caller passes the flag, and
-- KEYS[8]), every edge a call reports is also written to K_UNACKED in the same call, field = the
-- event id '<room>:<seq>:<type>[:<user>]', value = '<owner>|<since>|<at>|<username>': the node
-- that is to post it, since when it is (Redis ms), the change's time, the username. The owner
-- deletes the field once the application acknowledged the event (or its retries ran out).
-- Takeover: a call whose sweep found a dead node (rare) reads the whole outbox and takes over the
-- entries of every owner without a live lease, and (ob_stale, the heartbeat's scan) every entry
-- held longer than ob_stale by anyone (a node whose script reply or acknowledgement was lost):
-- it rewrites the owner part to the caller and returns them (ob_taken) to be posted again with
-- their original ids. Off (no flag): nothing is read or written here.
local ob_on, ob_node, ob_stale, ob_taken = false, nil, nil, {}
-- Whether touch refreshes the outbox's TTL: only calls that wrote to it, and heartbeats (which
-- keep it alive while the room is), so a call without an edge costs the outbox nothing.
local ob_touch = false

-- Call first: flag '1' (and KEYS[8] given) turns the outbox on for caller `node`; stale: ms or nil.
local function outbox_setup(node, flag, stale)
  ob_on = K_UNACKED ~= nil and flag == '1' and node ~= nil and node ~= ''
  ob_node = node
  ob_stale = tonumber(stale or '')
  if ob_stale and ob_stale <= 0 then ob_stale = nil end
end

-- The room id inside K_ROOM's hash tag.
local function room_id()
  return string.match(K_ROOM, '{([^{}]*)}$') or ''
end

-- Writes the edges of one change (published with seq at time now) to the outbox: one HSET.
local function outbox_write(seq, now, edges)
  if not ob_on or #edges == 0 then return end
  local base = room_id() .. ':' .. int(seq) .. ':'
  local head = ob_node .. '|' .. int(now) .. '|' .. int(now) .. '|'
  local args = {}
  for i = 1, #edges, 3 do
    local id = base .. edges[i]
    if edges[i + 1] ~= '' then id = id .. ':' .. edges[i + 1] end
    args[#args + 1] = id
    args[#args + 1] = head .. edges[i + 2]
  end
  redis.call('HSET', K_UNACKED, unpack(args))
  ob_touch = true
end

-- Takes over the outbox entries of owners not in `live` (and, with ob_stale, entries older than
-- it), see above. O(entries); called only when a dead node was found or on the heartbeat's scan.
local function outbox_takeover(now, live)
  if not ob_on then return end
  local flat = redis.call('HGETALL', K_UNACKED)
  for i = 1, #flat, 2 do
    local id, v = flat[i], flat[i + 1]
    local owner, since, at, name = string.match(v, '^([^|]*)|(%d+)|(%d+)|(.*)$')
    if owner and ((owner ~= ob_node and not live[owner])
        or (ob_stale and tonumber(since) + ob_stale < now)) then
      redis.call('HSET', K_UNACKED, id, ob_node .. '|' .. int(now) .. '|' .. at .. '|' .. name)
      ob_taken[#ob_taken + 1] = id
      ob_taken[#ob_taken + 1] = at
      ob_taken[#ob_taken + 1] = name
      ob_touch = true
    end
  end
end

-- The takeover part of a reply: {} or {id1, at1, username1, id2, ...}.
local function taken_reply()
  return ob_taken
end

-- The edges part of a reply (see above); with the outbox on, the edges are written to it too.
local function edges_reply(seq, now, edges)
  if #edges == 0 then return {} end
  outbox_write(seq, now, edges)
  local r = { seq, now }
  for _, x in ipairs(edges) do r[#r + 1] = x end
  return r
end

-- Removes the entries of every node without a live lease: its lease lapsed, or it has none at all
-- (the lease set was evicted or expired, a lease went while a field stayed behind). Such entries
-- are dead: they would otherwise be counted and listed forever.
-- Cheap on the common path (O(nodes)): the leases and the anonymous fields (one per node) are
-- always checked; the presence hash (one field per signed-in connection) is scanned only when
--   - a dead node was found that way (a lapsed lease, an anonymous count without a lease), or
--   - the lease set does not exist at all (then every field is an orphan), or
--   - the caller has no live lease (it may hold orphans itself: a node's first call in a room), or
--   - scan = 'all' (snapshot: it reads the whole hash anyway), or
--   - scan = 'first' and the caller is the live node with the smallest id (heartbeat: about one
--     scan per room per heartbeat interval across all nodes, not one per node).
-- Liveness is decided before the caller renews its own lease: a caller without a live lease finds
-- its own entries swept like anyone's and re-asserts them with sync.
-- With the outbox on, a dead node found (or the heartbeat's scan, for stale entries) also takes
-- over outbox entries (outbox_takeover).
-- Returns the connection ids removed, whether anything changed, the set of nodes whose lease
-- or entries were removed (a caller finding itself there lost its entries), and whether the
-- presence hash was scanned. Each removed connection counts against its user (see count_conn).
local function sweep(now, caller, scan)
  local live, lapsed, first, has_leases = leases(now)
  local dead = {}
  local changed = false
  for _, n in ipairs(lapsed) do
    dead[n] = true
    redis.call('ZREM', K_NODES, n)
    changed = true
  end
  for _, n in ipairs(redis.call('HKEYS', K_ANON)) do
    if not live[n] then
      dead[n] = true
      redis.call('HDEL', K_ANON, n)
      changed = true
    end
  end
  local left = {}
  local scanned = false
  if next(dead) ~= nil or not has_leases or scan == 'all' or (caller and not live[caller])
      or (scan == 'first' and caller == first) then
    scanned = true
    for _, f in ipairs(redis.call('HKEYS', K_PRESENCE)) do
      local node = string.match(f, '^(.*)%.[^.]*$')
      if node and not live[node] then
        dead[node] = true
        count_conn(redis.call('HGET', K_PRESENCE, f), -1)
        redis.call('HDEL', K_PRESENCE, f)
        left[#left + 1] = f
        changed = true
      end
    end
  end
  if next(dead) ~= nil or (ob_stale and scan == 'first' and caller == first) then
    outbox_takeover(now, live)
  end
  return left, changed, dead, scanned
end

-- Renews the caller's lease; returns true if it still had one (false: new, lapsed or swept).
local function renew(node, now, lease_ms)
  local had = redis.call('ZSCORE', K_NODES, node)
  redis.call('ZADD', K_NODES, now + lease_ms, node)
  return had ~= false and had ~= nil
end

-- Presence keys of an abandoned room vanish by themselves once no node refreshes them. Called
-- after every lease renew (a ZADD may re-create the lease set, which must not live forever).
local function touch(key_ttl_ms)
  redis.call('PEXPIRE', K_PRESENCE, key_ttl_ms)
  redis.call('PEXPIRE', K_ANON, key_ttl_ms)
  redis.call('PEXPIRE', K_NODES, key_ttl_ms)
  redis.call('PEXPIRE', K_SEQ, key_ttl_ms)
  redis.call('PEXPIRE', K_MEMBERS, key_ttl_ms)
  if ob_on and ob_touch then redis.call('PEXPIRE', K_UNACKED, key_ttl_ms) end
end

-- Whether the room exists: its record is the room.
local function room_exists()
  return redis.call('EXISTS', K_ROOM) == 1
end

-- For a room whose record is gone (deleted; the caller missed the 'deleted' message): writes
-- nothing (no lease, no field, no TTL, no seq, no publish: the room's channels are closed) but
-- removes what the calling node still holds there, its presence fields '<node>.*' (and conn, if
-- given), its anonymous count and its lease, so nothing of the deleted room lingers.
-- Its users' counts in the members hash go down with them (no event: the room is gone).
local function drop_own(node, conn)
  local function drop(f)
    local meta = redis.call('HGET', K_PRESENCE, f)
    if meta then
      redis.call('HDEL', K_PRESENCE, f)
      local u = meta_user(meta)
      if u and redis.call('HINCRBY', K_MEMBERS, u, -1) <= 0 then redis.call('HDEL', K_MEMBERS, u) end
    end
  end
  if conn and conn ~= '' then drop(conn) end
  local prefix = node .. '.'
  for _, f in ipairs(redis.call('HKEYS', K_PRESENCE)) do
    if string.sub(f, 1, #prefix) == prefix then drop(f) end
  end
  redis.call('HDEL', K_ANON, node)
  redis.call('ZREM', K_NODES, node)
end

-- joins: flat list conn1, meta1, conn2, meta2 ... (metas are JSON written by the gateway)
local function publish(seq, anon, joins, leaves)
  local j = {}
  for i = 1, #joins, 2 do
    j[#j + 1] = cjson.encode(joins[i]) .. ':' .. joins[i + 1]
  end
  local l = {}
  for i, c in ipairs(leaves) do l[i] = cjson.encode(c) end
  redis.call('PUBLISH', K_EVENTS, '{"seq":' .. int(seq) .. ',"anon":' .. int(anon) ..
    ',"joins":{' .. table.concat(j, ',') .. '},"leaves":[' .. table.concat(l, ',') .. ']}')
end

-- Sets a node's anonymous count; a zero count removes the field. Returns true if it changed.
local function set_anon(node, count)
  local cur = tonumber(redis.call('HGET', K_ANON, node) or '0') or 0
  if cur == count then return false end
  if count > 0 then
    redis.call('HSET', K_ANON, node, count)
  else
    redis.call('HDEL', K_ANON, node)
  end
  return true
end

-- The snapshot part of a reply: {seq, anon_total, {conn1, meta1, conn2, meta2, ...}}.
local function snapshot_reply(exists, seq)
  return { exists, seq, anon_total(), redis.call('HGETALL', K_PRESENCE) }
end

