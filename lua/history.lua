-- history.lua — reads a room's history stream (read-only; used for a cold room's tail and for a
-- recovery the node cannot answer from memory). Not a presence script: common.lua is not
-- prepended.
--
-- KEYS[1] <p>:room:{R}:history    STREAM  see publish.lua
-- ARGV[1] 'last': the newest ARGV[2] entries;
--         'since': every entry with an id above ARGV[2] (a canonical '<ms>-<seq>'), or, when that
--         id is above the stream's last id (the client names an event this stream never had), the
--         newest ARGV[3] entries instead
-- Reply: {exists, last_id, first_id, trimmed, ahead, entries}
--   exists    1 if the stream exists; 0: nothing else is meaningful ('0-0', 0, 0, {})
--   last_id   the stream's last generated id
--   first_id  its first retained entry's id ('0-0' when it holds none)
--   trimmed   1 when entries have been removed from it (entries-added > length)
--   ahead     1 when ARGV[1] = 'since' and ARGV[2] is above last_id
--   entries   {{id, {field, value, ...}}, ...}, oldest first

if redis.call('EXISTS', KEYS[1]) == 0 then return { 0, '0-0', '0-0', 0, 0, {} } end

-- decimal strings without leading zeros
local function cmp_num(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function cmp_id(x, y)
  local xm, xs = string.match(x, '^(%d+)-(%d+)$')
  local ym, ys = string.match(y, '^(%d+)-(%d+)$')
  local c = cmp_num(xm, ym)
  if c ~= 0 then return c end
  return cmp_num(xs, ys)
end

local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last_id, first_id, length, added = '0-0', '0-0', 0, 0
for i = 1, #info, 2 do
  local k, v = info[i], info[i + 1]
  if k == 'last-generated-id' then last_id = v
  elseif k == 'length' then length = v
  elseif k == 'entries-added' then added = v
  elseif k == 'first-entry' and type(v) == 'table' and v[1] then first_id = v[1]
  end
end
local trimmed = (added > length) and 1 or 0

local function newest(n)
  local rev = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', n)
  local out = {}
  for i = #rev, 1, -1 do out[#out + 1] = rev[i] end
  return out
end

local ahead = 0
local entries
if ARGV[1] == 'since' then
  if string.match(ARGV[2], '^%d+%-%d+$') == nil then
    return redis.error_reply('history.lua: ARGV[2] must be an id <ms>-<seq>')
  end
  if cmp_id(ARGV[2], last_id) > 0 then
    ahead = 1
    entries = newest(tonumber(ARGV[3]))
  else
    entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[2], '+')
  end
else
  entries = newest(tonumber(ARGV[2]))
end
return { 1, last_id, first_id, trimmed, ahead, entries }
