-- join.lua — a viewer enters a room (or a node's batched anonymous joins arrive).
-- KEYS: the eight room keys, see common.lua; KEYS[9] (optional, signed-in joins) the joining
--       user's ban key in this room, <p>:room:{R}:ban:<sub>
-- ARGV[1] node id
-- ARGV[2] lease ms (presence.ttl_ms)
-- ARGV[3] key ttl ms (how long presence keys outlive the last heartbeat)
-- ARGV[4] connection id '<node>.<n>' for a signed-in viewer, '' for anonymous viewers
-- ARGV[5] meta JSON (signed-in) or the number of anonymous viewers joining (anonymous)
-- ARGV[6] '1' to include a snapshot in the reply (the node has no mirror of the room yet)
-- ARGV[7] '1' when the node has an events hook: edges go to the outbox KEYS[8] (common.lua)
-- Reply: {0} when the room does not exist (nothing is written);
--        {2} when KEYS[7] exists: the user is banned from the room (nothing is written);
--        else {1, seq, anonymous total, {conn, meta, ...} when ARGV[6] = '1' else {}, lost}
--        where seq is the seq of this change (its envelope is published with it) and lost = 1
--        when this call found the caller without a live lease (lapsed, or gone while it still had
--        entries) and swept its entries (the caller re-asserts them with sync), and had = 1 when
--        the caller's lease existed before this call (0: first call, or another node swept it —
--        a caller that believes it holds entries here re-asserts them with sync):
--        {1, seq, total, snapshot, lost, had, edges, taken}
--        where edges are the events hook's edges this call caused and taken the outbox entries it
--        took over from dead nodes (see common.lua).
-- A connection written again (a retried join) counts once for its user; one written again for
-- another user moves from the old user to the new one.

if redis.call('EXISTS', K_ROOM) == 0 then return { 0 } end
if KEYS[9] and redis.call('EXISTS', KEYS[9]) == 1 then return { 2 } end
local node, lease, key_ttl, conn, arg = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
outbox_setup(node, ARGV[7])
members_begin()
local now = now_ms()
local leaves, _, swept = sweep(now, node)
local lost = swept[node] and 1 or 0
local had = renew(node, now, lease)
local joins = {}
if conn ~= '' then
  if redis.call('HSETNX', K_PRESENCE, conn, arg) == 1 then
    count_conn(arg, 1)
  else
    local old = redis.call('HGET', K_PRESENCE, conn)
    if old ~= arg then
      redis.call('HSET', K_PRESENCE, conn, arg)
      count_conn(old, -1)
      count_conn(arg, 1)
    end
  end
  joins = { conn, arg }
else
  local n = tonumber(arg) or 0
  if n > 0 then redis.call('HINCRBY', K_ANON, node, n) end
end
local edges = members_finish()
local seq = next_seq(key_ttl)
local total = total_after()
publish(seq, total, joins, leaves)
local reported = edges_reply(seq, now, edges) -- (writes the outbox: before touch)
touch(key_ttl)
local reply = { 1, seq, total, {}, lost, had and 1 or 0, reported, taken_reply() }
if ARGV[6] == '1' then
  reply[4] = redis.call('HGETALL', K_PRESENCE)
end
return reply
