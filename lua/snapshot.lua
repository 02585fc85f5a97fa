-- snapshot.lua — the room's whole presence, for a node building its mirror.
-- Sweeps first (and publishes what the sweep removed), so the snapshot holds live nodes only.
-- KEYS: the six room keys, see common.lua
-- ARGV[1] key ttl ms
-- Reply: {exists (1/0), seq, anonymous total, {conn1, meta1, conn2, meta2, ...}}
--        The mirror applies published changes with a seq above the returned one.

local now = now_ms()
local leaves, changed = sweep(now)
if changed then
  publish(next_seq(), anon_total(), {}, leaves)
  touch(tonumber(ARGV[1]))
end
return snapshot_reply(redis.call('EXISTS', K_ROOM), current_seq())
