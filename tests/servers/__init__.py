"""Real broker servers for the test suite, one module per backend.

Each module here is loaded as a pytest plugin by ``tests/conftest.py``. It
defines session-scoped fixtures that start a real server on free loopback
ports (installing it first if this machine lacks it) and a ``VARIANTS``
mapping ``{variant name: fixture name}``; each such fixture returns a
:class:`Backend`. The conformance suite runs once per variant.

A server that cannot start raises: the tests that need it error out, they are
never skipped.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi_websockets import BaseChannelLayer

__all__ = [
    "Backend",
    "PortTaken",
    "ServerProcess",
    "check_running",
    "ensure_apt",
    "exited_at_bind",
    "free_port",
    "free_port_block",
    "port_open",
    "retry_on_taken_port",
    "wait_for",
]


@dataclass
class Backend:
    """A backend under test: how to build layers that share one server."""

    name: str
    #: build(namespace, **options) -> a new, unconnected layer. Layers built with the
    #: same namespace share state like two processes of one app; different
    #: namespaces are isolated from each other.
    build: Callable[..., BaseChannelLayer]
    #: False for in-memory: two instances share nothing.
    shared_between_instances: bool = True
    #: env(namespace) -> the FASTAPI_WEBSOCKETS_* variables that configure the same layer
    #: in another process (for the multi-process end-to-end tests).
    env: Callable[[str], dict[str, str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: Lowest port handed out when the kernel's ephemeral range leaves room below it.
_LOWEST_PORT = 10_000
#: Not the shared generator: a test that seeds it would make every session pick the same ports.
_PICK = random.SystemRandom()


def _listening_ports() -> range | None:
    """Ports below the kernel's ephemeral range, or None when that range leaves too few.

    A port inside the ephemeral range can be taken by any outgoing connection
    (one of ours, a peer's, a redis-cli ping) between the moment we see it free
    and the moment the server binds it, or while a test restarts the server on
    it; connect() never picks a port below that range, so only another
    listener can take one there.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(_LOWEST_PORT, low) if low - _LOWEST_PORT >= 1_000 else None


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (below the ephemeral range if it can)."""
    return free_port_block(1)


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (below the ephemeral range if it can)."""
    ports = _listening_ports()
    for _ in range(200):
        if ports is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                base: int = sock.getsockname()[1]
        else:
            base = _PICK.randrange(ports.start, ports.stop - count + 1)
        if base + count < 65535 and all(_bindable(base + offset) for offset in range(count)):
            return base
    raise RuntimeError(f"no block of {count} free ports found")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class PortTaken(RuntimeError):
    """A server exited because a port it was given was taken between choosing and binding it."""


#: How servers say a port is taken: redis, nats and PostgreSQL, then Erlang (RabbitMQ).
_BIND_FAILURES = ("address already in use", "eaddrinuse")


def exited_at_bind(proc: ServerProcess) -> bool:
    """Whether ``proc`` has exited and its log says a port it was to listen on was taken."""
    return proc.popen.poll() is not None and any(
        failure in proc.log_tail(200).lower() for failure in _BIND_FAILURES
    )


def check_running(servers: Mapping[str, ServerProcess | None]) -> None:
    """Raise if one of ``servers`` ({what: process}) has exited, with its log.

    For a group whose members wait for each other: polling only the member
    waited for would leave the others waiting for a dead one until a timeout.
    The error is :class:`PortTaken` if it exited at bind.
    """
    for what, proc in servers.items():
        if proc is not None and proc.popen.poll() is not None:
            error = PortTaken if exited_at_bind(proc) else RuntimeError
            raise error(f"{what}: server exited with {proc.popen.returncode}\n{proc.log_tail()}")


def wait_for(
    check: Callable[[], bool], what: str, timeout: float = 30.0, proc: ServerProcess | None = None
) -> None:
    """Poll ``check`` until it is true; raise with the server's log if it never is.

    If ``proc`` exits at bind, this raises :class:`PortTaken`, so that the
    caller can start it again on other ports (:func:`retry_on_taken_port`).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_running({what: proc})
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout} s" + (f"\n{proc.log_tail()}" if proc else ""))


def retry_on_taken_port(start: Callable[[], None], move: Callable[[], None], attempts: int = 5) -> None:
    """Call ``start``; each time it raises :class:`PortTaken`, call ``move`` (pick fresh ports) and retry.

    For a server's first start only: a restart must keep its ports, as the
    clients under test know them. ``start`` must leave nothing running when it
    raises. The last attempt's :class:`PortTaken` propagates.
    """
    for attempt in range(1, attempts + 1):
        try:
            start()
            return
        except PortTaken:
            if attempt == attempts:
                raise
            move()


def ensure_apt(binary: str, package: str) -> str:
    """Return the path of ``binary``, installing the Debian ``package`` if it is missing."""
    found = shutil.which(binary) or (binary if os.path.exists(binary) else None)
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError(f"{binary} is missing and installing {package} needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env)
    found = shutil.which(binary) or (binary if os.path.exists(binary) else None)
    if not found:
        raise RuntimeError(f"installed {package} but {binary} is still missing")
    return found


class ServerProcess:
    """A server started as our own child, stopped by PID (never pkill)."""

    def __init__(self, args: list[str], workdir: Path, *, stop_signal: int = 15, **popen: Any) -> None:
        self.args = args
        self.workdir = workdir
        self.stop_signal = stop_signal
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, **popen)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's output, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and wait for it to exit."""
        if self.popen.poll() is None:
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the server (a crash) and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._log.close()
