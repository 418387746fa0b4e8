"""Bytes-safe message encoding shared by every backend.

msgpack is the default: it keeps ``bytes`` and ``str`` apart without base64 or
tagging user dicts, and it is faster and smaller than JSON (``bench/serializers.py``
measures it). Tuples come back as lists, except as dict keys, where they stay
tuples (a list cannot be a key); dict keys may also be ``str``, ``int``,
``float``, ``bytes``, ``bool`` or ``None``. Anything else (``datetime``, ``Decimal``, ``UUID``, sets, custom
objects) is refused with a :class:`SerializationError` that names the value's
type, so a bad payload fails at ``send()`` in the sender's traceback rather
than in some consumer later.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

from fastapi_websockets.exceptions import SerializationError
from fastapi_websockets.types import Message

__all__ = ["MsgpackSerializer", "default_serializer", "not_a_dict"]


def not_a_dict(message: object) -> SerializationError:
    """The error for a message that is not a dict, for every place that checks one."""
    return SerializationError(f"a message must be a dict, got {type(message).__name__}: {message!r:.60}")


def _refuse(value: Any) -> Any:
    if isinstance(value, int):
        # msgpack hands an int to default() only when it does not fit in 64 bits.
        raise SerializationError(
            f"cannot serialize the int {value!r:.60}: msgpack carries integers from -2**63 "
            "to 2**64 - 1; send a larger one as a str"
        )
    raise SerializationError(
        f"cannot serialize a value of type {type(value).__name__} ({value!r:.60}); "
        "messages may hold str, bytes, int, float, bool, None, lists and dicts: "
        "convert it first (for example str() or isoformat() for datetimes)"
    )


class MsgpackSerializer:
    """The default :class:`~fastapi_websockets.types.Serializer`: msgpack with bin types."""

    def __init__(self) -> None:
        # msgpack.packb() builds a Packer and its buffer on every call: a quarter of a
        # microsecond per message that a kept Packer does not pay (its output is the same,
        # and it resets itself when packing raises). A Packer must not be used by two
        # packs at once, so each thread takes one from its own list of idle Packers, and
        # a pack started inside another (a dict subclass's items()) gets a second one.
        self._idle = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        # A threading.local cannot be pickled, and idle Packers are a cache of this
        # process's threads: a pickled or copied serializer (multiprocessing's spawn,
        # deep-copied settings) carries everything else and starts without them.
        state = self.__dict__.copy()
        del state["_idle"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._idle = threading.local()

    def dumps(self, message: Message) -> bytes:
        """Encode ``message``; raise ``SerializationError`` naming any unsupported value."""
        if not isinstance(message, dict):
            raise not_a_dict(message)
        try:
            idle: list[msgpack.Packer] = self._idle.packers
        except AttributeError:
            idle = self._idle.packers = []
        packer = idle.pop() if idle else msgpack.Packer(use_bin_type=True, default=_refuse)
        try:
            data: bytes = packer.pack(message)
        except SerializationError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            if "recursion limit" in str(exc):
                raise SerializationError(
                    "cannot serialize message: it is nested too deeply (thousands of levels) or a "
                    "dict or list in it contains itself; flatten it"
                ) from exc
            raise SerializationError(f"cannot serialize message: {exc}") from exc
        finally:
            idle.append(packer)
        return data

    def loads(self, data: bytes) -> Message:
        """Decode ``data``; raise ``SerializationError`` if it is not an encoded dict."""
        try:
            value = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except TypeError:
            # A tuple dict key was written as an array, which comes back as an unhashable
            # list: decode again with such keys made tuples. Only on this failure, so the
            # usual frame pays nothing, and the message arrives instead of being dropped.
            value = _loads_with_tuple_keys(data)
        except (ValueError, msgpack.UnpackException) as exc:
            raise SerializationError(f"cannot decode message frame: {exc}") from exc
        if not isinstance(value, dict):
            raise SerializationError(f"decoded frame is a {type(value).__name__}, not a dict")
        return value


def _loads_with_tuple_keys(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, object_pairs_hook=_dict_of_pairs)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SerializationError(f"cannot decode message frame: {exc}") from exc


def _dict_of_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    return {_hashable(key): value for key, value in pairs}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(item) for item in key) if type(key) is list else key


default_serializer = MsgpackSerializer()
