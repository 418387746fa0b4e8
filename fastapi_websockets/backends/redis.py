"""The Redis backend: lists for storage, one inbox and one reader per layer instance.

Key layout (``P`` is the configured prefix; ``{...}`` are Redis Cluster hash
tags, so keys that one Lua script touches always share a slot; only the
single-server ``group_send`` script, never run on a cluster, also writes the
inboxes of other processes):

* ``P:inbox:{token}``: a list, the inbox of one layer instance. Every message
  for its process-specific channels (``name.token!id``) lands here, one entry
  per message per *process* (a group message names all the local members it
  is for). One background task reads it (see ``P:wake``).
* ``P:seq:{token}``: the newest id given to an entry of the inbox (entries a
  full inbox took back leave gaps). Ids grow by one per entry and move up to
  Redis's clock in microseconds when they fall behind it, so they keep growing
  also after Redis lost its data; the reader skips an id it already delivered.
  The inbox expires ``channel_expiry`` (plus at most an eighth of it) after its
  last push.
* ``P:taken:{token}``: the batch the reader popped last, kept until its next pop
  says it arrived, so that a pop whose reply is lost (Redis crashed or the
  connection broke after running it) is handed out again instead of lost.
* ``P:wake:{token}``: with ``use_pubsub``, the pub/sub channel of that reader
  (SPUBLISH in a cluster with ``sharded_pubsub``). The script that stores
  entries in the inbox also publishes them there, so a subscribed reader
  delivers them at once, with no pop; it removes what it delivered from the
  inbox later, in batches, off the delivery path. The list stays the store: a
  reader that was not subscribed (starting, reconnecting) pops it as before.
  (A cluster without ``sharded_pubsub`` publishes only an empty wake-up to an
  empty inbox: PUBLISH there reaches every node.) Without ``use_pubsub`` the
  reader blocks in BLMOVE until the inbox is not empty.
* ``P:chan:{name}``: a list, a named channel: a shared queue, each message
  popped by exactly one receiver of any process.
* ``P:ntaken:{name}:token``: what that process popped last from the named
  channel, kept as ``P:taken`` is (same hash tag as the channel).
* ``P:waiters:{name}``: a sorted set of the tokens of processes waiting on a
  named channel (score: registration deadline). A sender wakes them through
  their inbox, so an idle named receive costs no connection and no polling.
* ``P:group:{name}``: a sorted set ``channel -> join time`` (Redis server time,
  ms), so members expire one by one.
* ``P:owners:{name}``: a hash next to it (same hash tag, same slot) counting the
  members per owner: ``!token -> n`` for a process's channels, ``name -> 1`` for
  a named channel. ``group_send`` reads only this, so its cost does not grow with
  the group: each owning process gets ``(group, n)`` and fans out to the members
  it holds in memory, checking Redis first if it holds a different number. The
  sending process fans out to its own members as soon as the script is written
  and checks its ``n`` when the script answers (see ``_check_early``).
* ``P:history:{name}`` and ``P:hmeta:{name}``: only for groups matching the
  ``history`` option, in the group's slot: a list of the last messages (oldest
  first) and a hash ``{epoch, offset}``. The script that reads the owners for
  ``group_send`` also assigns the offset and stores the message.

* ``P:presence:{group}``: only for groups someone joined the presence of: a hash
  ``channel -> owner token "\n" info`` (the owner is the layer that joined).
* ``P:plive:{presence}``: a sorted set ``token -> deadline`` (Redis server time,
  ms) of the processes holding presence entries, pushed forward by one
  heartbeat per process; and ``P:pgroups:{presence}:token``, the groups where
  that process holds entries (one hash tag: a reaper claims a dead process and
  takes its group list in one script). A dead process's entries are found
  through its group list, never by reading every group.
* ``P:ready``: not in a cluster; the Redis time (ms) from which groups are
  complete. It goes missing only when Redis lost its data (a restart without
  persistence): ``group_send`` then refuses for a grace window in which every
  live process re-registers its members (see ``_group_script``).

Entries of the lists start with a 13-digit deadline in ms (Redis server time),
so undelivered messages expire individually and capacity checks ignore them;
inbox entries then have a 16-digit id.
Names inside hash tags escape ``%``, ``{`` and ``}``, so every name gets its own
tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit

from fastapi_websockets._running_loop import running_loop
from fastapi_websockets.backends.base import missing_driver
from fastapi_websockets.backends.broker import BrokerChannelLayer
from fastapi_websockets.backends.futures import settle, settle_all, wait_all
from fastapi_websockets.backends.options import Memo, flag, matching
from fastapi_websockets.backends.options import url as url_option
from fastapi_websockets.backends.timeouts import LazyBound, bounded, reply_within, wait_event, within
from fastapi_websockets.backends.tls import require_secure
from fastapi_websockets.backends.urls import user_of
from fastapi_websockets.backends.waiters import WaiterQueue
from fastapi_websockets.exceptions import (
    BackendUnavailable,
    ChannelFull,
    ChannelLayerClosed,
    ChannelLayerError,
    InvalidChannelLayerConfig,
)
from fastapi_websockets.history import POSITION_KEY, HistoryPolicy, HistorySlice, StreamPosition, new_epoch
from fastapi_websockets.names import is_process_specific, process_token
from fastapi_websockets.presence import QueuedWrite
from fastapi_websockets.types import Message

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.connection import AbstractConnection
    from redis.asyncio.sentinel import Sentinel

__all__ = ["RedisChannelLayer"]

logger = logging.getLogger("fastapi_websockets.redis")

T = TypeVar("T")

#: Most inbox entries one pop takes.
_BATCH = 512
#: Seconds a BLMOVE blocks (and a pub/sub reader goes without a message before it
#: PINGs its subscription and re-checks the inbox) before re-checking; only a safety
#: net against a silently dead connection.
_BLOCK_SECONDS = 30
#: Seconds between re-checks of a named channel while a receive waits on it:
#: covers a wake-up lost while Redis restarted.
_NAMED_RECHECK = 15.0
#: Seconds a process's registration as a waiter on a named channel lives unrefreshed.
_WAITER_TTL_MS = 45_000
#: An inbox holds at most this many times ``capacity`` entries (a dead process's
#: inbox must not grow without bound while senders keep refreshing its TTL).
_INBOX_FACTOR = 100
_DEADLINE_DIGITS = 13
_ID_DIGITS = 16
#: Where an inbox entry's kind starts: after its deadline and its id.
_INBOX_HEAD = _DEADLINE_DIGITS + _ID_DIGITS
#: Hex digits of the length before each entry of a pub/sub message.
_FRAME_DIGITS = 8
#: Seconds of quiet after a delivery before the reader removes the delivered entries
#: from its inbox (sooner once it delivered a quarter of the inbox's capacity).
_ACK_DELAY = 0.02
#: After Redis lost its data (a restart without persistence), group_send is refused
#: for this long, so that every live process re-registers its members first. A
#: reader retries at least every 2.4 s (the shared backoff's cap plus its jitter);
#: the rest is room for connecting and re-registering on a busy machine.
_REGISTER_GRACE_MS = 5_000
#: Most dead processes one presence reap claims (the rest wait for the next beat).
_REAP_BATCH = 100
_DATA = b"D"
_WAKE = b"W"
# Another process added or discarded one of this process's channels: the owner
# keeps its local record (the one it restores after a Redis restart) in step.
_JOINED = b"J"
_LEFT = b"L"
# A group message: "{members in Redis}\n{group}\0{data}"; the owner delivers it
# to the members of the group it holds.
_GROUP = b"G"

#: Every command the layer sends, its scripts' own calls included: what an ACL user of
#: the layer must be allowed (docs/backends/redis.md, "ACL users"). The push scripts
#: call PUBLISH (SPUBLISH with sharded_pubsub); readers SUBSCRIBE (SSUBSCRIBE).
_ACL_COMMANDS = (
    "ping", "time", "evalsha", "eval", "blmove", "subscribe", "ssubscribe", "publish", "spublish",
    "scan", "del", "unlink", "exists", "get", "set", "incrby", "pexpire", "pexpireat",
    "rpush", "lpop", "rpop", "lindex", "llen", "lrange", "ltrim",
    "hset", "hget", "hmget", "hgetall", "hincrby", "hdel", "sadd", "srem", "smembers",
    "zadd", "zrem", "zscore", "zrange", "zrangebyscore", "zremrangebyscore",
)  # fmt: skip
#: What a cluster client needs besides (redis-py reads the slot map and the command table).
_ACL_CLUSTER_COMMANDS = ("cluster|slots", "command")
#: How Redis says that an ACL refused a command, a key or a channel: NOPERM in reply to
#: a command (redis-py keeps the text after the code: "this user has no permissions to
#: ..."), "The user executing the script can't ..." from a script's own call (7.0).
_ACL_REFUSAL = re.compile(r"\bNOPERM\b|has no permissions to|user executing the script can't")

#: The first element of a pub/sub message (classic and sharded); its payload is the last.
_PUBLISHED = frozenset((b"message", b"smessage"))
#: The replies that hold a subscription until the inbox was drained (see _Subscription).
_HOLDS = frozenset((b"message", b"smessage", b"subscribe", b"ssubscribe", b"pong"))

_PREFIX_RE = re.compile(r"[A-Za-z0-9._/-]{1,100}")
_URL_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_PORT = 26379

# Every script reads Redis's own clock, so deadlines and join times do not depend
# on the clocks of the application servers.
_NOW = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
"""

# Drops expired entries from the head of a list that `want` more entries would take past
# `cap`, so that they do not count against its capacity; returns the list's new length.
# Needs `now`.
_TRIM = """
local function trim_expired(key, n, want, cap)
  if n + want <= cap then return n end
  while n > 0 do
    if tonumber(string.sub(redis.call('LINDEX', key, 0), 1, 13)) > now then break end
    redis.call('LPOP', key)
    n = n - 1
  end
  return n
end
"""

# The one way entries go into an inbox: _PUSH_INBOX and _GROUP_SEND are both built on it,
# so their entry format, ids and hand-over cannot drift apart. Stores as many of
# bodies[from..] as fit (`cap`), in order, each as a 13-digit deadline, the next id and
# the body; returns how many. With `wake` (a publish command; '' for none) and `hand_over`
# '1', the same entries, framed (8 hex digits of length, then the entry), go to the
# reader's pub/sub `channel`: it delivers them from there and removes them from the list
# later (_ACK_INBOX). With '0' only a push to an empty inbox publishes a wake-up: the
# reader drains until it sees the inbox empty.
#
# Each redis.call costs Redis about as much as a whole command, so a push makes four in
# the common case: TIME (deadlines come from Redis's clock, never a sender's: see _NOW),
# INCRBY, RPUSH and the publish.
# - Ids: INCRBY gives the next ones. An id never runs ahead of Redis's clock that way
#   (that would take a million entries a second), and once the ids lag it by more than a
#   `step` (ttl / 16), or the counter is missing (its INCRBY starts from 0), they move up
#   to the clock in us (one SET, which also keeps the counter alive). So ids keep growing
#   also after Redis lost its data, the counter included: the reader skips an id at or
#   below the newest it delivered. Ids left unused (a push taken back below) are gaps,
#   which readers never mind.
# - RPUSH's reply is the new length: entries past `cap` are taken back with RPOP (after
#   dropping expired ones) instead of asking LLEN first.
# - The inbox must outlive its newest entry (deadline now + ttl), but need not be
#   refreshed by every push: the push that moves the ids up sets its expiry to now + ttl +
#   2 steps (PEXPIREAT). Until the next such push, pushes come at most a step (plus a us
#   per entry) later, so their deadlines are covered; a push that found the list empty (a
#   reader that took everything deletes it) sets it too. An inbox thus lives at most ttl /
#   8 longer than its newest entry, never shorter.
# Ids are formatted with %d (a 64-bit integer in Redis's Lua), not %.0f: the float
# formatting cost a third of the script's CPU. Needs `now` and `t` (_NOW).
_INBOX_PUSH = (
    _TRIM
    + """
local function inbox_push(inbox, seq, cap, ttl, wake, channel, hand_over, bodies, from)
  local want = #bodies - from + 1
  local last = redis.call('INCRBY', seq, want)
  local step = math.max(1, math.floor(ttl / 16))
  local clock = t[1] * 1000000 + t[2]
  local moved = last - want + 1 + step * 1000 < clock
  if moved then
    last = clock + want - 1
    redis.call('SET', seq, string.format('%d', last), 'PX', ttl + 2 * step)
  end
  local first = last - want + 1
  local head = string.format('%013d', now + ttl)
  local items = {}
  for i = 1, want do items[i] = head .. string.format('%016d', first + i - 1) .. bodies[from + i - 1] end
  local n = redis.call('RPUSH', inbox, unpack(items)) - want
  if moved or n == 0 then
    redis.call('PEXPIREAT', inbox, string.format('%d', now + ttl + 2 * step))
  end
  local k = want
  if n + want > cap then
    n = trim_expired(inbox, n, want, cap)
    k = math.min(math.max(cap - n, 0), want)
    if k < want then redis.call('RPOP', inbox, want - k) end
    if k == 0 then return 0 end
  end
  if wake == '' then return k end
  if hand_over == '1' then
    if k == 1 then
      redis.call(wake, channel, string.format('%08x', #items[1]) .. items[1])
    else
      local frames = {}
      for i = 1, k do frames[i] = string.format('%08x', #items[i]) .. items[i] end
      redis.call(wake, channel, table.concat(frames))
    end
  elseif n == 0 then
    redis.call(wake, channel, '')
  end
  return k
end
"""
)

