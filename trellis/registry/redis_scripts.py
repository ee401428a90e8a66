"""The Lua scripts of the Redis registry (trellis/registry/redis_registry.py): each read-modify step
runs as one script, so it is atomic, and readers sweep index entries whose key expired.

Hashes travel as decimal strings, never Lua numbers: block names are 64-bit.
"""

from __future__ import annotations

# owned(key, instance): true when key holds a JSON record whose instance_id is the caller's.
OWNED = """
local function owned(key, instance)
  local cur = redis.call('GET', key)
  if not cur then return false end
  local ok, rec = pcall(cjson.decode, cur)
  return ok and type(rec) == 'table' and rec.instance_id == instance
end
"""


def _owned_then(body: str) -> str:
    return OWNED + body


# KEYS: member key, members index. ARGV: record, ttl ms, instance id, slot.
# A free slot is claimed with SET NX; a slot already held by the same instance is refreshed.
CLAIM = _owned_then("""
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if not owned(KEYS[1], ARGV[3]) then return 0 end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('SADD', KEYS[2], ARGV[4])
return 1
""")

# KEYS: member key. ARGV: instance id, ttl ms. Renew only a lease that is still ours.
RENEW = _owned_then("""
if owned(KEYS[1], ARGV[1]) then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
""")

# KEYS: member key, members index. ARGV: instance id, slot.
RELEASE = _owned_then("""
if owned(KEYS[1], ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
  return 1
end
return 0
""")

# KEYS: transfer key, transfers index. ARGV: record, ttl ms, transfer id. The record is its own lease
# (PX, never renewed); the index lives as long as its longest lease, so nothing outlives its records.
OPEN_TRANSFER = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""

# KEYS: an index set. ARGV: key prefix. The values of the live keys; dead names leave the index.
SWEEP = """
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local value = redis.call('GET', ARGV[1] .. name)
  if value then table.insert(out, value) else redis.call('SREM', KEYS[1], name) end
end
return out
"""

# KEYS: block_locations index. ARGV: key prefix, hashes... Returns location, {0|1 per hash}, ...
# SMISMEMBER is called on slices: Lua's unpack has a small stack limit.
LOOKUP = """
local out = {}
for _, loc in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. loc
  if redis.call('EXISTS', key) == 1 then
    local bits = {}
    for i = 2, #ARGV, 1000 do
      for _, b in ipairs(redis.call('SMISMEMBER', key, unpack(ARGV, i, math.min(i + 999, #ARGV)))) do
        table.insert(bits, b)
      end
    end
    table.insert(out, loc)
    table.insert(out, bits)
  else
    redis.call('SREM', KEYS[1], loc)
  end
end
return out
"""

# KEYS: block_locations index. ARGV: key prefix, hashes... (decimal strings, never Lua numbers: they
# are 64-bit). Returns location, run, ... for each live location with a run > 0; a location's scan
# stops at its first miss (SMISMEMBER on slices that double from 16, so a short run is cheap).
LEADING_RUNS = """
local out = {}
for _, loc in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. loc
  if redis.call('EXISTS', key) == 1 then
    local run, first, size, missed = 0, 2, 16, false
    while first <= #ARGV and not missed do
      local last = math.min(first + size - 1, #ARGV)
      for _, b in ipairs(redis.call('SMISMEMBER', key, unpack(ARGV, first, last))) do
        if b == 1 then run = run + 1 else missed = true break end
      end
      first, size = last + 1, math.min(size * 2, 1000)
    end
    if run > 0 then
      table.insert(out, loc)
      table.insert(out, run)
    end
  else
    redis.call('SREM', KEYS[1], loc)
  end
end
return out
"""
