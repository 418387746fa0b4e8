"""Text frames written straight to uvicorn's transport, when that is exactly what uvicorn would write.

A group message reaches every local consumer, and most send the same text
(``send_json`` shares it, see ``consumers._encode_shared``). A server's frames
are not masked, so without extensions the bytes of a text frame depend on the
text only: websockets' own ``Frame.serialize`` runs once per text, and each
socket then costs one ``transport.write()`` instead of Starlette's
``WebSocket.send``, its exception-handling ``sender`` wrapper, uvicorn's
``send()`` and websockets' ``send_text``, ``Frame``, ``serialize`` and
``data_to_send``, which only lead to that same write.

Only where every step of that normal path is known, and only in a state in
which it would write at once:

- the ASGI ``send`` a Starlette ``WebSocket`` holds is uvicorn's websockets
  sans-I/O protocol's own ``send``, reached through nothing but Starlette's
  exception-handling ``sender`` wrappers (matched by module and qualified
  name); any other wrapper (a middleware's) means the normal path;
- the versions of uvicorn, websockets and Starlette are ones whose send path
  was read (``_REVIEWED``); another version means the normal path until
  someone reads it and adds it (``tests/e2e/test_direct_frames.py`` then
  checks that only the normal path is taken and skips its slow-reader case);
- per write: Starlette's state is CONNECTED; the handshake is complete and no
  HTTP rejection is under way; no close was sent and the client is still
  connected; the transport is not closing and not paused for writing (the
  normal path would wait); websockets' connection is OPEN, negotiated no
  extension, is not in the middle of a fragmented message, holds no bytes of
  its own to send, and does not log frames.

Anything else returns False and the caller takes the normal path, which
raises, waits or writes as it always did. The normal path does not suspend
when it writes at once, so taking this one changes no scheduling either.
"""

from __future__ import annotations

import functools
from types import FunctionType, MethodType
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

__all__ = ["direct_protocol", "write_text"]

#: (distribution, version prefix) whose send path this module mirrors, as read.
_REVIEWED = (("uvicorn", (0, 54)), ("websockets", (17,)), ("starlette", (1, 10)))
#: Starlette's exception-handling wrapper around ``send``: it passes ``websocket.send`` through.
_KNOWN_WRAPPERS = frozenset(
    (("starlette._exception_handler", "wrap_app_handling_exceptions.<locals>.wrapped_app.<locals>.sender"),)
)
#: More wrappers than this is not an app we know.
_MAX_WRAPPERS = 4
_CONNECTED = WebSocketState.CONNECTED
# websockets' OPEN state, Frame and TEXT opcode, set by _known() once the versions are known reviewed.
_OPEN: Any = object()
_Frame: Any = None
_TEXT: Any = None


def _version(distribution: str) -> tuple[int, ...] | None:
    from importlib import metadata

    try:
        text = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
    parts: list[int] = []
    for part in text.split(".")[:3]:
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


@functools.cache
def _known() -> tuple[type[Any], Any, type[Any]] | None:
    """uvicorn's protocol class, its ``send`` and websockets' server protocol class; None if not reviewed."""
    global _OPEN, _Frame, _TEXT
    for distribution, prefix in _REVIEWED:
        version = _version(distribution)
        if version is None or version[: len(prefix)] != prefix:
            return None
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
        from websockets.frames import Frame, Opcode
        from websockets.protocol import OPEN
        from websockets.server import ServerProtocol
    except ImportError:  # pragma: no cover - a reviewed uvicorn always has it
        return None
    _OPEN, _Frame, _TEXT = OPEN, Frame, Opcode.TEXT
    return WebSocketsSansIOProtocol, WebSocketsSansIOProtocol.send, ServerProtocol


def direct_protocol(websocket: object) -> Any | None:
    """The uvicorn websockets sans-I/O protocol behind ``websocket``'s ``send``, or None.

    None unless ``websocket`` is a Starlette ``WebSocket`` (not a subclass,
    which may send otherwise) whose ``send`` reaches that protocol's own
    ``send`` method through Starlette's exception-handling wrappers only, with
    reviewed versions of uvicorn, websockets and Starlette. The answer holds
    for the connection's life: the chain is fixed when the WebSocket is made.
    """
    known = _known()
    if known is None or type(websocket) is not WebSocket:
        return None
    protocol_class, protocol_send, server_class = known
    send = websocket._send
    for _ in range(_MAX_WRAPPERS + 1):
        if type(send) is MethodType:
            protocol: Any = send.__self__
            if (
                send.__func__ is protocol_send
                and type(protocol) is protocol_class
                and type(protocol.conn) is server_class
            ):
                return protocol
            return None
        if type(send) is not FunctionType or (send.__module__, send.__qualname__) not in _KNOWN_WRAPPERS:
            return None
        closure = send.__closure__
        names = send.__code__.co_freevars
        if closure is None or "send" not in names:
            return None
        send = closure[names.index("send")].cell_contents
    return None


#: The last text framed and its frame: a group message's shared text is framed once. Not ""
#: at first: that str is a singleton, so ``is`` would match every empty text with no frame.
_last_frame: tuple[str | None, bytes] = (None, b"")


def _text_frame(text: str) -> bytes | None:
    global _last_frame
    try:
        data = text.encode()  # what uvicorn sends; a lone surrogate raises there too
    except UnicodeEncodeError:
        return None
    # websockets' own serializer, as send_text's: unmasked (a server's), no extensions.
    frame: bytes = _Frame(_TEXT, data).serialize(mask=False, extensions=[])
    _last_frame = (text, frame)
    return frame


def write_text(protocol: Any, websocket: WebSocket, text: str) -> bool:
    """Write ``text`` as one text frame to ``protocol``'s transport if the normal path would write it now.

    ``protocol`` comes from :func:`direct_protocol` for ``websocket``. False
    (nothing written) whenever the normal path could do anything else than
    write these exact bytes at once: the caller sends through ``websocket``.
    """
    if websocket.application_state is not _CONNECTED:
        return False
    conn = protocol.conn
    transport = protocol.transport
    if (
        protocol.disconnected
        or protocol.close_sent
        or not protocol.handshake_complete
        or protocol.initial_response is not None
        or not protocol.writable.is_set()
        or conn._state is not _OPEN
        or conn.expect_continuation_frame
        or conn.extensions
        or conn.writes
        or conn.debug
        or transport.is_closing()
    ):
        return False
    last = _last_frame  # inline: this runs once per socket of a group message
    frame = last[1] if last[0] is text else _text_frame(text)
    if frame is None:
        return False
    transport.write(frame)
    return True
