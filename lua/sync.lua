-- sync.lua — replace everything one node holds in a room with the node's local truth, in one step.
-- Used after a Redis reconnect or restart, when a heartbeat finds the lease gone, and with
-- release = 1 at shutdown (then the local truth is empty and the lease is dropped too).
-- The lease is renewed (or released) and every presence key's TTL refreshed even when nothing
-- changed. A room whose record is gone gets nothing written: the node's leftovers there are removed.
-- KEYS: the eight room keys, see common.lua
-- ARGV[1] node id
-- ARGV[2] lease ms
-- ARGV[3] key ttl ms
-- ARGV[4] the node's anonymous viewers in the room, or '' to leave the count alone
-- ARGV[5] '1' to release the lease (clean exit), '0' to renew it. A released node holds nothing:
--         its anonymous count goes whatever ARGV[4] says, and ARGV[6..] must be empty
-- ARGV[6] '1' when the node has an events hook: edges go to the outbox KEYS[8] (common.lua)
-- ARGV[7..] conn1, meta1, conn2, meta2, ... : the node's signed-in connections in the room
-- Reply: {seq of the published change or 0, anonymous total, exists (1), edges, taken}
--        (edges: the events hook's edges this call caused; taken: the outbox entries it took
--        over; see common.lua)
--        {0, 0, 0} when the room does not exist (deleted).

local node, lease, key_ttl, anon, release =
  ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'
if not room_exists() then
  drop_own(node)
  return { 0, 0, 0 }
end
if release then anon = 0 end
outbox_setup(node, ARGV[6])
members_begin()
local now = now_ms()
local leaves, changed = sweep(now, node)
local want = {}
for i = 7, #ARGV, 2 do want[ARGV[i]] = ARGV[i + 1] end
local prefix = node .. '.'
for _, f in ipairs(redis.call('HKEYS', K_PRESENCE)) do
  if string.sub(f, 1, #prefix) == prefix and want[f] == nil then
    count_conn(redis.call('HGET', K_PRESENCE, f), -1)
    redis.call('HDEL', K_PRESENCE, f)
    leaves[#leaves + 1] = f
    changed = true
  end
end
local joins = {}
for i = 7, #ARGV, 2 do
  local conn, meta = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', K_PRESENCE, conn)
  if old ~= meta then
    if old then count_conn(old, -1) end
    count_conn(meta, 1)
    redis.call('HSET', K_PRESENCE, conn, meta)
    joins[#joins + 1] = conn
    joins[#joins + 1] = meta
    changed = true
  end
end
if anon and set_anon(node, anon) then changed = true end
if release then
  redis.call('ZREM', K_NODES, node)
else
  renew(node, now, lease)
end
local edges = members_finish()
if #edges > 0 then changed = true end
local total = total_after()
if not changed then
  touch(key_ttl)
  return { 0, total, 1, {}, taken_reply() }
end
local seq = next_seq(key_ttl)
publish(seq, total, joins, leaves)
local reported = edges_reply(seq, now, edges) -- (writes the outbox: before touch)
touch(key_ttl)
return { seq, total, 1, reported, taken_reply() }
