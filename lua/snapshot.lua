-- snapshot.lua — the room's whole presence, for a node building its mirror.
-- Sweeps first (and publishes what the sweep removed), so the snapshot holds live nodes only; it
-- checks every presence field for one without a live lease (it reads the whole hash anyway).
-- KEYS: the eight room keys, see common.lua
-- ARGV[1] key ttl ms
-- ARGV[2] (optional) the calling node's id: the owner of what this call reports
-- ARGV[3] '1' when that node has an events hook (the outbox KEYS[8] is used, see common.lua)
-- Reply: {exists (1/0), seq, anonymous total, {conn1, meta1, conn2, meta2, ...}, edges, taken}
--        (edges: the events hook's edges the sweep caused; taken: the outbox entries it took
--        over; see common.lua)
--        The mirror applies published changes with a seq above the returned one.

-- a room that does not exist gets no key at all (anonymous clients can ask for any id)
if redis.call('EXISTS', K_ROOM) == 0 then return { 0, 0, 0, {} } end
local key_ttl = tonumber(ARGV[1])
outbox_setup(ARGV[2], ARGV[3])
members_begin()
local now = now_ms()
local leaves, changed = sweep(now, nil, 'all')
local edges = members_finish()
local reply_edges = {}
if changed or #edges > 0 then
  local seq = next_seq(key_ttl)
  publish(seq, anon_total(), {}, leaves)
  reply_edges = edges_reply(seq, now, edges) -- (writes the outbox: before touch)
  touch(key_ttl)
end
local reply = snapshot_reply(1, current_seq(key_ttl))
reply[5] = reply_edges
reply[6] = taken_reply()
return reply
