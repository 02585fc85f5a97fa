-- snapshot.lua — the room's whole presence, for a node building its mirror.
-- Sweeps first (and publishes what the sweep removed), so the snapshot holds live nodes only; it
-- checks every presence field for one without a live lease (it reads the whole hash anyway).
-- KEYS: the six room keys, see common.lua
-- ARGV[1] key ttl ms
-- Reply: {exists (1/0), seq, anonymous total, {conn1, meta1, conn2, meta2, ...}}
--        The mirror applies published changes with a seq above the returned one.

-- a room that does not exist gets no key at all (anonymous clients can ask for any id)
if redis.call('EXISTS', K_ROOM) == 0 then return { 0, 0, 0, {} } end
local key_ttl = tonumber(ARGV[1])
local now = now_ms()
local leaves, changed = sweep(now, nil, 'all')
if changed then
  publish(next_seq(key_ttl), anon_total(), {}, leaves)
  touch(key_ttl)
end
return snapshot_reply(1, current_seq(key_ttl))
