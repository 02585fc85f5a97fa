-- publish.lua — one room broadcast (an allow-listed client push or an admin broadcast): appended
-- to the room's history stream and published on the room's channel in this one atomic call, so
-- the stream's order is the order in which every node receives the events.
-- Not a presence script: common.lua is not prepended and the KEYS are its own.
--
-- KEYS[1] <p>:room:{R}            HASH    the room record (the room exists iff it does)
-- KEYS[2] <p>:room:{R}:history    STREAM  recent broadcasts; fields: event, payload (without id)
-- KEYS[3] <p>:room:{R}:events     channel the room's events are published on
-- ARGV[1] 'PUBLISH', or 'SPUBLISH' (sharded pub/sub, Redis Cluster)
-- ARGV[2] history length: the stream is capped with MAXLEN ~ ARGV[2]
-- ARGV[3] the frame's head: '[null,null,"rooms:<R>","<event>",'
-- ARGV[4] the event name
-- ARGV[5] the payload: a compact JSON object without "id"
-- Reply: nil when the room does not exist (nothing is written or published); else the entry's
--        stream id. (A bare string, not a table: building and converting a reply table cost about
--        a tenth of this script's time on Redis 7.0 — `bench redis-broadcast`, BENCHMARKS.md.)
--        The frame published is ARGV[3] .. <payload with ,"id":"<id>" before its closing brace>
--        .. ']' (a payload of '{}' becomes {"id":"<id>"}); gateway/src/history.rs builds the same
--        bytes from a stream entry.

local command = ARGV[1]
if command ~= 'PUBLISH' and command ~= 'SPUBLISH' then
  return redis.error_reply('publish.lua: ARGV[1] must be PUBLISH or SPUBLISH')
end
local payload = ARGV[5]
-- The stream exists once the room has had a broadcast, and goes with the room (rooms delete
-- removes both at once): NOMKSTREAM appends only then, and the room record is looked at only when
-- there is no stream yet (the room's first broadcast, or a room that was deleted).
local id = redis.call('XADD', KEYS[2], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[2], '*',
  'event', ARGV[4], 'payload', payload)
if not id then
  if redis.call('EXISTS', KEYS[1]) == 0 then return false end
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', ARGV[4], 'payload', payload)
end
local body
if payload == '{}' then
  body = '{"id":"' .. id .. '"}'
else
  body = string.sub(payload, 1, -2) .. ',"id":"' .. id .. '"}'
end
redis.call(command, KEYS[3], ARGV[3] .. body .. ']')
return id
