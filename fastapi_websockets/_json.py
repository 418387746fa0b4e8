"""JSON as RFC 8259 defines it, for every text written to or read from a WebSocket.

Python's ``json`` writes ``NaN``, ``Infinity`` and ``-Infinity`` for the
non-finite floats and reads them back, but they are not JSON: a browser's
``JSON.parse`` rejects the whole frame, so its client silently misses the
message. The encoders here refuse them (``allow_nan=False``, a flag of the C
encoder, so encoding costs what it did) and :func:`not_json` turns the
encoder's bare ``ValueError`` into an :class:`InvalidMessage` that says where
the value is and what to send instead; the decoder refuses them as invalid JSON,
and refuses numbers too large for a float (``1e999``), which ``json`` reads as infinities;
:func:`client_error` says what was wrong with an integer too long for ``int()``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any, NoReturn

from fastapi_websockets.exceptions import InvalidMessage

__all__ = ["DECODER", "ENCODER", "check_json_numbers", "client_error", "encode", "not_json"]

#: What consumers send: compact, UTF-8 as it is, and no NaN or Infinity.
ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

# json's C encoder, which JSONEncoder.encode() makes anew on every call through about 90
# bytecodes of Python; None on a Python without json's C accelerator.
_MAKE_C_ENCODER: Any = json.encoder.c_make_encoder  # type: ignore[attr-defined]


def _c_encoder_settings(encoder: json.JSONEncoder) -> tuple[Any, ...]:
    """The arguments after ``markers`` with which ``encoder.encode()`` makes json's C encoder."""
    escape = json.encoder.encode_basestring_ascii if encoder.ensure_ascii else json.encoder.encode_basestring
    return (
        encoder.default,
        escape,
        encoder.indent,
        encoder.key_separator,
        encoder.item_separator,
        encoder.sort_keys,
        encoder.skipkeys,
        encoder.allow_nan,
    )


_ENCODER_SETTINGS = _c_encoder_settings(ENCODER)


def _refuse_constant(name: str) -> NoReturn:
    # Called by the C scanner for NaN, Infinity and -Infinity only: no cost for other input.
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


_INFINITIES = (math.inf, -math.inf)


def _finite_float(literal: str) -> float:
    # Called by the C scanner for each number with a fraction or an exponent (integers never
    # come here): about ten bytecodes a float, none for a frame without one. float() reads
    # 1e999 as an infinity, which a handler could neither compare usefully nor send back.
    value = float(literal)
    if value in _INFINITIES:
        shown = literal if len(literal) <= 16 else f"{literal[:12]}..."
        raise ValueError(f"the number {shown} is out of range (beyond ±1.8e308); send it as a string")
    return value


#: What consumers read: JSON, without Python's NaN and Infinity extension, with finite numbers only.
DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)

# Python's words when an integer has more digits than int() takes (sys.get_int_max_str_digits).
_INT_TOO_LONG = re.compile(r"integer string conversion: value has (\d+) digits")


def client_error(error: ValueError) -> ValueError:
    """``error``, raised decoding a client's frame, in the client's terms (the error itself if it is).

    An integer longer than Python's limit (4,300 digits unless the app changed it)
    fails inside ``int()``, whose message tells a Python programmer to call
    ``sys.set_int_max_str_digits()``: the client is told to send it as a string.
    Translated here, once a frame failed, rather than by a ``parse_int`` hook
    that would cost a Python call for every integer of every frame.
    """
    found = _INT_TOO_LONG.search(str(error))
    if found is None:
        return error
    limit = sys.get_int_max_str_digits()
    return ValueError(f"an integer of {found[1]} digits is too long (at most {limit}); send it as a string")


def _as_null(value: object) -> None:
    return None


# For envelope builders, which cannot know the consumer's encode_json: only numbers are checked
# (values of other types and keys it could not write may be supported by an override).
_NUMBER_CHECK = json.JSONEncoder(allow_nan=False, skipkeys=True, default=_as_null)
# The C encoder JSONEncoder.encode() makes on every call, with _NUMBER_CHECK's settings, made
# once: encode() spends about 100 bytecodes around it, twice what building the envelope costs.
# No circular-reference check (markers None): a dict holding itself ends in RecursionError.
_C_NUMBER_CHECK: Any = (
    None if _MAKE_C_ENCODER is None else _MAKE_C_ENCODER(None, *_c_encoder_settings(_NUMBER_CHECK))
)


def _non_finite(value: object) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _locate(content: Any) -> tuple[str, float] | None:
    """Where in ``content`` the first non-finite float is (``["a"][2]``) and that float; None if nowhere."""
    stack: list[tuple[str, Any]] = [("", content)]
    seen: set[int] = set()
    while stack:
        path, value = stack.pop()
        if _non_finite(value):
            return path or "the top level", value
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:
                continue  # a container holding itself: the encoder says so, with its own message
            seen.add(id(value))
        if isinstance(value, dict):
            children = []
            for key, item in value.items():
                if _non_finite(key):
                    return f"a key of {path or 'the top-level dict'}", key
                children.append((f"{path}[{key!r}]", item))
            stack.extend(reversed(children))
        elif isinstance(value, (list, tuple)):
            stack.extend(reversed([(f"{path}[{index}]", item) for index, item in enumerate(value)]))
    return None


def not_json(content: Any) -> InvalidMessage | None:
    """The error for ``content`` holding NaN or an infinity, naming where; None if it holds none.

    Called after an encoder refused ``content`` with ``ValueError``, which is
    then either this (a non-finite float) or another error of its own.
    """
    found = _locate(content)
    if found is None:
        return None
    where, value = found
    return InvalidMessage(
        f"cannot send {value!r} as JSON (at {where}): JSON has no NaN or Infinity, and a "
        "browser's JSON.parse rejects the whole frame; send null or a string instead"
    )


def encode(content: Any, encoder: json.JSONEncoder = ENCODER) -> str:
    """``content`` as JSON text from ``encoder`` (one made with ``allow_nan=False``).

    NaN and infinities raise :class:`InvalidMessage` saying where they are;
    the encoder's other errors are raised as they are.
    """
    try:
        if encoder is ENCODER and _MAKE_C_ENCODER is not None:
            # What ENCODER.encode() does, to the byte, without the Python around the C encoder.
            # A new markers dict each call, as encode() makes, keeps its check for a container
            # holding itself (made once, an error would leave its entries behind).
            return "".join(_MAKE_C_ENCODER({}, *_ENCODER_SETTINGS)(content, 0))
        return encoder.encode(content)
    except ValueError as exc:
        raise (not_json(content) or exc) from None


def check_json_numbers(content: Any) -> None:
    """Raise :class:`InvalidMessage` if ``content`` holds NaN or an infinity; accept anything else.

    For a body that a consumer encodes later, with an ``encode_json`` that may
    support more types than ``json``: only its floats are checked here.
    """
    try:
        if _C_NUMBER_CHECK is None:  # pragma: no cover - a Python without json's C accelerator
            _NUMBER_CHECK.encode(content)
        else:
            _C_NUMBER_CHECK(content, 0)
    except (ValueError, RecursionError):
        error = not_json(content)
        if error is not None:
            raise error from None
        # Anything else (a dict holding itself, thousands of levels) the serializer refuses.