# KEYS: inbox, its id counter (same hash tag). ARGV: capacity, ttl ms, wake command
# ('' for none), wake channel, '1' to publish the entries ('0': an empty wake-up),
# entries... Returns how many entries were stored (see _INBOX_PUSH).
_PUSH_INBOX = (
    _NOW
    + _INBOX_PUSH
    + """
return inbox_push(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV, 6)
"""
)

# KEYS: inbox. ARGV: the id of the newest entry the reader delivered, most entries
# to look at. Removes the delivered entries from the head (ids are fixed-width digit
# strings, so they compare as strings) and returns how many. Ids grow from head to tail,
# so when the last entry looked at was delivered, all before it were: one LINDEX then
# spares Redis turning every entry into a Lua string (the usual case).
_ACK_INBOX = f"""
local most = tonumber(ARGV[2])
local last = redis.call('LINDEX', KEYS[1], most - 1)
if last and string.sub(last, {_DEADLINE_DIGITS + 1}, {_INBOX_HEAD}) <= ARGV[1] then
  redis.call('LTRIM', KEYS[1], most, -1)
  return most
end
local entries = redis.call('LRANGE', KEYS[1], 0, most - 1)
local k = 0
for _, entry in ipairs(entries) do
  if string.sub(entry, {_DEADLINE_DIGITS + 1}, {_INBOX_HEAD}) > ARGV[1] then break end
  k = k + 1
end
if k > 0 then redis.call('LTRIM', KEYS[1], k, -1) end
return k
"""

# KEYS: inbox, its taken list (same hash tag). ARGV: id of the batch the reader got
# last ('' for none), id for a new batch, count, ttl ms. The reader's pop, safe
# against a lost reply: the batch it takes stays in the taken list (first element:
# its id) until the next call names that id. A call that names another id did not
# get that batch (Redis ran the pop but the reply was lost in a crash or a cut
# connection) and gets the same batch again. Returns {id, entries...} or {}.
_TAKE_INBOX = """
local taken = redis.call('LINDEX', KEYS[2], 0)
if taken and taken ~= ARGV[1] then return redis.call('LRANGE', KEYS[2], 0, -1) end
if taken then redis.call('DEL', KEYS[2]) end
local popped = redis.call('LPOP', KEYS[1], tonumber(ARGV[3]))
if not popped then return {} end
redis.call('RPUSH', KEYS[2], ARGV[2], unpack(popped))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
table.insert(popped, 1, ARGV[2])
return popped
"""

# KEYS: named channel list, its waiters. ARGV: entry, capacity, ttl ms.
# Returns the new length (-1 if full) and the tokens of the processes to wake.
_PUSH_NAMED = (
    _NOW
    + _TRIM
    + """
local cap = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local n = trim_expired(KEYS[1], redis.call('LLEN', KEYS[1]), 1, cap)
if n >= cap then return {-1, {}} end
redis.call('RPUSH', KEYS[1], string.format('%013d', now + ttl) .. ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
return {n + 1, redis.call('ZRANGE', KEYS[2], 0, -1)}
"""
)

# KEYS: named channel list, its waiters, this process's taken list for it. ARGV:
# count, token, registration ttl ms, id of the batch this process got last, id for
# a new batch, ttl ms. Pops up to count unexpired entries, keeping them in the taken
# list until the next call names their id (as _TAKE_INBOX does); registers the
# caller as a waiter if short. Returns {id, entries...}, or {} if nothing was popped.
_POP_NAMED = (
    _NOW
    + """
local taken = redis.call('LINDEX', KEYS[3], 0)
if taken and taken ~= ARGV[4] then return redis.call('LRANGE', KEYS[3], 0, -1) end
if taken then redis.call('DEL', KEYS[3]) end
local want = tonumber(ARGV[1])
local out = {}
while #out < want do
  local entry = redis.call('LPOP', KEYS[1])
  if not entry then break end
  if tonumber(string.sub(entry, 1, 13)) > now then out[#out + 1] = entry end
end
if #out < want then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
if #out == 0 then return {} end
redis.call('RPUSH', KEYS[3], ARGV[5], unpack(out))
redis.call('PEXPIRE', KEYS[3], ARGV[6])
table.insert(out, 1, ARGV[5])
return out
"""
)

# Keeps the owners hash of a group (KEYS[2]) in step with its members (KEYS[1]):
# `owner_of(member)` is '!' .. the token for a process-specific channel (what
# names.process_token() returns: the part before '!' after the last '.'), the
# name itself for a named channel.
_OWNER_OF = """
local function owner_of(member)
  local bang = string.find(member, '!', 1, true)
  if not bang then return member end
  return '!' .. string.match(string.sub(member, 1, bang - 1), '([^.]*)$')
end
local function forget(member)
  local owner = owner_of(member)
  if redis.call('HINCRBY', KEYS[2], owner, -1) <= 0 then redis.call('HDEL', KEYS[2], owner) end
end
"""

# KEYS: group, owners. ARGV: group expiry ms, members...
_GROUP_ADD = (
    _NOW
    + _OWNER_OF
    + """
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[1], now, ARGV[i]) == 1 then
    redis.call('HINCRBY', KEYS[2], owner_of(ARGV[i]), 1)
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return #ARGV - 1
"""
)

# KEYS: group, owners. ARGV: member.
_GROUP_DISCARD = (
    _OWNER_OF
    + """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then forget(ARGV[1]) end
return 0
"""
)

# Drops the stale members of the group KEYS[1] (usually none, so no per-member
# work); ARGV[1] is the group expiry in ms. Needs `now` and `forget`.
_DROP_STALE = """
local cutoff = now - tonumber(ARGV[1])
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)
if #stale > 0 then
  for _, member in ipairs(stale) do forget(member) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
end
"""


def _ready_check(index: int) -> str:
    """Lua that refuses a group_send while Redis may lack members it lost (KEYS[index]: the marker).

    An integer reply instead of the owners: -1 if the marker is gone (Redis lost
    its data, or never had this prefix's), else the ms left of the grace window
    in which the processes re-register their members. Without that key (a
    cluster) nothing is checked. Needs `now`.
    """
    return f"""
if #KEYS >= {index} then
  local ready = redis.call('GET', KEYS[{index}])
  if not ready then return -1 end
  if tonumber(ready) > now then return tonumber(ready) - now end
end
"""


# KEYS: group, owners[, ready marker]. ARGV: group expiry ms. Returns the owners hash
# after dropping stale members: {owner, count, owner, count...}; or an integer (see
# _ready_check).
_GROUP_OWNERS = (
    _NOW
    + _OWNER_OF
    + _ready_check(3)
    + _DROP_STALE
    + """
return redis.call('HGETALL', KEYS[2])
"""
)

# KEYS: group, owners, ready marker. ARGV: group expiry ms, inbox capacity, ttl ms, wake
# command ('' for none), key prefix, own token, group, data, '1' to publish the entry
# ('0': an empty wake-up). The group_send of a single server in one round trip:
# _GROUP_OWNERS, then one entry in the inbox of every other owning process, through
# _INBOX_PUSH as a lone send's. A cluster cannot: the inboxes live in other slots than the
# group (a script touches one slot), and this script names them itself (as _inbox_key,
# _seq_key and _wake_channel do). Returns {own count or '', inboxes that were full, named
# owners...}, or an integer (see _ready_check).
_GROUP_SEND = (
    _NOW
    + _OWNER_OF
    + _ready_check(3)
    + _DROP_STALE
    + _INBOX_PUSH
    + """
local cap = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local tail = '\\n' .. ARGV[7] .. '\\0' .. ARGV[8]
local owners = redis.call('HGETALL', KEYS[2])
local own, full, named = '', 0, {}
for i = 1, #owners, 2 do
  local owner = owners[i]
  if string.sub(owner, 1, 1) ~= '!' then
    named[#named + 1] = owner
  elseif string.sub(owner, 2) == ARGV[6] then
    own = owners[i + 1]
  else
    local token = '{' .. string.sub(owner, 2) .. '}'
    local inbox, seq = ARGV[5] .. ':inbox:' .. token, ARGV[5] .. ':seq:' .. token
    local wake = ARGV[5] .. ':wake:' .. token
    if inbox_push(inbox, seq, cap, ttl, ARGV[4], wake, ARGV[9], {'G' .. owners[i + 1] .. tail}, 1) == 0 then
      full = full + 1
    end
  end
end
local out = {own, full}
for _, name in ipairs(named) do out[#out + 1] = name end
return out
"""
)

# The live state of a group's history: `list` holds its entries (deadline prefix,
# oldest first), `meta` the hash {epoch, offset of the newest entry}. Entries leave
# only from the head (size, ttl), so the head's offset is newest - length + 1.
# Starts a new epoch (with `candidate`) when the state is gone: the hash expired or
# was deleted, or the list was lost while the hash says it had entries (the last
# entry expires with the keys, so an empty list means lost). Needs `now`.
_HISTORY_LIVE = """
local function history_live(list, meta, candidate)
  local state = redis.call('HMGET', meta, 'epoch', 'offset')
  local epoch, newest = state[1], tonumber(state[2]) or 0
  local n = redis.call('LLEN', list)
  while n > 0 do
    if tonumber(string.sub(redis.call('LINDEX', list, 0), 1, 13)) > now then break end
    redis.call('LPOP', list)
    n = n - 1
  end
  if not epoch or (n == 0 and newest > 0) then
    epoch, newest, n = candidate, 0, 0
    redis.call('DEL', list)
    redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
    return epoch, newest, n, true
  end
  return epoch, newest, n, false
end
"""

# KEYS: group, owners, history list, history meta[, ready marker]. ARGV: group expiry ms, size,
# ttl ms, candidate epoch, entry. A group_send to a group with history in one call:
# assigns the next offset, stores the entry, trims to `size`, keeps the whole
# history for `ttl` after this append, and returns {offset, epoch, owners hash}
# for the fan-out, as _GROUP_OWNERS does. All four keys share the group's hash tag.
_GROUP_SEND_HISTORY = (
    _NOW
    + _OWNER_OF
    + _ready_check(5)
    + _DROP_STALE
    + _HISTORY_LIVE
    + """
local size = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local epoch, _, n = history_live(KEYS[3], KEYS[4], ARGV[4])
local offset = redis.call('HINCRBY', KEYS[4], 'offset', 1)
redis.call('RPUSH', KEYS[3], string.format('%013d', now + ttl) .. ARGV[5])
if n + 1 > size then redis.call('LTRIM', KEYS[3], -size, -1) end
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('PEXPIRE', KEYS[4], ttl)
return {offset, epoch, redis.call('HGETALL', KEYS[2])}
"""
)

# KEYS: history list, history meta. ARGV: after, limit, ttl ms, candidate epoch.
# Returns {newest, epoch, complete (1/0), offset of the first entry, entries}: the
# newest `limit` entries with an offset above `after`. A history read before any
# append gets its epoch now, so that the next append uses the same one.
_HISTORY_READ = (
    _NOW
    + _HISTORY_LIVE
    + """
local after = tonumber(ARGV[1])
local epoch, newest, n, created = history_live(KEYS[1], KEYS[2], ARGV[4])
if created then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
local head = newest - n + 1
local first = math.max(after + 1, newest - tonumber(ARGV[2]) + 1, head)
local entries = {}
if first <= newest then entries = redis.call('LRANGE', KEYS[1], first - head, -1) end
return {newest, epoch, (head - 1 <= after) and 1 or 0, first, entries}
"""
)


# KEYS: the ready marker. ARGV: grace ms. Creates the marker if it is missing, with
# the groups usable `grace` ms from now; returns the ms left before they are.
_READY_MARK = (
    _NOW
    + """
redis.call('SET', KEYS[1], string.format('%d', now + tonumber(ARGV[1])), 'NX')
return math.max(tonumber(redis.call('GET', KEYS[1])) - now, 0)
"""
)

# KEYS: live owners, this owner's groups. ARGV: token, timeout ms, group.
# Records (or refreshes) the owner before its entry in `group` is stored.
_PRESENCE_OWN = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
return 0
"""
)

# KEYS: live owners, this owner's groups. ARGV: token, group. After the owner's
# last entry in `group` left: forget the group, and the owner with its last group.
_PRESENCE_DISOWN = """
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""

# KEYS: a group's presence hash. ARGV: channel. Removes the entry, returns it (nil if none).
_PRESENCE_TAKE = """
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if entry then redis.call('HDEL', KEYS[1], ARGV[1]) end
return entry
"""

# KEYS: live owners. ARGV: token, timeout ms. The heartbeat: 1 if the owner was
# missing (Redis lost it, or a reaper took it), so its entries must be stored again.
_PRESENCE_BEAT = (
    _NOW
    + """
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
"""
)

