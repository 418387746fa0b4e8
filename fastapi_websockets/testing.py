"""Test helpers for your own consumers: Django Channels' ``WebsocketCommunicator``, in your event loop.

A :class:`WebsocketCommunicator` plays the client of one WebSocket and calls the
ASGI app directly, as a task of the test's own event loop: no server, no
thread, no network. The test, its fixtures and the app share one loop, so
they share layers, fixtures and clocks. :func:`lifespan` runs the app's
startup and shutdown around a block.

Failures are reported where the test can see them:

* ``receive_*`` wait at most ``timeout`` seconds and then raise a
  ``TimeoutError`` naming what was expected; if the app closed the socket
  instead, :class:`WebsocketClosed` (also a ``TimeoutError``) gives the close
  code and reason.
* An exception of the app is raised in the test, with the app's traceback,
  by the next call that reads from the app. That includes an exception a
  consumer handler raised: the consumer logs it and closes the socket with
  1011; the communicator picks the exception up from that log record (only
  for its own connection) and raises it, then reports the close.
* ``disconnect()`` delivers the client's close and waits for the app to
  return, so the consumer's ``disconnect()`` has run when it returns.
* A connection still open when :func:`lifespan` exits (or, with the pytest
  plugin, when the test ends) is cancelled and reported as an error naming
  where it was opened: it never keeps running behind the next test.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import sys
import traceback
from collections import deque
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any
from urllib.parse import unquote

from starlette.types import ASGIApp, Message

from fastapi_websockets._json import DECODER, encode
from fastapi_websockets.backends.timeouts import wait_event
from fastapi_websockets.consumers import LOGGED_ERROR

__all__ = ["ConnectionsLeftOpen", "WebsocketClosed", "WebsocketCommunicator", "lifespan"]

logger = logging.getLogger(__name__)

# Consumers report a handler's exception only by logging it (and closing with 1011).
_CONSUMER_LOGGER = "fastapi_websockets.consumers"
_CLOSE_NORMAL = 1000
_CLOSE_INTERNAL_ERROR = 1011
#: json.dumps's layout, as send_json_to() always wrote, without NaN or Infinity (not JSON).
_CLIENT_ENCODER = json.JSONEncoder(allow_nan=False)

if sys.version_info >= (3, 11):
    _TimeoutBase = TimeoutError
else:  # asyncio.TimeoutError is a class of its own before 3.11; Channels tests catch that one

    class _TimeoutBase(asyncio.TimeoutError, TimeoutError):
        pass


class CommunicatorTimeout(_TimeoutBase):
    """The app did not send what a :class:`WebsocketCommunicator` call waited for in time."""


class WebsocketClosed(CommunicatorTimeout):
    """The app closed the WebSocket while the test waited for something else.

    A ``TimeoutError``, so a test written against Django Channels (which times
    out in that case) fails or passes the same way; ``code`` and ``reason``
    say how the app closed.
    """

    def __init__(self, expected: str, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        because = f": {reason!r}" if reason else ""
        super().__init__(f"expected {expected}, but the app closed the WebSocket with code {code}{because}")


class ConnectionsLeftOpen(AssertionError):
    """WebSocket connections were still open when their test or lifespan ended.

    Their app tasks were cancelled; ``connections`` describes each one and
    where it was opened.
    """

    def __init__(self, connections: list[str]) -> None:
        self.connections = connections
        listing = "\n".join(f"  - {line}" for line in connections)
        super().__init__(
            f"{len(connections)} WebSocket connection(s) still open at the end; their app tasks were "
            "cancelled. Call `await communicator.disconnect()` (or use `async with "
            f"WebsocketCommunicator(...)`) before the test ends:\n{listing}"
        )


# The communicator whose app is running in the current task (and the tasks it started).
_serving: contextvars.ContextVar[WebsocketCommunicator | None] = contextvars.ContextVar(
    "fastapi_websockets_testing_serving", default=None
)
# Communicators whose app task is running.
_live: set[WebsocketCommunicator] = set()
# Connections cancelled by someone else (their event loop closing) or by a fixture's cleanup,
# waiting for the pytest plugin to report them.
_unreported_leftovers: list[str] = []
# The lifespan state of each app whose lifespan() block is running, by id(app).
_lifespan_states: dict[int, tuple[ASGIApp, dict[str, Any]]] = {}


class _AppErrorHandler(logging.Handler):
    """Hands an exception a consumer logged to the communicator serving that connection."""

    def emit(self, record: logging.LogRecord) -> None:
        communicator = _serving.get()
        if communicator is not None:
            # A repeated failure (one group message, many connections) is logged without its traceback.
            error = record.exc_info[1] if record.exc_info is not None else getattr(record, LOGGED_ERROR, None)
            if isinstance(error, Exception):
                communicator._app_failed(error)


_error_handler = _AppErrorHandler(logging.ERROR)


def _watch_consumer_errors(on: bool) -> None:
    consumer_logger = logging.getLogger(_CONSUMER_LOGGER)
    if on and _error_handler not in consumer_logger.handlers:
        consumer_logger.addHandler(_error_handler)
    elif not on and not _live:
        consumer_logger.removeHandler(_error_handler)


def _opened_at() -> str:
    """Where the test called into this module, as ``file:line``."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno}"
    return "an unknown place"


