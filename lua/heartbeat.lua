-- heartbeat.lua — one node renews its lease in one room. Sent every presence.heartbeat_interval_ms
-- per (node, room), pipelined: the cost grows with rooms per node, never with sockets.
-- It also re-asserts the node's true anonymous count (healing any drift from lost batches) and
-- sweeps the entries of nodes without a live lease, publishing their viewers' leaves. The live node
-- with the smallest id also checks every presence field for one without a lease (see sweep), and
-- that the members hash agrees with the presence hash (members_check, common.lua).
-- A room whose record is gone gets nothing written: the node's own leftovers there are removed.
-- KEYS: the eight room keys, see common.lua
-- ARGV[1] node id
-- ARGV[2] lease ms
-- ARGV[3] key ttl ms
-- ARGV[4] the node's anonymous viewers in the room right now, or '' to leave the count alone
--         (an anonymous batch of the node is in flight and will land after this call)
-- ARGV[5] '1' when the node has an events hook (the outbox KEYS[8] is used, see common.lua)
-- ARGV[6] (optional) stale ms: the scanning node also takes over outbox entries held longer than
--         this by any node (a lost reply or acknowledgement: the retry window is long over)
-- Reply: {had lease (1/0), seq of the published change or 0, anonymous total, exists (1), edges,
--        taken} (edges: the events hook's edges this call caused; taken: the outbox entries it
--        took over; see common.lua)
--        had lease = 0 means this node's entries may be gone (lapsed, swept, Redis restarted):
--        the node answers with sync.lua.
--        {0, 0, 0, 0} when the room does not exist (deleted): the node drops the room.

local node, lease, key_ttl, anon = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if not room_exists() then
  drop_own(node)
  return { 0, 0, 0, 0 }
end
outbox_setup(node, ARGV[5], ARGV[6])
ob_touch = true -- the heartbeat keeps the room's outbox alive with its other keys
members_begin()
local now = now_ms()
local leaves, changed, _, scanned = sweep(now, node, 'first')
if scanned then members_check() end
local had = renew(node, now, lease)
if anon and set_anon(node, anon) then changed = true end
local edges = members_finish()
if #edges > 0 then changed = true end
local total = total_after()
local seq = 0
local reported = {}
if changed then
  seq = next_seq(key_ttl)
  publish(seq, total, {}, leaves)
  reported = edges_reply(seq, now, edges) -- (writes the outbox: before touch)
end
touch(key_ttl)
return { had and 1 or 0, seq, total, 1, reported, taken_reply() }