# KEYS: live owners. Returns {now, {token, deadline, ...}}: one reply tells both
# who is alive (for a read) and who is dead (for a reap), by Redis's clock.
_PRESENCE_OWNERS = (
    _NOW
    + """
return {now, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
"""
)

# KEYS: live owners, then the groups set of each token in ARGV. Claims each owner
# still past its deadline: exactly one caller removes it (ZREM returns 1 once) and
# gets its groups. Returns {token, {groups}, ...}.
_PRESENCE_CLAIM = (
    _NOW
    + """
local out = {}
for i, token in ipairs(ARGV) do
  local deadline = tonumber(redis.call('ZSCORE', KEYS[1], token))
  if deadline and deadline <= now and redis.call('ZREM', KEYS[1], token) == 1 then
    out[#out + 1] = token
    out[#out + 1] = redis.call('SMEMBERS', KEYS[i + 1])
    redis.call('DEL', KEYS[i + 1])
  end
end
return out
"""
)

# KEYS: a group's presence hash. ARGV: a claimed owner's mark (token .. "\n").
# Removes that owner's entries; returns {channel, info, ...}.
_PRESENCE_REAP = """
local mark = ARGV[1]
local out = {}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local entry = entries[i + 1]
  if string.sub(entry, 1, #mark) == mark then
    redis.call('HDEL', KEYS[1], entries[i])
    out[#out + 1] = entries[i]
    out[#out + 1] = string.sub(entry, #mark + 1)
  end
end
return out
"""


class _Script:
    """A Lua script run by EVALSHA, falling back to EVAL after a Redis restart."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_SCRIPTS = {
    name: _Script(source)
    for name, source in {
        "push_inbox": _PUSH_INBOX,
        "take_inbox": _TAKE_INBOX,
        "ack_inbox": _ACK_INBOX,
        "push_named": _PUSH_NAMED,
        "pop_named": _POP_NAMED,
        "group_add": _GROUP_ADD,
        "group_discard": _GROUP_DISCARD,
        "group_owners": _GROUP_OWNERS,
        "group_send": _GROUP_SEND,
        "group_send_history": _GROUP_SEND_HISTORY,
        "history_read": _HISTORY_READ,
        "ready_mark": _READY_MARK,
        "presence_own": _PRESENCE_OWN,
        "presence_disown": _PRESENCE_DISOWN,
        "presence_take": _PRESENCE_TAKE,
        "presence_beat": _PRESENCE_BEAT,
        "presence_owners": _PRESENCE_OWNERS,
        "presence_claim": _PRESENCE_CLAIM,
        "presence_reap": _PRESENCE_REAP,
    }.items()
}
_BY_SHA = {script.sha: script for script in _SCRIPTS.values()}
#: Script names by SHA-1 and by source (EVALSHA and EVAL), for messages.
_SCRIPT_NAMES = {key: name for name, script in _SCRIPTS.items() for key in (script.sha, script.source)}


def _tag(name: str) -> str:
    """``{name}`` as a hash tag, escaped so that braces in names cannot cut it short."""
    return "{" + name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D") + "}"


def _script_call(name: str, keys: Iterable[str], *args: Any) -> tuple[Any, ...]:
    """The EVALSHA command running script ``name`` on ``keys`` with ``args``."""
    keys = list(keys)
    return ("EVALSHA", _SCRIPTS[name].sha, len(keys), *keys, *args)


def _acl_refusal_in(exc: BaseException) -> BaseException | None:
    """The ACL refusal that ``exc`` is or wraps, else None.

    redis-py's cluster client reports a refused CLUSTER SLOTS as "Cluster mode is
    not enabled on this node", raised while handling the NOPERM and wrapped once more.
    """
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            break
        if _ACL_REFUSAL.search(str(seen)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _described(command: tuple[Any, ...]) -> str:
    """``command`` for a message: its name, with the script's name and keys for a script."""
    name = _SCRIPT_NAMES.get(command[1]) if command[0] in ("EVALSHA", "EVAL") else None
    if name is None:
        return str(command[0])
    keys = [str(key) for key in command[3 : 3 + int(command[2])]]
    return f"{command[0]} (script {name} on {', '.join(keys)})"


def _nothing() -> None:
    pass


def _settle_pushes(futs: list[asyncio.Future[Any]], result: Any) -> None:
    """Settle the pushes of one script call: the first ``result`` entries went in."""
    for index, fut in enumerate(futs):
        settle(fut, result if isinstance(result, BaseException) else index < int(result))


def _deadline(entry: bytes) -> int:
    return int(entry[:_DEADLINE_DIGITS])


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


#: The arguments of a push command up to its first entry (see _take_jobs): the same for
#: every push to one inbox, so packed once per inbox (see _pack).
_PUSH_HEAD = 10


def _bulk(value: bytes | str | int | float) -> bytes:
    """One command argument as a RESP bulk string (what redis-py's encoder sends for it)."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    elif isinstance(value, int):
        data = b"%d" % value
    else:
        data = repr(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


_NOBODY: frozenset[str] = frozenset()


class _Refused(Exception):
    """An error reply of Redis on the subscription (``-ERR ...``)."""


def _parse_reply(buf: bytearray, pos: int) -> tuple[Any, int] | None:
    """The RESP2 reply of ``buf`` at ``pos`` and where the next one begins; None while incomplete.

    Arrays, bulk and simple strings, integers and errors (as :class:`_Refused`): all a
    subscription carries. Raises ValueError on bytes that are not RESP2.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, line, pos = buf[pos], buf[pos + 1 : end], end + 2
    if kind == 36:  # $
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            return None
        return bytes(buf[pos : pos + size]), pos + size + 2
    if kind == 42:  # *
        items = []
        for _ in range(int(line)):
            parsed = _parse_reply(buf, pos)
            if parsed is None:
                return None
            item, pos = parsed
            items.append(item)
        return items, pos
    if kind == 58:  # :
        return int(line), pos
    if kind == 43:  # +
        return bytes(line), pos
    if kind == 45:  # -
        return _Refused(line.decode(errors="replace")), pos
    raise ValueError(f"not a RESP2 reply: {bytes(buf[pos - len(line) - 3 : pos])[:40]!r}")


