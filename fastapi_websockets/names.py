"""Channel and group name rules, checked once for every backend.

A name is a non-empty string of at most :data:`MAX_NAME_LENGTH` characters with
no whitespace or control characters. A channel name holding ``!`` is
*process-specific* (``"{prefix}.{process-token}!{local-id}"``, as returned by
``new_channel()``): only the layer instance that created it receives from it.
Any other channel name is a *named* channel: a shared queue that any process
may receive from.
"""

from __future__ import annotations

import re
import secrets

from fastapi_websockets.backends.options import Memo
from fastapi_websockets.exceptions import InvalidChannelName

__all__ = [
    "MAX_NAME_LENGTH",
    "is_process_specific",
    "known_channel_names",
    "new_token",
    "process_token",
    "validate_channel_name",
    "validate_group_name",
    "validate_prefix",
]

#: Longest accepted channel or group name. Broker identifiers derived from names
#: are escaped or hashed by each backend, so this bound is about sanity, not brokers.
MAX_NAME_LENGTH = 200
# isprintable() already refuses control characters and most separators; this catches
# the rest of what str.isspace() calls whitespace (a plain space is printable).
_WHITESPACE = re.compile(r"\s")


def _check(kind: str, name: object) -> str:
    if not isinstance(name, str):
        raise InvalidChannelName(f"{kind} name must be a str, got {type(name).__name__}: {name!r}")
    if not name:
        raise InvalidChannelName(f"{kind} name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidChannelName(
            f"{kind} name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}: {name[:40]!r}..."
        )
    if not name.isprintable() or _WHITESPACE.search(name):
        raise InvalidChannelName(
            f"{kind} name {name!r} contains whitespace or a control character; "
            "use letters, digits and punctuation such as '.', '-', '_', ':'"
        )
    return name


def validate_channel_name(name: object) -> str:
    """Return ``name`` if it is a valid channel name, else raise ``InvalidChannelName``."""
    # Every send() checks its channel, and an app sends to the same few names again and
    # again: a dict lookup instead of a regex search and isprintable() per message.
    # Validity depends only on the characters, so a remembered exact str is valid; a str
    # subclass (which may hash or compare as it likes) is always checked.
    if type(name) is str:
        return name if name in known_channel_names else _valid_channels(name)
    return _check_channel_name(name)


def _check_channel_name(name: object) -> str:
    checked = _check("channel", name)
    if checked.startswith("!") or checked.count("!") > 1:
        raise InvalidChannelName(
            f"channel name {checked!r} has a misplaced '!'; '!' may appear once, after a "
            "process prefix, as in names returned by new_channel()"
        )
    return checked


def validate_group_name(name: object) -> str:
    """Return ``name`` if it is a valid group name, else raise ``InvalidChannelName``."""
    # As validate_channel_name(): group_send() checks its group on every call.
    if type(name) is str:
        return _valid_groups(name)
    return _check_group_name(name)


def _check_group_name(name: object) -> str:
    checked = _check("group", name)
    if "!" in checked:
        raise InvalidChannelName(
            f"group name {checked!r} must not contain '!', which marks process-specific channel "
            "names; use another separator such as ':' or '.'"
        )
    return checked


# Bounded (cleared when full); only valid names get in, since the check raises otherwise.
_valid_channels: Memo[str, str] = Memo(_check_channel_name)
_valid_groups: Memo[str, str] = Memo(_check_group_name)
#: Exact ``str`` names found valid (a subset of the valid ones): ``type(name) is str and name
#: in known_channel_names`` proves ``name`` valid without a call, for send()'s every message.
known_channel_names = _valid_channels.known


def validate_prefix(prefix: object) -> str:
    """Validate the ``prefix`` argument of ``new_channel()``."""
    checked = _check("channel prefix", prefix)
    if "!" in checked:
        raise InvalidChannelName(
            f"channel prefix {checked!r} must not contain '!': new_channel() adds its own after "
            "the prefix; use another separator such as ':' or '.'"
        )
    return checked


def is_process_specific(channel: str) -> bool:
    """Whether ``channel`` is a process-specific name (it holds ``!``)."""
    return "!" in channel


def process_token(channel: str) -> str:
    """The owning process token of a process-specific channel name.

    ``"chat.ab12cd!x9"`` -> ``"ab12cd"``; a name with no ``.`` before the ``!``
    is its own token (``"ab!x"`` -> ``"ab"``).
    """
    head = channel.split("!", 1)[0]
    return head.rsplit(".", 1)[-1]


def new_token(nbytes: int = 8) -> str:
    """A random lowercase hex token, safe as a name part on every broker."""
    return secrets.token_hex(nbytes)
