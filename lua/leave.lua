-- leave.lua — a viewer leaves a room (or a node's batched anonymous leaves arrive).
-- Idempotent: a meta is removed only if present, a count decremented only above zero, so a retry
-- changes nothing; nothing is published when nothing changed. The lease is renewed (and every
-- presence key's TTL refreshed) either way.
-- A room whose record is gone gets nothing written: the connection and the node's other leftovers
-- there are removed.
-- KEYS: the eight room keys, see common.lua
-- ARGV[1] node id
-- ARGV[2] lease ms
-- ARGV[3] key ttl ms
-- ARGV[4] connection id (signed-in) or '' (anonymous)
-- ARGV[5] number of anonymous viewers leaving (anonymous)
-- ARGV[6] '1' when the node is leaving the room altogether: its lease is dropped too, but only if
--         it holds nothing in the room any more (a concurrent join of the same node keeps it)
-- ARGV[7] '1' when the node has an events hook: edges go to the outbox KEYS[8] (common.lua)
-- Reply: {seq of the published change or 0 if nothing changed, anonymous total, lost, exists (1),
--         had, edges, taken} where taken are the outbox entries taken over (common.lua), edges are the events hook's edges this call caused (common.lua) and had = 1 when the caller's lease existed before this call (see join.lua)
--        lost = 1 when this call found the caller without a live lease (lapsed, or gone while it
--        still had entries) and swept its entries: the caller re-asserts them with sync.
--        {0, 0, 0, 0} when the room does not exist (deleted).

local node, lease, key_ttl, conn, arg = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
if not room_exists() then
  drop_own(node, conn)
  return { 0, 0, 0, 0 }
end
outbox_setup(node, ARGV[7])
members_begin()
local now = now_ms()
local leaves, changed, swept = sweep(now, node)
local lost = swept[node] and 1 or 0
local had = renew(node, now, lease) and 1 or 0
if conn ~= '' then
  local meta = redis.call('HGET', K_PRESENCE, conn)
  if meta then
    redis.call('HDEL', K_PRESENCE, conn)
    count_conn(meta, -1)
    leaves[#leaves + 1] = conn
    changed = true
  end
else
  local n = tonumber(arg) or 0
  local cur = tonumber(redis.call('HGET', K_ANON, node) or '0') or 0
  if n > 0 and set_anon(node, math.max(0, cur - n)) then changed = true end
end
if ARGV[6] == '1' and (redis.call('HGET', K_ANON, node) or '0') == '0' then
  local holds = false
  local prefix = node .. '.'
  for _, f in ipairs(redis.call('HKEYS', K_PRESENCE)) do
    if string.sub(f, 1, #prefix) == prefix then holds = true; break end
  end
  if not holds then
    redis.call('HDEL', K_ANON, node)
    redis.call('ZREM', K_NODES, node)
  end
end
local edges = members_finish()
if #edges > 0 then changed = true end
local total = total_after()
if not changed then
  touch(key_ttl)
  return { 0, total, lost, 1, had, {}, taken_reply() }
end
local seq = next_seq(key_ttl)
publish(seq, total, {}, leaves)
local reported = edges_reply(seq, now, edges) -- (writes the outbox: before touch)
touch(key_ttl)
return { seq, total, lost, 1, had, reported, taken_reply() }