class _PyReader:
    """``hiredis.Reader``'s ``feed``/``gets``, in Python, for an install without hiredis.

    The ``redis`` extra brings hiredis, whose C reader the subscription uses; a
    plain ``pip install redis`` does not, and then this one parses what a
    subscription carries (see :func:`_parse_reply`).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def gets(self) -> Any:
        """The next complete reply, or False while there is none."""
        parsed = _parse_reply(self._buffer, 0)
        if parsed is None:
            return False
        reply, end = parsed
        del self._buffer[:end]
        return reply


def _reply_reader() -> Any:
    """A reader of RESP2 replies: hiredis's (C) when installed, as the redis extra does; else _PyReader.

    Both return errors as :class:`_Refused` and raise ValueError on bytes that are not RESP2.
    """
    try:
        from hiredis import Reader
    except ImportError:  # pragma: no cover - the redis extra installs hiredis
        return _PyReader()
    return Reader(protocolError=ValueError, replyError=_Refused)


class _Subscription(asyncio.Protocol):
    """The reader's pub/sub connection, parsed in the socket's callback (see ``_read_pubsub``).

    Takes over a transport redis-py opened; its own protocol still gets
    ``connection_lost``, so that redis-py's close waits end. Published entries go
    to ``on_message`` as they arrive. Anything else it expects (the subscription's
    confirmation, an empty wake-up, a pong) *holds* it: parsing and reading stop
    until the reader, having drained the inbox, lets it go on (:meth:`held`).
    """

    def __init__(self, transport: asyncio.Transport, on_message: Callable[[bytes], None]) -> None:
        self._transport = transport
        self._inner = transport.get_protocol()
        self._on_message = on_message
        # Parses what arrives; keeps what came while the subscription is held.
        self._reader = _reply_reader()
        self._held = False
        self._waiter: asyncio.Future[None] | None = None
        #: Why the subscription ended, once it did.
        self._ended: BaseException | None = None

    async def held(self, *, release: bool = False) -> None:
        """Wait until the subscription is held (after letting it go on, with ``release``).

        Once it ended, raises why: ConnectionError, :class:`_Refused`, or ValueError
        for bytes that are not RESP2.
        """
        if self._ended is None:
            self._waiter = running_loop().create_future()
            if release:
                self._held = False
                self._transport.resume_reading()
                self._parse()
            if not self._held and self._ended is None:
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        if self._ended is not None:
            raise self._ended

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        if not self._held:
            self._parse()

    def _parse(self) -> None:
        try:
            while not self._held and self._ended is None:
                reply = self._reader.gets()
                if reply is False:
                    break
                if isinstance(reply, _Refused):
                    raise reply
                if not isinstance(reply, list) or not reply:
                    continue  # nothing else is expected here
                if reply[0] in _PUBLISHED and reply[-1]:
                    self._on_message(reply[-1])
                elif reply[0] in _HOLDS:
                    self._hold()
        except (_Refused, ValueError) as exc:  # the session ends with it
            self._end(exc)
            self._transport.abort()

    def _hold(self) -> None:
        self._held = True
        self._transport.pause_reading()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _end(self, exc: BaseException) -> None:
        if self._ended is None:
            self._ended = exc
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(ConnectionError(f"the subscription's connection ended: {exc or 'closed by Redis'}"))
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Early:
    """A group message of this process, delivered to its own members before Redis answered."""

    __slots__ = ("group", "members", "message")

    def __init__(self, group: str, message: Message) -> None:
        self.group = group
        self.message = message
        #: The local members it went to; None while none (it waits behind a resync).
        self.members: list[str] | None = None


class RedisChannelLayer(BrokerChannelLayer):
    """A channel layer on Redis (standalone or Redis Cluster), via redis-py's asyncio client.

    Options (keyword-only; every one is also an environment variable
    ``FASTAPI_WEBSOCKETS_REDIS_<OPTION>``), besides the shared ones of
    :class:`~fastapi_websockets.backends.broker.BrokerChannelLayer` (among them
    ``timeout``: seconds a Redis call may take, default 10):

    * ``url``: ``redis://``, ``rediss://`` or ``unix://`` URL; with ``cluster``,
      any node of the cluster.
    * ``prefix``: prefix of every key and pub/sub channel (letters, digits,
      ``. _ / -``); layers with different prefixes share nothing.
    * ``cluster``: talk to a Redis Cluster.
    * ``use_pubsub``: each reader subscribes to a pub/sub channel of its own, on
      which the script that stores a message in its inbox also publishes it, so
      the reader delivers it without a pop; ``False``: readers block in BLMOVE
      until their inbox has entries, then pop them. Messages are stored in
      lists either way.
    * ``sharded_pubsub``: in a cluster, wake-ups use SPUBLISH/SSUBSCRIBE
      (Redis 7), so only the node owning the inbox's slot carries them.
    * ``sentinels`` and ``sentinel_master``: ``"host:port"`` of the Redis
      Sentinels (comma-separated in the environment) and the name of the master
      they monitor. The layer asks them where the master is, follows failovers
      and only ever writes to the master; ``url`` then gives only the scheme,
      credentials and database (``rediss://`` also means TLS to the sentinels).
    * ``tls_ca_file`` (shared): the CA bundle verifying the server's
      certificate; needs a ``rediss://`` URL.
    """

    backend_name = "redis"
    broker_label = "Redis"
    default_port = 6379

    def __init__(
        self,
        *,
        url: str = "redis://localhost:6379/0",
        prefix: str = "fastapi-websockets",
        cluster: bool = False,
        use_pubsub: bool = True,
        sharded_pubsub: bool = True,
        sentinels: list[str] | None = None,
        sentinel_master: str | None = None,
        **options: Any,
    ) -> None:
        # The shared default timeout (10 s) is safe here although redis-py 8 times
        # sockets out after 5 s: every connection this layer opens sets its own
        # socket timeout from ``timeout`` (the reader's also covers its blocking read).
        super().__init__(**options)
        scheme = url_option("url", url, _URL_SCHEMES).scheme
        self.url = url
        if self.tls_ca_file is not None:
            require_secure("url", url, scheme == "rediss", "a rediss:// url")
        #: (host, port) of each sentinel; empty without Sentinel.
        self.sentinels = _sentinel_addresses(sentinels)
        self.sentinel_master = sentinel_master
        if bool(self.sentinels) != bool(sentinel_master):
            raise InvalidChannelLayerConfig(
                "sentinels and sentinel_master go together: give both or neither, "
                f"got sentinels={sentinels!r}, sentinel_master={sentinel_master!r}"
            )
        if self.sentinels and (cluster or scheme == "unix"):
            raise InvalidChannelLayerConfig(
                "sentinels need a redis:// or rediss:// url and cluster=False, "
                f"got cluster={cluster!r} and a {scheme}:// url"
            )
        via = ", ".join(f"{host}:{port}" for host, port in self.sentinels)
        self.set_location(url, where=f"master {sentinel_master!r} via sentinels {via}" if via else None)
        self.prefix = matching(
            "prefix",
            prefix,
            _PREFIX_RE,
            "1-100 characters among letters, digits and '. _ / -' "
            "(no ':', braces or glob characters, so that prefixes never overlap)",
        )
        self.cluster = flag("cluster", cluster)
        self.use_pubsub = flag("use_pubsub", use_pubsub)
        self.sharded_pubsub = flag("sharded_pubsub", sharded_pubsub)
        self._expiry_ms = _ms(self.channel_expiry)
        self._group_expiry_ms = _ms(self.group_expiry)
        self._presence_timeout_ms = _ms(self.presence_timeout)
        self._inbox_limit = self.capacity * _INBOX_FACTOR
        self._client: Redis | RedisCluster | None = None
        self._cluster_client: RedisCluster | None = None
        self._sentinel: Sentinel | None = None
        self._reader_redis: Redis | None = None
        #: Not in a cluster: the writer task's own client and connection (see _exchange).
        self._writer_client: Redis | None = None
        self._writer_conn: AbstractConnection | None = None
        #: Connections being opened, each settled once its open ended (see _opening).
        self._openings: set[asyncio.Future[None]] = set()
        #: Inbox key -> the packed head of a push to it (see _pack).
        self._push_heads: Memo[str, bytes] = Memo()
        self._reader_healthy = False
        # Whether the reader was ever connected: every later session restores state.
        self._reader_was_connected = False
        self._conn_errors: tuple[type[BaseException], ...] = ()
        self._redis_errors: tuple[type[BaseException], ...] = ()
        #: redis-py's ConnectionError, ResponseError and NoScriptError, once started.
        self._broken: tuple[type[BaseException], ...] = ()
        self._refusal: tuple[type[BaseException], ...] = ()
        #: redis-py's AuthenticationError (WRONGPASS, NOAUTH), once started (see _lost).
        self._login_errors: tuple[type[BaseException], ...] = ()
        self._no_script: tuple[type[BaseException], ...] = ()
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._inbox_pending: dict[str, list[tuple[bytes, asyncio.Future[Any]]]] = {}
        #: Settled once the write holding everything queued before them went out (see _after_write).
        self._written: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        #: Set while the writer task waits for work (see _flush_queue); settled to wake it.
        self._parked: asyncio.Future[None] | None = None
        #: The time limit of each of the writer's exchanges: one timer for all (see _write).
        self._writer_bound = LazyBound(self.timeout, self._no_reply)
        #: Jobs a caller wrote itself (see _write_now), whose replies the writer reads first.
        self._ahead: list[tuple[tuple[Any, ...], Callable[[Any], None]]] = []
        #: Whether the last take of queued work held one command or entry (see _write_now).
        self._lone = True
        #: The receivers of this process waiting on each named channel; one fetch task each.
        self._named: dict[str, WaiterQueue[Message]] = {}
        self._clock_offset_ms = 0.0
        #: Id of the last inbox batch the reader got (acknowledged by the next take).
        self._taken_id = ""
        #: Id of the newest inbox entry delivered (b"" for none): an entry at or below
        #: it came both ways (published and popped) and is skipped.
        self._delivered_id = b""
        #: Entries delivered from pub/sub and not yet removed from the inbox.
        self._unacked = 0
        #: Entries delivered from pub/sub after which a removal is queued without waiting for quiet.
        self._ack_every = 1
        #: The transport of the reader's subscription while a session reads it.
        self._subscription: asyncio.WriteTransport | None = None
        #: Pub/sub messages the reader handled, and its one timer (see _quiet_for).
        self._arrivals = 0
        self._quiet: asyncio.TimerHandle | None = None
        #: Whether the reader's timer sent a PING that got no pong yet.
        self._pinged = False
        #: The same for each named channel whose taken list may still hold a batch.
        self._named_taken: dict[str, str] = {}
        self._taken_seq = 0
        #: Whether this layer saw the ready marker: if it goes missing later, Redis lost its data.
        self._ready_seen = False
        #: Group messages waiting while the members of a group are read back from Redis, each
        #: with the members that already have it (this process's own group_send delivers early).
        self._resyncing: dict[str, list[tuple[Message, frozenset[str]]]] = {}
        #: Until when (monotonic) Redis is known to be refusing group_send after losing its data.
        self._refusing_until = 0.0

    # ---------------------------------------------------------------- keys

    def _inbox_key(self, token: str) -> str:
        return f"{self.prefix}:inbox:{{{token}}}"

    def _seq_key(self, token: str) -> str:
        return f"{self.prefix}:seq:{{{token}}}"

    def _taken_key(self, token: str) -> str:
        return f"{self.prefix}:taken:{{{token}}}"

    def _wake_channel(self, token: str) -> str:
        return f"{self.prefix}:wake:{{{token}}}"

    def _channel_key(self, channel: str) -> str:
        return f"{self.prefix}:chan:{_tag(channel)}"

    def _waiters_key(self, channel: str) -> str:
        return f"{self.prefix}:waiters:{_tag(channel)}"

    def _named_taken_key(self, channel: str) -> str:
        return f"{self.prefix}:ntaken:{_tag(channel)}:{self.client_token}"

    def _group_key(self, group: str) -> str:
        return f"{self.prefix}:group:{_tag(group)}"

    def _group_keys(self, group: str) -> list[str]:
        """The group's members and its owners hash: one hash tag, one slot."""
        tag = _tag(group)
        return [f"{self.prefix}:group:{tag}", f"{self.prefix}:owners:{tag}"]

    def _history_keys(self, group: str) -> list[str]:
        """The group's history list and its {epoch, offset} hash: the same slot as its members."""
        tag = _tag(group)
        return [f"{self.prefix}:history:{tag}", f"{self.prefix}:hmeta:{tag}"]

    def _presence_key(self, group: str) -> str:
        return f"{self.prefix}:presence:{_tag(group)}"

    def _presence_owner_keys(self, token: str) -> list[str]:
        """The live owners and the groups of ``token``: one hash tag, one slot for all processes."""
        return [self._presence_live_key, f"{self.prefix}:pgroups:{{presence}}:{token}"]

    @property
    def _ready_keys(self) -> list[str]:
        """The marker a group_send checks, as a key list to append (none in a cluster).

        A cluster spreads a prefix's groups over slots, and a script may only touch
        keys of one slot, so there is no single marker to check there.
        """
        return [] if self.cluster else [f"{self.prefix}:ready"]

    @property
    def _presence_live_key(self) -> str:
        return f"{self.prefix}:plive:{{presence}}"

    @property
    def _wake_command(self) -> str:
        if not self.use_pubsub:
            return ""
        return "SPUBLISH" if self.cluster and self.sharded_pubsub else "PUBLISH"

    @property
    def _hand_over(self) -> bool:
        """Whether pushes publish their entries to the reader (see ``P:wake`` above)."""
        return self.use_pubsub and (self.sharded_pubsub or not self.cluster)

    # ------------------------------------------------------------- lifecycle

    async def _start(self) -> None:
        try:
            from redis import exceptions
            from redis.asyncio import Redis
            from redis.asyncio.cluster import RedisCluster
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialBackoff, NoBackoff
        except ImportError as exc:
            raise missing_driver("redis", exc) from exc
        # RedisClusterException (no node reachable, every node refused our AUTH) is not
        # a RedisError.
        self._conn_errors = (
            exceptions.ConnectionError,
            exceptions.TimeoutError,
            exceptions.ClusterError,
            exceptions.RedisClusterException,
        )
        self._redis_errors = (exceptions.RedisError,)
        # For the writer, which runs per batch: an import statement there cost ~2 us each.
        self._broken = (exceptions.ConnectionError,)
        self._refusal = (exceptions.ResponseError,)
        self._login_errors = (exceptions.AuthenticationError,)
        self._no_script = (exceptions.NoScriptError,)
        # One retry on a broken connection: the first write after a Redis restart meets
        # a dead pooled connection and must go through on a fresh one. Not on timeouts:
        # a slow Redis may have run the commands, and a retry would deliver them twice.
        retry = Retry(
            ExponentialBackoff(cap=0.5, base=0.05), 1, supported_errors=(exceptions.ConnectionError,)
        )
        common: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": retry,
        }
        if self.cluster:
            cluster = RedisCluster.from_url(self.url, **common, **self._tls_options())
            try:
                await within(cluster.initialize(), self.timeout, self._no_reply)
            except (*self._conn_errors, *self._refusal) as exc:
                await cluster.aclose()
                refusal = _acl_refusal_in(exc) or (exc if isinstance(exc, self._refusal) else None)
                if refusal is not None:
                    raise self._refused("CLUSTER SLOTS or COMMAND (the cluster's map)", refusal) from exc
                raise self._lost(exc) from exc
            except BackendUnavailable:
                await cluster.aclose()
                raise
            self._client = self._cluster_client = cluster
        else:
            # The writer's connection has no socket timeout of its own: _exchange bounds
            # the whole write and its replies, and redis-py would run every write under
            # asyncio.wait_for (one more task) to apply one.
            writer: dict[str, Any] = {
                **common,
                "socket_timeout": None,
                "retry": Retry(NoBackoff(), 0),
                "max_connections": 1,
            }
            if self.sentinels:
                self._client = self._sentinel_master(**common)
                self._writer_client = self._sentinel_master(**writer)
            else:
                self._client = Redis.from_url(self.url, **common, **self._tls_options())
                self._writer_client = Redis.from_url(self.url, **writer, **self._tls_options())
        self.tasks.keep_running(self._read_inbox, "reader")

    async def _close(self) -> None:
        # A connection being opened first (see _opening), for at most the tasks' first wait.
        deadline = time.monotonic() + min(1.0, self.timeout)
        while self._openings and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(self._openings, timeout=left)
        # Before the tasks stop: a read they cut short closes its connection without waiting.
        streams = self._open_streams()
        # redis-py 8 can swallow a cancellation that lands while it opens a connection;
        # closing the sockets unblocks such a task, and every loop here stops once the
        # layer is closed.
        await self.tasks.close(self.timeout, unblock=self._disconnect)
        self._writer_bound.cancel()
        self._fail_queue(ChannelLayerClosed("the channel layer was closed"))
        await self._disconnect()
        await self._wait_sockets_closed(streams)
        self._client = self._cluster_client = self._sentinel = self._writer_client = None
        self._writer_conn = None

    async def _opening(self, connect: Awaitable[T]) -> T:
        """Await ``connect``, which opens a connection; close() lets it end before it cancels tasks.

        A cancellation that lands as a TLS handshake completes makes asyncio close
        the new socket without waiting for the server's TLS shutdown, before redis-py
        got it: close() could neither close it nor wait for it, and an event loop that
        ended then left the socket to the garbage collector ("unclosed transport").
        """
        ended: asyncio.Future[None] = running_loop().create_future()
        self._openings.add(ended)
        try:
            return await connect
        finally:
            self._openings.discard(ended)
            ended.set_result(None)

    def _open_streams(self) -> list[asyncio.StreamWriter]:
        """The streams of every connection of the layer's clients now (not in a cluster)."""
        streams = []
        for client in (self._client, self._writer_client, self._reader_redis):
            pool = getattr(client, "connection_pool", None)
            # redis-py keeps both private: getattr, so that without them close() only skips the wait.
            connections = [
                *getattr(pool, "_available_connections", ()),
                *getattr(pool, "_in_use_connections", ()),
            ]
            for conn in connections:
                writer = getattr(conn, "_writer", None)
                if isinstance(writer, asyncio.StreamWriter):
                    streams.append(writer)
        return streams

    async def _wait_sockets_closed(self, streams: list[asyncio.StreamWriter]) -> None:
        """Wait until the sockets of ``streams`` are closed; abort them if some are left after the timeout.

        A read cut short by a cancellation (the writer's, at close) closes its
        connection without waiting (``disconnect(nowait=True)``), and later
        disconnects skip it. Over TLS
        the socket is closed only once the server answers the TLS shutdown: a
        close() that returned before then left it open, and if the event loop
        ended first, to the garbage collector ("unclosed transport").
        """
        for writer in streams:
            writer.close()  # a no-op when closing already

        async def closed(writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):  # the error that closed it: nothing to do now
                await writer.wait_closed()

        waits = [asyncio.ensure_future(closed(writer)) for writer in streams]
        if not waits:
            return
        _, late = await asyncio.wait(waits, timeout=self.timeout)
        for wait in late:
            wait.cancel()
        if late:
            for writer in streams:
                writer.transport.abort()
            await asyncio.sleep(0)  # the abort closes the socket on the next loop iteration

    async def _disconnect(self) -> None:
        # The writer client's pool disconnects the connection _exchange holds too.
        for client in (self._reader_redis, self._client, self._writer_client, self._sentinel):
            if client is None:
                continue
            try:
                await client.aclose()
            except self._redis_errors as exc:
                # A server that stopped answering leaves a TLS shutdown unacknowledged, and
                # redis-py raises past its timeout: the other clients still close, close()
                # does not raise it, and _wait_sockets_closed() aborts what is left open.
                logger.debug("a Redis client did not close cleanly: %r", exc)

    def _tls_options(self) -> dict[str, Any]:
        """What every connection to a ``rediss://`` server adds: the CA to verify it with.

        redis-py already requires a certificate and checks the host name by default.
        """
        if self.tls_ca_file is None:
            return {}
        return {"ssl_ca_certs": self.tls_ca_file}

    def _sentinel_master(self, **options: Any) -> Redis:
        """A client of whichever server the sentinels name as master, now and after a failover.

        redis-py asks the sentinels for the master's address on every new
        connection, drops idle connections to a previous master, and turns a
        READONLY reply (a demoted master) into a connection error, so a write
        never lands on a replica.
        """
        from redis.asyncio.connection import parse_url
        from redis.asyncio.sentinel import Sentinel

        if self._sentinel is None:
            settings = {
                key: value
                for key, value in parse_url(self.url).items()
                if key not in ("host", "port", "connection_class")
            }
            tls = self._tls_options()
            if self.url.startswith("rediss:"):
                # The sentinel pool picks its TLS connection class from this flag.
                tls["ssl"] = True
            timeouts = {"socket_timeout": self.timeout, "socket_connect_timeout": self.timeout}
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]  # untyped in redis-py
                self.sentinels,
                sentinel_kwargs={**timeouts, **tls},
                **settings,
                **tls,
            )
        assert self.sentinel_master is not None
        client: Redis = self._sentinel.master_for(self.sentinel_master, **options)
        return client

    def _no_reply(self) -> BackendUnavailable:
        return self.unavailable(f"no reply within {self.timeout} s")

    def _lost(self, exc: BaseException) -> ChannelLayerError:
        """The error for a connection that failed with ``exc``: a refused login (see
        :meth:`~BrokerChannelLayer.login_refused`), else ``BackendUnavailable``."""
        # A cluster client reports every node refusing the login as RedisClusterException
        # from the last AuthenticationError.
        refusal = exc if isinstance(exc, self._login_errors) else exc.__cause__
        if not isinstance(refusal, self._login_errors):
            return self.unavailable(exc)
        user = user_of(self.url, "default")
        return self.login_refused(
            str(refusal),
            f"check the user name and password in url (user {user!r}) against the server's requirepass "
            f"or ACL users, and that the user is on (ACL SETUSER {user} on >PASSWORD)",
        )

    # ------------------------------------------------- batched command queue

    async def _execute(self, *command: Any) -> Any:
        """Run one command; concurrent calls share one pipelined write (auto-pipelining)."""
        return await self._reply(self._queue_now(*command))

    def _queue_now(self, *command: Any) -> asyncio.Future[Any]:
        """Queue one command at once, behind everything queued before it; its reply's future.

        Unlike :meth:`_execute`, the command takes its place in the pipeline when
        this is called, not when a coroutine first runs: callers that queue in
        order under a lock get their commands run in that order.
        """
        self._check_open()
        fut: asyncio.Future[Any] = running_loop().create_future()
        self._queue.append((command, fut))
        self._start_writer()
        return fut

    def _start_writer(self) -> None:
        if not self._writer_idle:
            return
        if self._parked is not None:
            self._parked.set_result(None)
        else:
            self._flusher = self.tasks.spawn(self._flush_queue(), "writer")

    @property
    def _writer_idle(self) -> bool:
        """Whether the writer task is not running a batch: none yet, ended, or waiting for work."""
        parked = self._parked
        if parked is not None:
            return not parked.done()
        return self._flusher is None or self._flusher.done()

    async def _reply(self, fut: asyncio.Future[Any]) -> Any:
        self._start_writer()
        # A reply that comes too late finds its future done; the writer skips it.
        return await reply_within(fut, self.timeout, self._no_reply)

    async def _script(self, name: str, keys: Iterable[str], *args: Any) -> Any:
        return await self._execute(*_script_call(name, keys, *args))

    async def _after_write(self, command: tuple[Any, ...], then: Callable[[], None]) -> Any:
        """Run ``command`` as :meth:`_execute` does, calling ``then()`` once it is written.

        ``then()`` runs in the caller's task as soon as the write holding the
        command went out, before Redis answers: what it starts (a local fan-out)
        can no longer delay that write. If the write fails before going out,
        ``then()`` is not called and the failure is raised.
        """
        fut = self._queue_now(*command)
        await self._sent([fut])
        then()
        return await self._reply(fut)

    async def _sent(self, futs: list[asyncio.Future[Any]]) -> None:
        """Wait until everything queued so far (``futs``, the callers' replies) is written to Redis.

        Returns before the replies. If the write fails before going out, the
        failure is raised and ``futs`` are left settled or cancelled, so that
        the caller need not await them.
        """
        written: asyncio.Future[None] = running_loop().create_future()
        self._written.append(written)
        try:
            await self._reply(written)
        except BaseException:
            for fut in futs:
                if not fut.done():
                    fut.cancel()  # still queued: the writer skips it
                elif not fut.cancelled():
                    fut.exception()  # the failure raised here: retrieved
            raise

    def _queue_push(self, token: str, entry: bytes) -> asyncio.Future[Any]:
        """Queue ``entry`` for the inbox of ``token`` at once; its future says whether it went in.

        Entries for one inbox that wait for the same write are pushed by one script call.
        """
        self._check_open()
        fut: asyncio.Future[Any] = running_loop().create_future()
        self._inbox_pending.setdefault(token, []).append((entry, fut))
        if self._writer_idle:
            self._write_now()
            self._start_writer()
        return fut

    def _write_now(self) -> None:
        """Write what is queued from the caller's task, when the writer is idle; its task reads the replies.

        A lone send then goes out before its caller yields, instead of one loop
        turn later in the writer task: Redis runs the push while the client
        goes on (a closed loop's latency, see docs/performance/redis.md). A
        transport write is one synchronous call, so a cancellation of the
        caller cannot cut it in half; the replies stay with the writer task,
        the only reader of the connection. Not in a cluster (its pipeline
        routes commands), nor on a connection not yet open or with unsent
        bytes (flow control is the writer's: it awaits ``drain()``), nor while
        the writer's last take held more than one command or entry: concurrent
        senders then go out together in the writer's next write, not the first
        of them alone (a second script call and write for Redis).
        """
        conn = self._writer_conn
        # redis-py has no synchronous write: its StreamWriter, present while connected.
        stream = None if conn is None else conn._writer
        if (
            not self._lone
            or stream is None
            or self._queue
            or stream.transport.get_write_buffer_size()
            or stream.is_closing()
        ):
            return
        jobs = self._take_jobs()
        stream.write(self._pack([command for command, _ in jobs]))
        self._ahead = jobs

    async def _push_inbox(self, token: str, entry: bytes) -> bool:
        """Append ``entry`` to the inbox of ``token``; False if that inbox is full."""
        accepted: bool = await self._reply(self._queue_push(token, entry))
        return accepted

    def _take_jobs(self) -> list[tuple[tuple[Any, ...], Callable[[Any], None]]]:
        """Everything queued, as (command, settle) pairs for one pipeline."""
        jobs: list[tuple[tuple[Any, ...], Callable[[Any], None]]] = []
        if not self._queue and not self._inbox_pending:
            return jobs  # the writer's look after a lone send it only reads the reply of
        self._lone = len(self._queue) + sum(len(items) for items in self._inbox_pending.values()) == 1
        queue, self._queue = self._queue, []
        for command, fut in queue:
            if not fut.done():
                jobs.append((command, functools.partial(settle, fut)))
        pending, self._inbox_pending = self._inbox_pending, {}
        sha = _SCRIPTS["push_inbox"].sha
        for token, items in pending.items():
            live = [(entry, fut) for entry, fut in items if not fut.done()]
            for start in range(0, len(live), _BATCH):
                chunk = live[start : start + _BATCH]
                command = (
                    "EVALSHA",
                    sha,
                    2,
                    self._inbox_key(token),
                    self._seq_key(token),
                    self._inbox_limit,
                    self._expiry_ms,
                    self._wake_command,
                    self._wake_channel(token),
                    "1" if self._hand_over else "0",
                    *(entry for entry, _ in chunk),
                )
                jobs.append((command, functools.partial(_settle_pushes, [fut for _, fut in chunk])))
        return jobs

    async def _flush_queue(self) -> None:
        """The writer task: runs what is queued, batch by batch, then waits for more until close.

        It stays parked between batches rather than ending: a task created and
        ended per lone send cost its creation, its done callback and one more
        loop iteration each time (see docs/performance/redis.md).
        """
        loop = running_loop()
        while True:
            if not (self._ahead or self._queue or self._inbox_pending):
                parked = self._parked = loop.create_future()
                try:
                    await parked
                finally:
                    self._parked = None
                continue
            ahead, self._ahead = self._ahead, []
            jobs = ahead + self._take_jobs()
            written, self._written = self._written, []
            if not jobs:
                settle_all(written, None)  # their commands were given up on: nothing to wait for
                continue
            try:
                results = await self._run_pipeline(
                    [command for command, _ in jobs], functools.partial(settle_all, written, None), len(ahead)
                )
            except asyncio.CancelledError:
                closed = ChannelLayerClosed("the channel layer was closed")
                settle_all(written, closed)
                for _, outcome in jobs:
                    outcome(closed)
                raise
            except self._conn_errors as exc:
                results = [self._lost(exc)] * len(jobs)
            except BackendUnavailable as exc:  # no reply within timeout (_write)
                results = [exc] * len(jobs)
            except self._redis_errors as exc:
                results = [self._refused("the command", exc)] * len(jobs)
            # Not written (the write failed before it went out): the reason is every job's.
            settle_all(written, results[0] if isinstance(results[0], ChannelLayerError) else None)
            for (command, outcome), result in zip(jobs, results, strict=True):
                if isinstance(result, Exception) and not isinstance(result, ChannelLayerError):
                    result = self._refused(_described(command), result)
                outcome(result)

    def _refused(self, command: str, exc: BaseException) -> ChannelLayerError:
        """The error for ``command``, which Redis answered with the error ``exc``.

        An ACL refusal (``NOPERM``: a command, key or channel the layer's user may
        not use) stays refused until someone grants it, at start as later: a
        :class:`ChannelLayerError` (not ``BackendUnavailable``) naming the command
        and the ACL rules that let the layer work. Any other error reply as Redis
        put it.
        """
        said = str(exc)
        if _ACL_REFUSAL.search(said) is None:
            return ChannelLayerError(f"Redis refused {command}: {self.redact(said)}")
        user = user_of(self.url, "default")
        commands = _ACL_COMMANDS + (_ACL_CLUSTER_COMMANDS if self.cluster else ())
        rules = f"~{self.prefix}:* &{self.prefix}:wake:* " + " ".join(f"+{name}" for name in commands)
        advice = (
            f"its ACL does not let user {user!r} run it on the layer's keys: grant what the layer "
            f"needs (ACL SETUSER {user} {rules}; see 'ACL users' in the Redis backend's docs)"
        )
        return self.refused(f"command {command}", said, advice, config=False)

    async def _run_pipeline(
        self, commands: list[tuple[Any, ...]], sent: Callable[[], None], ahead: int = 0
    ) -> list[Any]:
        """Run ``commands`` in one write; ``sent()`` is called once they are written, before any reply.

        The first ``ahead`` were written already (:meth:`_write_now`): only their replies are read.
        """
        results = await self._write(commands, sent, ahead)
        missing = [i for i, result in enumerate(results) if isinstance(result, self._no_script)]
        if missing:
            # Redis restarted (or a node joined) and lost its script cache: EVAL loads it again.
            again = [("EVAL", _BY_SHA[commands[i][1]].source, *commands[i][2:]) for i in missing]
            for i, result in zip(missing, await self._write(again, _nothing), strict=True):
                results[i] = result
        return results

    async def _write(
        self, commands: list[tuple[Any, ...]], sent: Callable[[], None], ahead: int = 0
    ) -> list[Any]:
        """Send ``commands`` in one write; their replies, errors as values, in order.

        ``sent()`` is called once the commands are written, before their replies
        are read (in a cluster, whose pipeline writes and reads in one call: just
        before it). The first ``ahead`` are on the writer's connection already
        (never in a cluster).
        """
        if self._cluster_client is None:
            return await self._writer_bound.run(self._exchange(commands, sent, ahead))
        # A cluster pipeline sends each command to the node owning its keys.
        pipe = self._cluster_client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        sent()
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def _exchange(
        self, commands: list[tuple[Any, ...]], sent: Callable[[], None], ahead: int = 0
    ) -> list[Any]:
        """Write ``commands`` on the writer's own connection and read their replies.

        Only the writer task calls this, one call at a time, so the connection
        needs no pool round: redis-py's pipeline takes a pooled connection, writes
        under ``asyncio.wait_for`` and releases the connection in a shielded task,
        which cost a lone send two tasks and four more event-loop iterations (see
        docs/performance/redis.md). A broken connection is retried once on a fresh one:
        the first write after a Redis restart meets the dead one. Anything else,
        a cancellation included, leaves the connection closed, so that no reply of
        a write cut short is read as the answer to the next. The first ``ahead``
        commands were written on it already. A new connection gets again only the
        commands whose replies were not read: those answered ran (a push written
        twice would be delivered twice).
        """
        assert self._writer_client is not None
        if self._writer_conn is None:
            pool = self._writer_client.connection_pool
            opened: AbstractConnection = await self._opening(
                pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
            )
            self._writer_conn = opened
        conn = self._writer_conn
        callbacks = self._writer_client.response_callbacks
        results: list[Any] = []
        for attempt in range(2):
            try:
                if not conn.is_connected:
                    # connect(), not the implicit connect of a write: a Sentinel
                    # connection asks the sentinels for the master only there.
                    await self._opening(conn.connect())  # type: ignore[no-untyped-call]  # untyped in redis-py
                    ahead = len(results)  # the rest of what was written went with the connection before
                if ahead < len(commands):
                    await conn.send_packed_command(self._pack(commands[ahead:]), check_health=False)
                sent()
                for command in commands[len(results) :]:
                    try:
                        reply = await conn.read_response()
                    except self._refusal as exc:  # read in full: the connection stays usable
                        results.append(exc)
                        continue
                    callback = callbacks.get(command[0])
                    results.append(reply if callback is None else callback(reply))
                return results
            except self._broken:
                await conn.disconnect()
                if attempt:
                    raise
            except BaseException:
                await conn.disconnect()
                raise
        raise AssertionError("unreachable")

    def _pack(self, commands: list[tuple[Any, ...]]) -> bytes:
        """``commands`` in the Redis protocol, for one write.

        redis-py's ``pack_commands`` took about half of a lone send's packing and
        framing time (it handles every argument type and splits large values); the
        commands here carry only bytes, str and numbers, and a push repeats its first
        ten arguments for every push to the same inbox, so those are packed once.
        """
        push = _SCRIPTS["push_inbox"].sha
        parts = []
        for command in commands:
            parts.append(b"*%d\r\n" % len(command))
            if command[0] == "EVALSHA" and command[1] == push:
                head = self._push_heads.get(command[3])
                if head is None:
                    head = b"".join([_bulk(arg) for arg in command[:_PUSH_HEAD]])
                    self._push_heads.add(command[3], head)
                parts.append(head)
                parts += [_bulk(arg) for arg in command[_PUSH_HEAD:]]
            else:
                parts += [_bulk(arg) for arg in command]
        return b"".join(parts)

    def _fail_queue(self, exc: BaseException) -> None:
        written, self._written = self._written, []
        settle_all(written, exc)
        ahead, self._ahead = self._ahead, []  # a writer cancelled before it ran never read them
        for _, outcome in ahead + self._take_jobs():
            outcome(exc)

    # ------------------------------------------------------------ sending

    def _push_named_call(self, channel: str, data: bytes) -> tuple[Any, ...]:
        keys = [self._channel_key(channel), self._waiters_key(channel)]
        return _script_call("push_named", keys, data, self.capacity_for(channel), self._expiry_ms)

    async def _push_named(self, channel: str, data: bytes) -> tuple[int, list[bytes]]:
        result = await self._execute(*self._push_named_call(channel, data))
        return int(result[0]), list(result[1])

    async def _send_remote(self, channel: str, data: bytes) -> None:
        if is_process_specific(channel):
            token = process_token(channel)
            if not await self._push_inbox(token, _DATA + channel.encode() + b"\x00" + data):
                raise ChannelFull(channel, self._inbox_limit)
            return
        length, waiters = await self._push_named(channel, data)
        if length < 0:
            raise ChannelFull(channel, self.capacity_for(channel))
        if waiters:
            await self._wake_waiters(channel, waiters)

    async def _wake_waiters(self, channel: str, tokens: list[bytes]) -> None:
        """Tell the processes waiting on a named channel that it has messages."""
        pushes = []
        for raw in tokens:
            token = raw.decode()
            if token == self.client_token:
                self._wake_named(channel)
            else:
                pushes.append(self._push_inbox(token, _WAKE + channel.encode()))
        # A lost wake-up only delays the receiver until its next re-check.
        for result in await asyncio.gather(*pushes, return_exceptions=True):
            if isinstance(result, BaseException):
                logger.debug("could not wake a receiver of %r: %s", channel, result)

    # ------------------------------------------------------------- groups

    async def _group_add(self, group: str, channel: str) -> None:
        await self._script("group_add", self._group_keys(group), self._group_expiry_ms, channel)
        if self.is_local(channel):
            self.local_groups.add(group, channel)
        elif is_process_specific(channel):
            await self._tell_owner(_JOINED, group, channel)

    async def _group_discard(self, group: str, channel: str) -> None:
        await self._script("group_discard", self._group_keys(group), channel)
        if self.is_local(channel):
            self.local_groups.discard(group, channel)
        elif is_process_specific(channel):
            await self._tell_owner(_LEFT, group, channel)

    async def _tell_owner(self, kind: bytes, group: str, channel: str) -> None:
        # Best effort: Redis already holds the membership; this only keeps what the
        # owner re-registers after a Redis restart right.
        entry = kind + group.encode() + b"\n" + channel.encode()
        if not await self._push_inbox(process_token(channel), entry):
            logger.debug("could not tell the owner of %r about group %r: inbox full", channel, group)

    async def _group_send(self, group: str, data: bytes) -> None:
        if self.cluster:
            owners = await self._group_script("group_owners", self._group_keys(group), self._group_expiry_ms)
            await self._fan_out(group, owners, data)
            return
        # One server: the script reads the owners and fills the other processes' inboxes,
        # so they are woken one round trip after the call, not two. This process's own
        # members get the message as soon as the script is written, not once it answered;
        # the owners count in the answer is checked afterwards.
        # A process without members of the group (one that only publishes) has nothing to
        # deliver early: it skips the wait for the write.
        local = group in self.local_groups and self._delivers_early()
        early = _Early(group, self.decode(data)) if local else None
        deliver = None if early is None else functools.partial(self._deliver_early, early)
        reply = await self._group_script(
            "group_send",
            self._group_keys(group),
            self._group_expiry_ms,
            self._inbox_limit,
            self._expiry_ms,
            self._wake_command,
            self.prefix,
            self.client_token,
            group,
            data,
            "1" if self._hand_over else "0",
            then=deliver,
        )
        own, full, *named = reply
        if early is not None:
            self._check_early(early, int(own or 0))
        elif own:
            # Only now: the other processes' copies are stored and they start their fan-out
            # while this one does its own.
            self._deliver_group(group, int(own), self.decode(data))
        if full:
            self.stats.dropped_full += int(full)
            logger.debug("group_send to %r skipped %d full inbox(es)", group, int(full))
        if named:
            await self._fan_out(group, [item for name in named for item in (name, b"1")], data)

    async def _group_script(
        self, name: str, keys: list[str], *args: Any, then: Callable[[], None] | None = None
    ) -> Any:
        """Run a script that reads a group's owners, unless Redis may have lost some of them.

        The check is part of the script (one GET, no extra round trip). A missing
        marker means either a prefix nobody used yet or a Redis that lost its data:
        a layer that saw the marker before knows it is the second, and opens the
        grace window in which the processes re-register their members; one that
        never did takes it for the first. ``then()`` is called once the script is
        written (see :meth:`_after_write`).
        """
        keys = [*keys, *self._ready_keys]
        command = _script_call(name, keys, *args)
        if not self._ready_seen and self._ready_keys:
            # Marked before the script, not after it found the marker missing: run again
            # then, the first of concurrent group_sends went behind a later one that found
            # the marker made meanwhile (by the reader's connect), swapping their copies.
            await self._script("ready_mark", self._ready_keys, 0)
        reply = await (self._execute(*command) if then is None else self._after_write(command, then))
        if not isinstance(reply, int):
            self._ready_seen = True
            return reply
        if reply < 0:
            reply = await self._script("ready_mark", self._ready_keys, _REGISTER_GRACE_MS)
        self._refusing_until = time.monotonic() + reply / 1000
        raise BackendUnavailable(
            f"Redis lost its data at {self.where} (a restart without persistence?); "
            f"processes are re-registering their group members, retry in {reply / 1000:.1f} s"
        )

    def _delivers_early(self) -> bool:
        """Whether a group_send may deliver to this process's members before Redis answers.

        Not while Redis may refuse it for having lost its data (the reader is
        reconnecting, or found the ready marker missing, or this layer never saw
        it): a refused group_send must reach nobody, so it waits for the answer then.
        """
        return self._ready_seen and self.connection.up is True and time.monotonic() >= self._refusing_until

    def _deliver_early(self, early: _Early) -> None:
        """Deliver this process's group message to the local members it records."""
        pending = self._resyncing.get(early.group)
        if pending is not None:
            # Behind the messages waiting for the group's members to be read back.
            pending.append((early.message, _NOBODY))
            return
        early.members = self.local_groups.members(early.group)
        self.deliver_many(early.members, early.message)

    def _check_early(self, early: _Early, count: int) -> None:
        """Redis answered: ``count`` of the group's members are this process's.

        If that is not how many the message went to, the members are read back
        from Redis and those it missed get it (see :meth:`_deliver_group`). One
        the local record held and Redis did not (discarded by another process a
        moment earlier, or a flush) cannot be taken back: it got the message.
        """
        if early.members is None or len(early.members) == count:
            return
        self._resync(early.group, (early.message, frozenset(early.members)))

    async def _fan_out(self, group: str, reply: list[bytes], data: bytes) -> None:
        """Deliver ``data`` to the owners of ``group`` listed in ``reply`` (the owners hash)."""
        by_process: dict[str, bytes] = {}  # token -> how many of its channels are members
        named: list[str] = []
        for i in range(0, len(reply), 2):
            owner = reply[i].decode()
            if owner.startswith("!"):
                by_process[owner[1:]] = reply[i + 1]
            else:
                named.append(owner)
        own = by_process.pop(self.client_token, None)
        if not by_process and not named:
            if own is not None:
                self._deliver_group(group, int(own), self.decode(data))
            return
        # All pushes go out in one pipelined write: one entry per process, one per named member.
        head = b"\n" + group.encode() + b"\x00"
        futs = [self._queue_push(token, _GROUP + count + head + data) for token, count in by_process.items()]
        futs += [self._queue_now(*self._push_named_call(name, data)) for name in named]
        try:
            if own is not None:
                await self._sent(futs)
        finally:
            # Local members get the message once the pushes to the others are written, not
            # answered: delivering first would queue every local socket write ahead of the
            # pipeline's write, so the other processes would start their fan-out only after
            # this one finished its own. A write that failed still delivers (as a failed
            # reply does): the message is stored (history) or the owners were read.
            if own is not None:
                self._deliver_group(group, int(own), self.decode(data))
        results = await asyncio.gather(*(self._reply(fut) for fut in futs), return_exceptions=True)
        wakes = []
        first_error: BaseException | None = None
        for index, result in enumerate(results):
            if isinstance(result, BaseException):
                first_error = first_error or result
                continue
            if index < len(by_process):
                full = result is False
            else:
                length, waiters = int(result[0]), list(result[1])
                full = length < 0
                if not full and waiters:
                    wakes.append(self._wake_waiters(named[index - len(by_process)], waiters))
            if full:
                self.stats.dropped_full += 1
                logger.debug("group_send to %r skipped a full channel or inbox", group)
        if wakes:
            await asyncio.gather(*wakes)
        if first_error is not None:
            raise first_error

    # ------------------------------------------------------------- history

    async def _group_send_history(
        self, group: str, message: Message, policy: HistoryPolicy
    ) -> StreamPosition:
        # The script that assigns the offset also returns the owners, which a plain
        # group_send reads with a script of its own: storing costs no extra round trip.
        # The fan-out copy is encoded here, once the offset is known, rather than
        # patched into the stored bytes.
        position, owners = await self._store_history(group, self.encode(message), policy)
        # Not self.encode(): the limit applies to what the caller sent, which is already
        # stored; the position's few bytes must not make its delivery fail.
        data = self.serializer.dumps({**message, POSITION_KEY: position.as_dict()})
        await self._fan_out(group, owners, data)
        return position

    async def _history_append(self, group: str, data: bytes, policy: HistoryPolicy) -> StreamPosition:
        position, _ = await self._store_history(group, data, policy)
        return position

    async def _store_history(
        self, group: str, data: bytes, policy: HistoryPolicy
    ) -> tuple[StreamPosition, list[bytes]]:
        """Append ``data`` to the group's history; return its position and the group's owners."""
        offset, epoch, owners = await self._group_script(
            "group_send_history",
            [*self._group_keys(group), *self._history_keys(group)],
            self._group_expiry_ms,
            policy.size,
            _ms(policy.ttl),
            new_epoch(),
            data,
        )
        return StreamPosition(int(offset), epoch.decode()), owners

    async def _history_read(self, group: str, after: int, limit: int, policy: HistoryPolicy) -> HistorySlice:
        newest, epoch, complete, first, entries = await self._script(
            "history_read", self._history_keys(group), after, limit, _ms(policy.ttl), new_epoch()
        )
        return HistorySlice(
            [(int(first) + i, entry[_DEADLINE_DIGITS:]) for i, entry in enumerate(entries)],
            int(newest),
            epoch.decode(),
            complete=bool(complete),
        )

    # ------------------------------------------------------------- presence

    async def _in_order(self, *calls: Coroutine[Any, Any, Any]) -> list[Any]:
        """Run Redis calls in this order, in one round trip where the order survives it.

        On one server a pipeline runs its commands in order. A cluster writes to its
        nodes in parallel, so keys in different slots are written one call after the other.
        """
        if self._cluster_client is None:
            return list(await asyncio.gather(*calls))
        results = []
        for index, call in enumerate(calls):
            try:
                results.append(await call)
            except BaseException:
                for later in calls[index + 1 :]:
                    later.close()  # never started: no "never awaited" warning
                raise
        return results

    async def _presence_put(self, group: str, channel: str, info: bytes) -> QueuedWrite | None:
        token = self.client_token
        # The owner (and the group in its list) first: an entry is never stored where
        # a reaper could not find it.
        own = _script_call(
            "presence_own", self._presence_owner_keys(token), token, self._presence_timeout_ms, group
        )
        store = ("HSET", self._presence_key(group), channel, token.encode() + b"\n" + info)
        if self._cluster_client is None:
            # One server runs a pipeline in order: queued now, under the layer's presence
            # lock, the change keeps its place among this process's others, and the
            # caller waits for Redis after the lock is released (no join waits for another's).
            return QueuedWrite(self._replies(self._queue_now(*own), self._queue_now(*store)))
        await self._in_order(self._execute(*own), self._execute(*store))
        return None

    def _presence_take_back(self, group: str, channel: str) -> None:
        # Queued commands go out whatever happens to their caller once the writer took
        # them; queued behind them, the removal runs after them wherever they went.
        commands = [_script_call("presence_take", [self._presence_key(group)], channel)]
        if not self._presence.channels(group):
            token = self.client_token
            commands.append(_script_call("presence_disown", self._presence_owner_keys(token), token, group))
        for command in commands:
            self._queue_now(*command).add_done_callback(self._log_take_back_failure)

    def _log_take_back_failure(self, fut: asyncio.Future[Any]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None and not isinstance(exc, ChannelLayerClosed):
            # Left for the reapers once this process stops beating.
            logger.warning("could not take back a presence entry: %s", exc)

    async def _presence_remove(self, group: str, channel: str) -> bytes | QueuedWrite | None:
        take = _script_call("presence_take", [self._presence_key(group)], channel)
        mine = self._presence.channels(group)
        disown: tuple[Any, ...] = ()
        if channel in mine and len(mine) == 1:
            # This process's last entry in the group: drop the group from its list
            # (and its owner record with its last group), so nothing is left behind.
            token = self.client_token
            disown = _script_call("presence_disown", self._presence_owner_keys(token), token, group)
        ours = self._presence.members(group).get(channel)
        if self._cluster_client is None and ours is not None:
            # Our own entry: its info is known here, so the removal can be queued like a put.
            replies = [self._queue_now(*take)] + ([self._queue_now(*disown)] if disown else [])
            return QueuedWrite(self._replies(*replies), ours)
        if disown:
            entry, _ = await self._in_order(self._execute(*take), self._execute(*disown))
        else:
            entry = await self._execute(*take)
        return None if entry is None else bytes(entry).partition(b"\n")[2]

    async def _replies(self, *futures: asyncio.Future[Any]) -> None:
        """Wait for the replies of queued commands; the first failure is raised.

        A change whose reply failed may or may not have been applied, as with an awaited
        command: an entry Redis stored but whose reply was lost stays until this process
        stops beating and a reaper removes it.
        """
        await wait_all([self._reply(fut) for fut in futures])

    async def _presence_read(self, group: str) -> dict[str, bytes]:
        entries, (now, owners) = await asyncio.gather(
            self._execute("HGETALL", self._presence_key(group)),
            self._script("presence_owners", [self._presence_live_key]),
        )
        # This process is alive whatever its record says (a heartbeat may be due).
        alive = {owners[i] for i in range(0, len(owners), 2) if int(owners[i + 1]) > int(now)}
        alive.add(self.client_token.encode())
        present = {}
        for channel, entry in entries.items():
            owner, _, info = entry.partition(b"\n")
            if owner in alive:
                present[channel.decode()] = info
        return present

    async def _presence_beat(self) -> bool:
        beat = await self._script(
            "presence_beat", [self._presence_live_key], self.client_token, self._presence_timeout_ms
        )
        return bool(beat)

    async def _presence_reap(self) -> list[tuple[str, str, bytes]]:
        live = self._presence_live_key
        now, owners = await self._script("presence_owners", [live])
        mine = self.client_token.encode()
        dead = [
            owners[i].decode()
            for i in range(0, len(owners), 2)
            if int(owners[i + 1]) <= int(now) and owners[i] != mine
        ][:_REAP_BATCH]
        if not dead:
            return []
        keys = [live, *(self._presence_owner_keys(token)[1] for token in dead)]
        claimed = await self._script("presence_claim", keys, *dead)
        # Each claimed owner's groups, in their own slots: one pipelined write for all.
        work = [
            (group.decode(), token)
            for i in range(0, len(claimed), 2)
            for token, group in ((claimed[i], group) for group in claimed[i + 1])
        ]
        results = await asyncio.gather(
            *(
                self._script("presence_reap", [self._presence_key(group)], token + b"\n")
                for group, token in work
            )
        )
        return [
            (group, removed[i].decode(), removed[i + 1])
            for (group, _), removed in zip(work, results, strict=True)
            for i in range(0, len(removed), 2)
        ]

    # ------------------------------------------------------------ receiving

    async def _read_inbox(self) -> None:
        """The one reader of this instance's inbox; reconnects with backoff until closed.

        Supervised with ``keep_running``: an unexpected error restarts it rather
        than leaving the process connected but deaf.
        """
        backoff = self.backoff()
        recoverable: tuple[type[BaseException], ...] = (*self._redis_errors, ChannelLayerError)
        # A reader that keeps failing warns once per outage or per kind of refusal,
        # not once per attempt (a connection error's text changes between attempts).
        last_kind: str | None = None
        while not self._closed:
            try:
                await self._reader_session()
            except ChannelLayerClosed:
                return
            except recoverable as exc:
                if self._closed:
                    return
                self.report_connection(False)
                if isinstance(exc, self._login_errors):
                    self._lost(exc)  # logged at ERROR once the layer was up (login_refused)
                elif isinstance(exc, self._refusal):  # not through the writer (_refused there)
                    exc = self._refused("BLMOVE or PING (the inbox reader's)", exc)
                reason = self.redact(str(exc))
                lost = isinstance(exc, (*self._conn_errors, BackendUnavailable))
                kind = "lost" if lost else reason
                if self._reader_healthy:
                    backoff.reset()
                if self._reader_healthy or kind != last_kind:
                    if _ACL_REFUSAL.search(reason):
                        # Deaf until someone grants it: more than a passing outage.
                        logger.error("%s; the inbox reader retries until it may", reason)
                    else:
                        what = (
                            "lost Redis at %s (%s); reconnecting"
                            if lost
                            else "reading the inbox at %s failed (%s); retrying"
                        )
                        logger.warning(what, self.where, reason)
                else:
                    logger.debug("Redis inbox at %s still unreadable: %s", self.where, reason)
                last_kind = kind
            finally:
                self._reader_healthy = False
            await backoff.sleep()

    def _reader_client(self) -> Redis:
        """A client of its own for the reader: long blocking reads, no silent retries."""
        from redis.asyncio import ConnectionPool, Redis
        from redis.asyncio.connection import parse_url
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        reader_options: dict[str, Any] = {
            "socket_timeout": _BLOCK_SECONDS + self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),
            "max_connections": 2,
            # RESP2: redis-py 8 speaks RESP3 by default, where every pub/sub message is a
            # push that its parser hands to a logging hook (which formats the whole
            # message for a DEBUG line) before returning it. The reader needs nothing
            # RESP3 adds.
            "protocol": 2,
        }
        if self.sentinels:
            return self._sentinel_master(**reader_options)
        kwargs: dict[str, Any] = {**parse_url(self.url), **self._tls_options()}
        if self._cluster_client is not None:
            # The node that owns the inbox's slot: it serves the BLMOVE and the SSUBSCRIBE.
            node = self._cluster_client.get_node_from_key(self._inbox_key(self.client_token))
            if node is None:
                raise self.unavailable("no cluster node serves this layer's inbox")
            kwargs.update(host=node.host, port=node.port, db=0)
        # The reader's options win over the same ones in the url (protocol=3, say).
        return Redis.from_pool(ConnectionPool(**{**kwargs, **reader_options}))

    async def _reader_session(self) -> None:
        """Connect, restore state after a reconnect, then read until the connection fails."""
        client = self._reader_redis = self._reader_client()
        try:
            seconds, micros = await self._execute("TIME")
            self._clock_offset_ms = int(seconds) * 1000 + int(micros) / 1000 - time.time() * 1000
            if self.use_pubsub:
                conn: AbstractConnection = await self._opening(
                    client.connection_pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
                )
                await self._read_pubsub(conn)
            else:
                # The reader's connection opened here, not inside its first BLMOVE: so that
                # close() lets the open end (see _opening).
                await self._opening(client.ping())
                await self._connected()
                # Only a session that read its inbox once counts as healthy (resets the
                # backoff): one that connects and then fails every read must not spin.
                await self._drain()
                self._reader_healthy = True
                inbox = self._inbox_key(self.client_token)
                while not self._closed:
                    # Moving the head to the head leaves the list as it is: a blocking wait
                    # for a non-empty inbox that takes nothing (the take is _drain's).
                    if await client.blmove(inbox, inbox, _BLOCK_SECONDS, "LEFT", "LEFT") is not None:
                        await self._drain()
        finally:
            self._reader_redis = None
            await client.aclose()

    async def _read_pubsub(self, conn: AbstractConnection) -> None:
        """Subscribe on ``conn``, then deliver what the subscription carries; drain on a wake-up.

        The first drain takes what was stored before the subscription; from then on
        every push reaches the subscription, in order, until the connection ends
        (and the session with it). Entries both popped and published are delivered
        once (``_delivered_id``).

        The connection is handed to a :class:`_Subscription` protocol once redis-py
        has opened it (authenticated, database selected): each message is parsed
        and delivered from the socket's own callback. Through redis-py's stream and
        parser, the bytes of a message woke the reader task one loop iteration
        later, and its ``read_response`` layers took about a tenth of a lone send's
        client CPU (see docs/performance/redis.md). Published messages wait while the
        inbox is drained (the subscription is held), so an entry popped by the
        drain is never skipped as older than one published after it.
        """
        stream = conn._writer  # redis-py keeps its stream private; present while connected
        if stream is None:
            raise self.unavailable("the subscription has no connection")
        # A socket's transport (typeshed types a StreamWriter's as write-only).
        transport = cast(asyncio.Transport, stream.transport)
        sub = _Subscription(transport, self._on_published)
        transport.set_protocol(sub)
        command = "SSUBSCRIBE" if self.cluster and self.sharded_pubsub else "SUBSCRIBE"
        transport.write(self._pack([(command, self._wake_channel(self.client_token))]))
        # Wait for the confirmation: only then is a push after our first drain sure to wake us.
        try:
            await bounded(
                sub.held(), self.timeout, lambda: self.unavailable("the subscription was not confirmed")
            )
        except (ConnectionError, _Refused, ValueError) as exc:
            raise self._subscription_ended(exc) from exc
        await self._connected()
        self._ack_every = max(1, min(_BATCH, self._inbox_limit // 4))
        self._unacked = 0
        self._subscription = transport
        try:
            while not self._closed:
                await self._drain()
                self._reader_healthy = True
                self._pinged = False
                self._watch(transport, _ACK_DELAY if self._unacked else _BLOCK_SECONDS)
                # Until a wake-up (entries were stored) or the pong of the timer's PING
                # (quiet for _BLOCK_SECONDS: the safety-net re-check) holds it again.
                try:
                    await sub.held(release=True)
                except (ConnectionError, _Refused, ValueError) as exc:
                    raise self._subscription_ended(exc) from exc
        finally:
            self._subscription = None
            if self._quiet is not None:
                self._quiet.cancel()
                self._quiet = None

    def _subscription_ended(self, exc: BaseException) -> ChannelLayerError:
        """What ends a reader session whose subscription ended with ``exc`` (see _Subscription)."""
        if isinstance(exc, _Refused):
            return self._refused("SUBSCRIBE", exc)
        return self.unavailable(exc)

    def _on_published(self, payload: bytes) -> None:
        """Handle the entries one published message carried (called by :class:`_Subscription`)."""
        transport = self._subscription
        if transport is None or self._closed:
            return  # the session is ending; what this carried stays in the inbox for the next
        idle = not self._unacked
        self._unacked += self._handle_frames(payload)
        self._arrivals += 1
        if self._unacked >= self._ack_every:
            self._ack_soon()
        elif idle:
            self._watch(transport, _ACK_DELAY)

    def _watch(self, transport: asyncio.WriteTransport, delay: float) -> None:
        """(Re)start the pub/sub reader's timer: :meth:`_quiet_for` in ``delay`` seconds."""
        if self._quiet is not None:
            self._quiet.cancel()
        loop = running_loop()
        self._quiet = loop.call_later(delay, self._quiet_for, transport, self._arrivals)

    def _quiet_for(self, transport: asyncio.WriteTransport, arrivals: int) -> None:
        """The pub/sub reader's timer, which stands for a time limit on each of its reads.

        If messages came since it was set, it starts again. Quiet for
        ``_ACK_DELAY`` after deliveries: their removal from the inbox is queued.
        Quiet for ``_BLOCK_SECONDS``: a PING on the subscription, whose pong makes
        the reader re-check the inbox (the safety net against a silently dead
        connection); if the previous PING got no pong by then, the connection is
        cut, and the next session subscribes and drains.
        """
        self._quiet = None
        if self._closed or transport.is_closing():
            return
        if self._arrivals != arrivals:
            self._watch(transport, _ACK_DELAY if self._unacked else _BLOCK_SECONDS)
            return
        if self._unacked:
            self._ack_soon()
        elif self._pinged:
            logger.debug("no pong on the Redis subscription for %s s: reconnecting", _BLOCK_SECONDS)
            transport.abort()
            return
        else:
            self._pinged = True
            transport.write(b"*1\r\n$4\r\nPING\r\n")  # nothing else writes there
        self._watch(transport, _BLOCK_SECONDS)

    def _ack_soon(self) -> None:
        """Queue the removal of the entries delivered from pub/sub from the inbox (one script call).

        The reader does not wait for it. An entry is removed only if its id is at
        or below the newest delivered, so a removal that fails leaves its count
        for the next one (counting too many removes nothing undelivered).
        """
        count, self._unacked = self._unacked, 0
        keys = [self._inbox_key(self.client_token)]
        fut = self._queue_now(*_script_call("ack_inbox", keys, self._delivered_id, count))
        fut.add_done_callback(functools.partial(self._acked, count))

    def _acked(self, count: int, fut: asyncio.Future[Any]) -> None:
        exc = ChannelLayerClosed("cancelled") if fut.cancelled() else fut.exception()
        if exc is not None:
            self._unacked += count
            logger.debug("could not remove delivered entries from the Redis inbox: %s", exc)

    def _handle_frames(self, data: bytes) -> int:
        """Handle the entries of one pub/sub message; return how many it held."""
        entries = []
        start = 0
        while start < len(data):
            try:
                end = start + _FRAME_DIGITS + int(data[start : start + _FRAME_DIGITS], 16)
            except ValueError:
                end = len(data) + 1
            if end > len(data):
                self.stats.dropped_undecodable += 1
                logger.warning("dropped a malformed pub/sub message (%d bytes) from Redis", len(data))
                break
            entries.append(data[start + _FRAME_DIGITS : end])
            start = end
        self._handle_entries(entries)
        return len(entries)

    async def _connected(self) -> None:
        # Sends and group changes do not wait for the reader's first session, so a
        # layer may have used Redis (and Redis may have lost its data since) before
        # its reader first connected: that session restores too if the marker says so.
        wrote = self._reader_was_connected or self._ready_seen
        lost = False
        if self._ready_keys:
            # Before re-registering: if Redis lost its data, group_send waits for every
            # process to do the same, not only this one.
            grace = _REGISTER_GRACE_MS if wrote else 0
            left = int(await self._script("ready_mark", self._ready_keys, grace))
            lost = wrote and left > 0
            if left > 0:
                self._refusing_until = time.monotonic() + left / 1000
            self._ready_seen = True
        if self._reader_was_connected or lost:
            await self._restore()
        if self._reader_was_connected:
            logger.warning("reconnected to Redis at %s", self.where)
        self._reader_was_connected = True
        self.report_connection(True)

    async def _drain(self) -> None:
        """Take the inbox's entries until it is empty; each take acknowledges the one before."""
        keys = [self._inbox_key(self.client_token), self._taken_key(self.client_token)]
        while True:
            self._taken_seq += 1
            proposed = f"#{self._taken_seq}"
            reply = await self._script("take_inbox", keys, self._taken_id, proposed, _BATCH, self._expiry_ms)
            if not reply:
                return
            entries = reply[1:]
            self._handle_entries(entries)
            self._taken_id = reply[0].decode()
            # A batch handed out again (its first reply was lost) says nothing of what
            # is left: only a short new batch means the inbox is empty.
            if len(entries) < _BATCH and self._taken_id == proposed:
                return

    def _handle_entries(self, entries: list[bytes]) -> None:
        now = time.time() * 1000 + self._clock_offset_ms
        for entry in entries:
            entry_id = entry[_DEADLINE_DIGITS:_INBOX_HEAD]
            if entry_id <= self._delivered_id:
                continue  # delivered already: published, then popped too
            self._delivered_id = entry_id
            try:
                self._handle_entry(entry, now)
            except ValueError as exc:  # UnicodeDecodeError is a ValueError
                # Framing not written by this library: skip it, keep reading, count it
                # like a message that does not decode.
                self.stats.dropped_undecodable += 1
                logger.warning("dropped a malformed entry (%d bytes) of the Redis inbox: %s", len(entry), exc)

    def _handle_entry(self, entry: bytes, now: float) -> None:
        if _deadline(entry) <= now:
            self.stats.dropped_expired += 1
            return
        kind = entry[_INBOX_HEAD : _INBOX_HEAD + 1]
        body = entry[_INBOX_HEAD + 1 :]
        if kind == _WAKE:
            self._wake_named(body.decode())
            return
        if kind in (_JOINED, _LEFT):
            group, _, channel = body.decode().partition("\n")
            if self.is_local(channel):
                if kind == _JOINED:
                    self.local_groups.add(group, channel)
                else:
                    self.local_groups.discard(group, channel)
            return
        names, _, data = body.partition(b"\x00")
        # One decode of the message and of the names, then one call for all recipients.
        message = self.decode_or_drop(data, "the Redis inbox")
        if message is None:
            return
        if kind == _GROUP:
            count, _, group = names.decode().partition("\n")
            self._deliver_group(group, int(count), message)
            return
        self.deliver_many(names.decode().split("\n"), message)

    def _deliver_group(self, group: str, count: int, message: Message) -> None:
        """Fan a group message out to this process's members of ``group``.

        ``count`` is how many of them Redis held when it was sent. The local record
        normally agrees (this process made the changes, or was told of them through
        its inbox, ahead of any later group message); when it does not (a member
        expired on one side a moment earlier, a flush by another process, a lost
        notice), the members are read back from Redis and the message, with any
        that follow for the group meanwhile, goes to those.
        """
        pending = self._resyncing.get(group)
        if pending is not None:
            pending.append((message, _NOBODY))
            return
        members = self.local_groups.members(group)
        if len(members) == count:
            self.deliver_many(members, message)
            return
        self._resync(group, (message, _NOBODY))

    def _resync(self, group: str, waiting: tuple[Message, frozenset[str]]) -> None:
        """Read the members of ``group`` back from Redis, then deliver ``waiting`` (a message,
        the members that have it already) and what follows for the group meanwhile."""
        pending = self._resyncing.get(group)
        if pending is not None:
            pending.append(waiting)
            return
        self._resyncing[group] = [waiting]
        self.tasks.spawn(self._resync_group(group), "resync")

    async def _resync_group(self, group: str) -> None:
        """Make the local record of ``group`` match Redis, then deliver what waited for it."""
        try:
            members: list[str] | None
            try:
                cutoff = time.time() * 1000 + self._clock_offset_ms - self._group_expiry_ms
                key = self._group_key(group)
                raw = await self._execute("ZRANGE", key, f"({cutoff:.0f}", "+inf", "BYSCORE")
            except ChannelLayerError as exc:
                if self._closed:
                    return
                logger.warning("could not read group %r from Redis (%s); using local members", group, exc)
                members = None
            else:
                members = [name for raw_name in raw if self.is_local(name := raw_name.decode())]
                current = set(self.local_groups.members(group))
                for channel in current.difference(members):
                    self.local_groups.discard(group, channel)
                for channel in members:
                    if channel not in current:
                        self.local_groups.add(group, channel)
                logger.debug("group %r resynced: %d members, %d before", group, len(members), len(current))
            # Synchronous from here: messages that arrive meanwhile are in the list.
            recipients = members if members is not None else self.local_groups.members(group)
            for message, delivered in self._resyncing.get(group, []):
                self.deliver_many([name for name in recipients if name not in delivered], message)
        finally:
            self._resyncing.pop(group, None)

    async def _restore(self) -> None:
        """After a reconnect: re-register this process's group members, re-check named channels."""
        restores = [
            self._script("group_add", self._group_keys(group), self._group_expiry_ms, *members)
            for group in self.local_groups.groups()
            if (members := self.local_groups.members(group))
        ]
        if restores:
            await asyncio.gather(*restores)
            logger.info("re-registered %d groups in Redis at %s", len(restores), self.where)
        self._wake_all_named()

    # ------------------------------------------------------- named channels

    async def _receive_remote(self, channel: str) -> Message:
        queue = self._named.get(channel)
        if queue is None:
            queue = self._named[channel] = WaiterQueue(functools.partial(self.deliver_local, channel))
            self.tasks.keep_running(functools.partial(self._fetch_named, channel, queue), "named")
        return await queue.wait()

    def _wake_named(self, channel: str) -> None:
        queue = self._named.get(channel)
        if queue is not None:
            queue.demand.set()

    def _wake_all_named(self) -> None:
        for queue in self._named.values():
            queue.demand.set()

    async def _fetch_named(self, channel: str, queue: WaiterQueue[Message]) -> None:
        """Pop a named channel for this process's waiting receivers; one task per channel.

        Receivers never talk to Redis themselves, so cancelling one cannot lose a
        popped message: whatever this task pops goes to a receiver or is parked
        in the channel's local mailbox for the next one.
        """
        keys = [self._channel_key(channel), self._waiters_key(channel), self._named_taken_key(channel)]
        backoff = self.backoff()
        failing: ChannelLayerError | None = None
        while True:
            want = queue.pending()
            if want == 0:
                # Every reply arrived: the taken batch was delivered and can go.
                done = await asyncio.gather(
                    self._execute("ZREM", keys[1], self.client_token),
                    self._execute("DEL", keys[2]),
                    return_exceptions=True,
                )
                if not isinstance(done[1], BaseException):
                    self._named_taken.pop(channel, None)
                if not queue.pending():
                    # No await from here on: a receiver arriving now finds no queue and
                    # starts a new reader.
                    if self._named.get(channel) is queue:
                        del self._named[channel]
                    return
                continue
            queue.demand.clear()
            self._taken_seq += 1
            proposed = f"#{self._taken_seq}"
            try:
                reply = await self._script(
                    "pop_named",
                    keys,
                    want,
                    self.client_token,
                    _WAITER_TTL_MS,
                    self._named_taken.get(channel, ""),
                    proposed,
                    self._expiry_ms,
                )
            except ChannelLayerClosed:
                return
            except ChannelLayerError as exc:  # BackendUnavailable among others: retry
                # Once per run of failures (a refused pop would otherwise be silent); an ACL
                # refusal as an error: it lasts until someone grants what the pop needs.
                if failing is not None:
                    logger.debug("named receive on %r still fails (%s); retrying", channel, exc)
                elif _ACL_REFUSAL.search(str(exc)):
                    logger.error("named receive on %r: %s; retrying until it may", channel, exc)
                else:
                    logger.warning("named receive on %r waits for Redis (%s); retrying", channel, exc)
                failing = exc
                await backoff.sleep(queue.demand)
                continue
            if failing is not None:
                logger.info("named receive on %r reads from Redis again", channel)
                failing = None
            backoff.reset()
            entries = reply[1:]
            for entry in entries:
                message = self.decode_or_drop(entry[_DEADLINE_DIGITS:], f"Redis named channel {channel!r}")
                if message is not None:
                    queue.deliver(message)
            if reply:
                self._named_taken[channel] = reply[0].decode()
            # A batch handed out again (its first reply was lost) is not a short pop.
            if len(entries) < want and (not reply or reply[0].decode() == proposed):
                await wait_event(queue.demand, _NAMED_RECHECK)

    # ---------------------------------------------------------------- flush

    async def _flush(self) -> None:
        assert self._client is not None
        # The ready marker stays: a flush empties the groups on purpose, Redis lost nothing.
        kept = {key.encode() for key in self._ready_keys}
        keys = [
            key
            async for key in self._client.scan_iter(match=f"{self.prefix}:*", count=1000)
            if key not in kept
        ]
        if keys:
            await asyncio.gather(*(self._execute("UNLINK", key) for key in keys))
        self._wake_all_named()


def _sentinel_addresses(sentinels: object) -> list[tuple[str, int]]:
    """``["host:port", ...]`` (port 26379 if left out) as (host, port) pairs."""
    if sentinels is None:
        return []
    if isinstance(sentinels, str) or not isinstance(sentinels, (list, tuple)):
        raise InvalidChannelLayerConfig(f"sentinels must be a list of 'host:port' strings, got {sentinels!r}")
    addresses = []
    for item in sentinels:
        try:
            parts = urlsplit(f"//{item}") if isinstance(item, str) else None
            port = parts.port if parts is not None else None
        except ValueError:
            parts = None
        if parts is None or not parts.hostname or parts.path or parts.username is not None:
            raise InvalidChannelLayerConfig(f"each of sentinels must be 'host:port', got {item!r}")
        addresses.append((parts.hostname, port or _SENTINEL_PORT))
    return addresses
