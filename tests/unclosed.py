"""Where an asyncio transport that nobody closed was opened (a pytest plugin).

asyncio warns "unclosed transport" when the garbage collector frees an open
transport, in whatever test is running at that moment (often another
backend's), and pytest only lists it among the warnings. This plugin notes,
for every transport, the test that opened it and the lines of this project
that opened it; one freed while still open is listed in a summary section
with both. If code of the package opened it, the run fails: the layer leaked
a connection, a real bug (``FW_TEST_UNCLOSED=list`` lists it without failing,
while a known one waits for its fix). A leak opened by test code alone is
listed only, and so is a transport whose close had begun but not finished when
it was freed: a socket transport still flushing its buffer, or one under a TLS
transport whose shutdown was waiting for the peer (a driver's connection
cancelled mid-handshake as a layer closes, then the test's event loop closed
before the server answered). Its owner did close it; the loop stopped first.

It wraps private asyncio classes because the public ways do not say the same:
asyncio's ResourceWarning names the test that freed the transport, is raised
inside ``__del__`` (so ``-W error`` does not fail the run), and tracemalloc's
allocation traceback costs tens of times the run's time; see "Why
tests/unclosed.py wraps private asyncio classes" in docs/testing.md.
Checked on CPython 3.10 to 3.13; tests/test_unclosed.py fails where they change.
"""

from __future__ import annotations

import asyncio.selector_events
import asyncio.sslproto
import gc
import os
import site
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import fastapi_websockets

__all__ = ["Leak", "leaks"]

_PACKAGE = Path(fastapi_websockets.__file__).parent
#: Where Python and the installed libraries (pytest and the drivers included) live.
_LIBRARIES = {Path(sys.prefix), Path(sys.base_prefix), *(Path(p) for p in site.getsitepackages())}


@dataclass(frozen=True)
class Leak:
    """A transport freed while still open."""

    kind: str
    opened_in: str
    freed_in: str
    #: "file:line in function" lines of this project, innermost first.
    where: list[str]
    #: Its close had begun (see the module's docstring): listed, never failing the run.
    closing: bool = False

    @property
    def by_package(self) -> bool:
        return any(line.startswith(f"{_PACKAGE.name}/") for line in self.where)

    @property
    def fails_the_run(self) -> bool:
        return self.by_package and not self.closing


#: Leaks seen so far in this run.
leaks: list[Leak] = []
_current = ["(outside a test)"]


def _project_lines() -> list[str]:
    """The calling lines outside Python and installed libraries, innermost first (at most 8)."""
    lines = []
    for frame in reversed(traceback.extract_stack()[:-2]):  # not this function, not the wrapper
        path = Path(frame.filename)
        if path.is_relative_to(_PACKAGE):
            lines.append(f"{_PACKAGE.name}/{path.relative_to(_PACKAGE)}:{frame.lineno} in {frame.name}")
        elif path.is_absolute() and not any(path.is_relative_to(top) for top in _LIBRARIES):
            lines.append(f"{path}:{frame.lineno} in {frame.name}")
    return lines[:8]


def _closing(transport: Any) -> bool:
    """Whether ``transport``'s close had begun: its own, or the TLS shutdown of the transport over it."""
    if getattr(transport, "_closing", False):
        return True
    protocol = getattr(transport, "_protocol", None)
    if not isinstance(protocol, asyncio.sslproto.SSLProtocol):
        return False
    state = getattr(protocol, "_state", None)  # CPython 3.11+
    if state is not None:
        return getattr(state, "name", "") in ("FLUSHING", "SHUTDOWN")
    return bool(getattr(protocol, "_in_shutdown", False))  # CPython 3.10


def _watch(cls: Any, is_open: Any) -> None:
    """Wrap ``cls``'s __init__ and __del__ to note where it was opened and report it freed open."""
    init, finalize = cls.__init__, cls.__del__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        self._fw_opened = (_current[0], _project_lines())
        init(self, *args, **kwargs)

    def __del__(self: Any, *args: Any, **kwargs: Any) -> None:
        opened = getattr(self, "_fw_opened", None)
        if opened is not None and is_open(self):
            leaks.append(Leak(type(self).__name__, opened[0], _current[0], opened[1], _closing(self)))
        finalize(self, *args, **kwargs)

    cls.__init__, cls.__del__ = __init__, __del__


def pytest_configure(config: pytest.Config) -> None:
    # The classes asyncio's own warnings come from (CPython 3.10 to 3.13).
    _watch(vars(asyncio.selector_events)["_SelectorTransport"], lambda t: t._sock is not None)
    _watch(asyncio.sslproto._SSLProtocolTransport, lambda t: not t._closed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Any:
    _current[0] = item.nodeid
    try:
        return (yield)
    finally:
        _current[0] = "(between tests)"


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    gc.collect()  # what only a cycle still holds
    failing = os.environ.get("FW_TEST_UNCLOSED") != "list"
    if failing and any(leak.fails_the_run for leak in leaks) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not leaks:
        return
    terminalreporter.section("unclosed transports", sep="=", red=True)
    for leak in leaks:
        if leak.closing:
            owner = "the package" if leak.by_package else "test code"
            state = "freed while closing (the loop stopped first; listed only)"
        else:
            owner = "the package (a bug: fails the run)" if leak.by_package else "test code"
            state = "freed open"
        where = f"opened by {owner} in {leak.opened_in}, {state} in {leak.freed_in}"
        terminalreporter.line(f"{leak.kind} {where}")
        for line in leak.where:
            terminalreporter.line(f"    {line}")
