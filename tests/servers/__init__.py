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
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi_websockets import BaseChannelLayer

__all__ = ["Backend", "ServerProcess", "ensure_apt", "free_port", "free_port_block", "port_open", "wait_for"]


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    for _ in range(200):
        base = free_port()
        if base + count >= 65535:
            continue
        try:
            socks = []
            for offset in range(count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return base
    raise RuntimeError(f"no block of {count} free ports found")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_for(
    check: Callable[[], bool], what: str, timeout: float = 30.0, proc: ServerProcess | None = None
) -> None:
    """Poll ``check`` until it is true; raise with the server's log if it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{what}: server exited with {proc.popen.returncode}\n{proc.log_tail()}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout} s" + (f"\n{proc.log_tail()}" if proc else ""))


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
