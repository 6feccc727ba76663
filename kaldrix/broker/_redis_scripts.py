"""What the Redis engine keeps in Redis, and the Lua that touches it.

Per channel (the ``{channel}`` hash tag keeps a channel's keys together):

- ``<prefix>:{<channel>}:meta`` — a hash ``{epoch, offset}``. One key, so the offset
  can never outlive its epoch (or the reverse) under eviction or expiry; when it is
  missing the channel starts again in a new epoch, with its old history deleted.
- ``<prefix>:{<channel>}:history`` — a Stream of records, entry id ``<offset>-0``
  (so a read since an offset is one XRANGE), fields ``d`` (the record) and ``t``
  (Redis time in ms, for the age bound). Trimmed to `history_size` on every append;
  it expires `history_ttl` after its last append, when every entry is too old anyway.
- ``<prefix>:{<channel>}:live`` — the Pub/Sub channel of its live publications.

Per event id: ``<prefix>:dedup:<id>`` — the offsets it got, as JSON, for the dedup
window.

Each script runs atomically: a publication is in history before it is announced, and a
history read sees one consistent epoch. Time comes from Redis (TIME), so nodes' clocks
never decide what has expired.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import attrs

# Publish a batch of events: numbered, stored and announced in one atomic step.
# KEYS: n dedup keys, then the meta and history keys of each of m channels.
# ARGV: n, m, epoch for new channels, history size, history ttl ms, meta ttl ms,
#       dedup ms, key prefix, the m channel names, then per event: its record,
#       '1' when its id is kept for dedup ('0' when the node made the id up), k, and
#       the k indexes (1..m) of its channels.
# Returns per event 'd' or 'n' (duplicate or new) followed by its offsets as JSON.
PUBLISH = """
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local new_epoch, size = ARGV[3], tonumber(ARGV[4])
local history_ttl, meta_ttl, dedup_ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local prefix = ARGV[8]
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local epochs, parts, results = {}, {}, {}
local at = 9 + m
for i = 1, n do
  local record, dedup, k = ARGV[at], dedup_ttl > 0 and ARGV[at + 1] == '1', tonumber(ARGV[at + 2])
  local known = false
  if dedup then known = redis.call('GET', KEYS[i]) end
  if known then
    results[i] = 'd' .. known
  else
    local offsets = {}
    for j = 1, k do
      local c = tonumber(ARGV[at + 2 + j])
      local meta, history = KEYS[n + 2 * c - 1], KEYS[n + 2 * c]
      local epoch = epochs[c]
      if not epoch then
        epoch = redis.call('HGET', meta, 'epoch')
        if not epoch then
          epoch = new_epoch
          redis.call('DEL', history)
          redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
        end
        epochs[c] = epoch
        parts[c] = {epoch, '\\n'}
      end
      local offset = redis.call('HINCRBY', meta, 'offset', 1)
      redis.call('XADD', history, 'MAXLEN', size, offset .. '-0', 'd', record, 't', now)
      local p = parts[c]
      p[#p + 1] = offset .. ' ' .. #record .. '\\n'
      p[#p + 1] = record
      offsets[ARGV[8 + c]] = offset
    end
    local stored = cjson.encode(offsets)
    if dedup then redis.call('SET', KEYS[i], stored, 'PX', dedup_ttl) end
    results[i] = 'n' .. stored
  end
  at = at + 3 + k
end
for c = 1, m do
  if parts[c] then
    redis.call('PUBLISH', prefix .. ':{' .. ARGV[8 + c] .. '}:live', table.concat(parts[c]))
    if history_ttl > 0 then redis.call('PEXPIRE', KEYS[n + 2 * c], history_ttl) end
    if meta_ttl > 0 then redis.call('PEXPIRE', KEYS[n + 2 * c - 1], meta_ttl) end
  end
end
return results
"""

# A channel's position, starting it in a new epoch when it has none.
# KEYS: meta, history. ARGV: epoch for a new channel, meta ttl ms.
POSITION = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
if meta[1] then return {meta[1], tonumber(meta[2])} end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'offset', 0)
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {ARGV[1], 0}
"""

# The records after an offset, or {} when they cannot be recovered.
# KEYS: meta, history. ARGV: since offset, since epoch, history ttl ms.
# Returns {} or {epoch, last offset, record...} (records numbered since+1, since+2, ...).
HISTORY = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
local epoch, last, since = meta[1], tonumber(meta[2]), tonumber(ARGV[1])
if not epoch or epoch ~= ARGV[2] or since > last then return {} end
if since == last then return {epoch, last} end
local entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+')
if #entries ~= last - since or entries[1][1] ~= (since + 1) .. '-0' then return {} end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  local clock = redis.call('TIME')
  local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
  if tonumber(entries[1][2][4]) < now - ttl then return {} end
end
local out = {epoch, last}
for i = 1, #entries do out[i + 2] = entries[i][2][2] end
return out
"""


@attrs.frozen
class Script:
    """A Lua source and its SHA1, the name Redis caches it under."""

    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


PUBLISH_SCRIPT = Script(PUBLISH)
POSITION_SCRIPT = Script(POSITION)
HISTORY_SCRIPT = Script(HISTORY)


@attrs.frozen
class Keys:
    """Key and Pub/Sub names under one prefix (several deployments can share a Redis)."""

    prefix: str = "kx"

    def meta(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:meta"

    def history(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:history"

    def live(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:live"

    def dedup(self, event_id: str) -> str:
        return f"{self.prefix}:dedup:{event_id}"

    def channel_of(self, live: bytes | str) -> str:
        """The channel a Pub/Sub name belongs to (the inverse of `live`)."""
        name = live.decode() if isinstance(live, bytes) else live
        return name[len(self.prefix) + 2 : -len("}:live")]


@attrs.frozen
class Limits:
    """The bounds every publish script call carries, in Redis units (ms)."""

    history_size: int
    history_ttl_ms: int
    meta_ttl_ms: int
    dedup_ms: int


def publish_call(
    keys: Keys, limits: Limits, new_epoch: str, events: Sequence[tuple[bytes, str, bool, Sequence[str]]]
) -> tuple[list[str], list[str | bytes | int]]:
    """KEYS and ARGV of one PUBLISH script call for `(record, id, idempotent, channels)` items."""
    index: dict[str, int] = {}
    per_event: list[str | bytes | int] = []
    for record, _, idempotent, channels in events:
        unique = list(dict.fromkeys(channels))
        per_event.append(record)
        per_event.append(1 if idempotent else 0)
        per_event.append(len(unique))
        for name in unique:
            position = index.get(name)
            if position is None:
                position = index[name] = len(index) + 1
            per_event.append(position)
    key_list = [keys.dedup(event_id) for _, event_id, _, _ in events]
    for name in index:
        key_list.append(keys.meta(name))
        key_list.append(keys.history(name))
    args: list[str | bytes | int] = [
        len(events),
        len(index),
        new_epoch,
        limits.history_size,
        limits.history_ttl_ms,
        limits.meta_ttl_ms,
        limits.dedup_ms,
        keys.prefix,
        *index,
        *per_event,
    ]
    return key_list, args