class WebsocketCommunicator:
    """The client side of one WebSocket to ``application``, driven by the test.

    ``path`` may hold a query string (``"/ws/lobby?name=alice"``); ``headers``
    are ``(name, value)`` byte pairs; ``subprotocols`` are offered to the app.
    ``scope`` is the ASGI scope the app will see and may be changed before
    :meth:`connect`. The names and signatures are Django Channels' own. Use it
    as ``async with WebsocketCommunicator(app, path) as ws:`` to disconnect at
    the end of the block.
    """

    def __init__(
        self,
        application: ASGIApp,
        path: str,
        headers: Iterable[tuple[bytes, bytes]] | None = None,
        subprotocols: Iterable[str] | None = None,
    ) -> None:
        raw_path, _, query = path.partition("?")
        header_list = [(bytes(name).lower(), bytes(value)) for name, value in headers or ()]
        if not any(name == b"host" for name, _ in header_list):
            header_list.insert(0, (b"host", b"testserver"))
        self.application = application
        self.path = path
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "ws",
            "server": ("testserver", 80),
            "client": ("testclient", 50000),
            "root_path": "",
            "path": unquote(raw_path),
            "raw_path": raw_path.encode(),
            "query_string": query.encode(),
            "headers": header_list,
            "subprotocols": list(subprotocols or ()),
            "extensions": {},
        }
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: deque[Message] = deque()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._opened_at = ""
        self._accepted = False
        self._app_closed = False
        self._client_closed = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._app_error: Exception | None = None
        self._error_reported = False
        self._cleanup_cancel = False
        self._finished = False

    def __repr__(self) -> str:
        return f"WebsocketCommunicator({self.path!r})"

    def _describe(self) -> str:
        return f"{self!r} opened at {self._opened_at}"

    # ------------------------------------------------------------ the ASGI side

    async def _serve(self) -> None:
        _serving.set(self)  # this task's own context, inherited by the tasks the app starts
        await self.application(self.scope, self._receive, self._send)

    async def _receive(self) -> Message:
        return await self._to_app.get()

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if self._app_closed:
            raise RuntimeError(f"the app sent {kind!r} after closing the WebSocket")
        if kind == "websocket.accept":
            if self._accepted:
                raise RuntimeError("the app accepted the WebSocket twice")
            self._accepted = True
        elif kind == "websocket.close":
            self._app_closed = True
            # A real client answers the closing handshake; the app's receive() then returns it.
            if not self._client_closed:
                self._client_closed = True
                code = message.get("code") or _CLOSE_NORMAL
                self._to_app.put_nowait(
                    {"type": "websocket.disconnect", "code": code, "reason": message.get("reason") or ""}
                )
        elif kind == "websocket.send":
            if not self._accepted:
                raise RuntimeError("the app sent a frame before accepting the WebSocket")
        else:
            raise RuntimeError(f"unexpected ASGI message from the app: {kind!r}")
        self._from_app.append(message)
        self._changed.set()

    def _app_failed(self, error: Exception) -> None:
        if self._app_error is None:
            self._app_error = error

    def _app_finished(self, task: asyncio.Task[None]) -> None:
        # The done callback, also called by readers that see the task done before it ran.
        if self._finished:
            return
        self._finished = True
        _live.discard(self)
        _watch_consumer_errors(False)
        if task.cancelled():
            if not self._cleanup_cancel:
                _unreported_leftovers.append(self._describe())
                logger.error("%s was still open when its app task was cancelled", self._describe())
        elif (error := task.exception()) is not None:
            if isinstance(error, Exception):
                self._app_failed(error)
            else:  # KeyboardInterrupt and the like belong to whoever runs the loop
                logger.error("%s: the app raised %r", self._describe(), error)
        self._changed.set()

    # ------------------------------------------------------------ reading what the app sent

    def _started(self) -> asyncio.Task[None]:
        if self._task is None:
            raise RuntimeError(f"{self!r} is not connected; call `await communicator.connect()` first")
        return self._task

    def _take_app_error(self) -> Exception | None:
        if self._app_error is None or self._error_reported:
            return None
        self._error_reported = True
        error = self._app_error
        if sys.version_info >= (3, 11):
            code = self._close_code if self._close_code is not None else _CLOSE_INTERNAL_ERROR
            error.add_note(f"raised by the app serving {self!r}; the WebSocket was closed with code {code}")
        return error

    async def _next(self, timeout: float, expected: str) -> Message | None:
        """The next message from the app, or None once the app has returned and sent everything."""
        task = self._started()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._from_app:
                message = self._from_app.popleft()
                if message["type"] == "websocket.close":
                    self._close_code = message.get("code") or _CLOSE_NORMAL
                    self._close_reason = message.get("reason") or ""
                return message
            if task.done():
                self._app_finished(task)
                if self._close_code is None:
                    # As a server does: a normal close if the app returned, 1011 if it raised.
                    failed = self._app_error is not None or task.cancelled()
                    self._close_code = _CLOSE_INTERNAL_ERROR if failed else _CLOSE_NORMAL
                    self._close_reason = "the app failed" if failed else "the app returned"
                return None
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0 or not await wait_event(self._changed, remaining):
                raise CommunicatorTimeout(
                    f"{self!r} expected {expected} within {timeout:g} s, but the app sent nothing"
                    " (the WebSocket is still open)"
                )

    def _raise_closed(self, expected: str) -> None:
        error = self._take_app_error()
        if error is not None:
            raise error
        assert self._close_code is not None
        raise WebsocketClosed(expected, self._close_code, self._close_reason)

    # ------------------------------------------------------------ the client API

    async def connect(self, timeout: float = 1) -> tuple[bool, str | int | None]:
        """Open the WebSocket; ``(True, subprotocol)`` if the app accepts, ``(False, close_code)`` if not."""
        if self._task is not None:
            raise RuntimeError(f"{self!r} is already connected; create a new communicator")
        entry = _lifespan_states.get(id(self.application))
        if entry is not None and "state" not in self.scope:
            self.scope["state"] = dict(entry[1])  # as a server does: a shallow copy per connection
        self._opened_at = _opened_at()
        self._to_app.put_nowait({"type": "websocket.connect"})
        _watch_consumer_errors(True)
        self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"app serving {self!r}")
        _live.add(self)
        self._task.add_done_callback(self._app_finished)
        message = await self._next(timeout, "the app to accept or close the WebSocket")
        if message is not None and message["type"] == "websocket.accept":
            subprotocol: str | None = message.get("subprotocol")
            return True, subprotocol
        error = self._take_app_error()
        if error is not None:
            raise error
        if message is None:
            raise RuntimeError(
                f"the app serving {self!r} returned without accepting or closing the WebSocket"
            )
        return False, self._close_code

    async def send_to(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Send one text or binary frame to the app."""
        self._started()
        if (text_data is None) == (bytes_data is None):
            raise ValueError("send_to() needs exactly one of text_data and bytes_data")
        if text_data is not None:
            if not isinstance(text_data, str):
                raise TypeError(f"text_data must be a str, got {type(text_data).__name__}")
            self._to_app.put_nowait({"type": "websocket.receive", "text": text_data})
        else:
            if not isinstance(bytes_data, bytes):
                raise TypeError(f"bytes_data must be bytes, got {type(bytes_data).__name__}")
            self._to_app.put_nowait({"type": "websocket.receive", "bytes": bytes_data})
        await asyncio.sleep(0)  # let the app pick it up, as a network write would

    async def send_json_to(self, data: Any) -> None:
        """Send ``data`` encoded as JSON in a text frame.

        NaN and infinities raise :class:`~fastapi_websockets.InvalidMessage`:
        JSON has neither (send ``send_to(text_data="NaN")`` to test how the app
        takes such text).
        """
        await self.send_to(text_data=encode(data, _CLIENT_ENCODER))

    async def receive_from(self, timeout: float = 1) -> str | bytes:
        """The next frame the app sends: ``str`` for a text frame, ``bytes`` for a binary one."""
        expected = "a frame"
        message = await self._next(timeout, expected)
        if message is None or message["type"] != "websocket.send":
            self._raise_closed(expected)
        assert message is not None
        text: str | None = message.get("text")
        if text is not None:
            return text
        data: bytes = message.get("bytes") or b""
        return data

    async def receive_json_from(self, timeout: float = 1) -> Any:
        """The next frame the app sends, a text frame decoded as JSON.

        Text a browser's ``JSON.parse`` rejects raises ``ValueError``, ``NaN``
        and ``Infinity`` included (Python's ``json.loads`` takes them), and so
        does a number too large for a float (``1e999``), as the consumers' decoder does.
        """
        frame = await self.receive_from(timeout)
        if not isinstance(frame, str):
            raise AssertionError(f"expected a JSON text frame, got a binary frame: {frame!r:.80}")
        return DECODER.decode(frame)

    async def receive_nothing(self, timeout: float = 0.1, interval: float = 0.01) -> bool:
        """Whether the app sends nothing (no frame, no close) within ``timeout`` seconds.

        What arrived is left for the next ``receive_*``. ``interval`` is accepted for
        Django Channels' signature; the wait is woken by the app, not by polling.
        """
        task = self._started()
        if not self._from_app and not task.done():
            self._changed.clear()
            await wait_event(self._changed, timeout)
        if task.done():
            self._app_finished(task)
        error = self._take_app_error()
        if error is not None:
            raise error
        return not self._from_app

    async def wait_closed(self, timeout: float = 1) -> int:
        """Wait until the app closes the WebSocket and return the close code.

        Frames the app sends before closing are skipped. If the app raised,
        its exception is raised instead (once; later calls return the code).
        """
        if self._close_code is None:
            while (message := await self._next(timeout, "the app to close the WebSocket")) is not None:
                if message["type"] == "websocket.close":
                    break
        error = self._take_app_error()
        if error is not None:
            raise error
        assert self._close_code is not None
        return self._close_code

    async def disconnect(self, code: int = _CLOSE_NORMAL, timeout: float = 1) -> None:
        """Close from the client side and wait for the app to return.

        The consumer's ``disconnect()`` has run when this returns. If the app
        does not return within ``timeout`` seconds it is cancelled and a
        ``TimeoutError`` is raised; an exception of the app not reported yet is
        raised here. Calling it again, or without a connection, does nothing.
        """
        task = self._task
        if task is None:
            return
        if not self._client_closed:
            self._client_closed = True
            self._to_app.put_nowait({"type": "websocket.disconnect", "code": code, "reason": ""})
        if not task.done():
            done, _ = await asyncio.wait((task,), timeout=timeout)
            if not done:
                await self._cancel()
                raise CommunicatorTimeout(
                    f"the app serving {self!r} did not return within {timeout:g} s after the client "
                    f"disconnected with code {code}; it was cancelled"
                )
        self._app_finished(task)
        error = self._take_app_error()
        if error is not None:
            raise error

    async def _cancel(self) -> None:
        task = self._task
        if task is not None and not task.done():
            self._cleanup_cancel = True
            task.cancel()
            await asyncio.wait((task,))
            self._app_finished(task)

    async def __aenter__(self) -> WebsocketCommunicator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.disconnect()
        else:  # the test already failed; that is the error to show
            await self._cancel()


async def cancel_left_open(application: ASGIApp | None = None) -> list[str]:
    """Cancel the connections still open (to ``application``, or all in this loop); describe them.

    For fixtures and the pytest plugin; tests disconnect their communicators.
    """
    loop = asyncio.get_running_loop()
    left = [
        communicator
        for communicator in list(_live)
        if (application is None or communicator.application is application)
        and communicator._task is not None
        and communicator._task.get_loop() is loop
    ]
    for communicator in left:
        await communicator._cancel()
    return [communicator._describe() for communicator in left]


def take_unreported_leftovers() -> list[str]:
    """Connections cancelled from outside since the last call (their loop closed), for the pytest plugin."""
    left = list(_unreported_leftovers)
    _unreported_leftovers.clear()
    return left


def abandon_running() -> list[str]:
    """Cancel every connection still running, from outside its loop; describe them (pytest plugin).

    The cancellation takes effect when the loop runs again; a closed loop has
    already cancelled its tasks.
    """
    left = [communicator for communicator in list(_live) if communicator._task is not None]
    for communicator in left:
        assert communicator._task is not None
        communicator._cleanup_cancel = True
        with contextlib.suppress(RuntimeError):  # its loop is closed
            communicator._task.cancel()
        _live.discard(communicator)
    return [communicator._describe() for communicator in left]


def report_leftovers(connections: list[str]) -> None:
    """Queue ``connections`` (from :func:`cancel_left_open`) for the pytest plugin to report."""
    _unreported_leftovers.extend(connections)


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp, *, timeout: float = 10) -> AsyncIterator[dict[str, Any]]:
    """Run ``app``'s startup before the block and its shutdown after it; yields the lifespan state.

    Connections made inside the block see the state (``request.state``) as they
    would under a server. Connections to ``app`` still open when the block ends
    are cancelled and reported with :class:`ConnectionsLeftOpen` (unless the
    block itself failed: that error is the one to read).
    """
    state: dict[str, Any] = {}
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    replies: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}

    async def receive() -> Message:
        return await to_app.get()

    async def send(message: Message) -> None:
        replies.put_nowait(message)

    async def run() -> None:
        await app(scope, receive, send)

    task = asyncio.get_running_loop().create_task(run(), name=f"lifespan of {app!r}")

    async def step(name: str) -> None:
        to_app.put_nowait({"type": f"lifespan.{name}"})
        reply = asyncio.ensure_future(replies.get())
        try:
            await asyncio.wait((reply, task), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reply.cancel()
        message = reply.result() if reply.done() and not reply.cancelled() else None
        if message is not None and message["type"] == f"lifespan.{name}.complete":
            return
        if message is not None:  # ".failed": Starlette re-raises the exception after reporting it
            await asyncio.wait((task,), timeout=timeout)
        if task.done():
            task.result()  # the app's own exception, with its traceback
            detail = message.get("message", "") if message is not None else "it returned"
            raise RuntimeError(f"the app's lifespan {name} failed: {detail}")
        task.cancel()
        await asyncio.wait((task,))
        raise CommunicatorTimeout(f"the app's lifespan {name} did not complete within {timeout:g} s")

    await step("startup")
    _lifespan_states[id(app)] = (app, state)
    body_failed = False
    try:
        yield state
    except BaseException:
        body_failed = True
        raise
    finally:
        _lifespan_states.pop(id(app), None)
        left = await cancel_left_open(app)
        await step("shutdown")
        await task
        if left and not body_failed:
            raise ConnectionsLeftOpen(left)
