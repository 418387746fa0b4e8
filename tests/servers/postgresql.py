"""A real PostgreSQL for the tests: initdb + postgres as the ``postgres`` user.

initdb and postgres refuse to run as root, so both run as ``postgres`` in a
private 0755 temp dir on a free loopback port; the server is stopped with
SIGINT ("fast" shutdown, which does not wait for clients to disconnect).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer
from tests.servers import Backend, ServerProcess, ensure_apt, free_port, wait_for
from tests.servers.certs import Certificates

VARIANTS = {"postgresql": "postgresql_backend", "postgresql-tls": "postgresql_tls_backend"}

_USER = "postgres"


def _server_binaries() -> list[str]:
    # /usr/lib/postgresql/<major>/bin/postgres, newest major last
    return sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))


def _bin_dir() -> Path:
    found = _server_binaries()
    if not found:
        # The Debian "postgresql" package pulls in the current major version
        # (and postgresql-common, which provides pg_ctlcluster).
        ensure_apt("pg_ctlcluster", "postgresql")
        found = _server_binaries()
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return Path(found[-1]).parent


class PostgresServer:
    """One PostgreSQL cluster in a private directory; can be stopped and started again."""

    def __init__(
        self,
        max_connections: int = 300,
        *,
        fsync: bool = False,
        password: str | None = None,
        tls: Certificates | None = None,
    ) -> None:
        self.bin = _bin_dir()
        self.workdir = Path(tempfile.mkdtemp(prefix="fws-pg-"))
        user = pwd.getpwnam(_USER)
        os.chmod(self.workdir, 0o755)
        os.chown(self.workdir, user.pw_uid, user.pw_gid)
        self.port = free_port()
        self.max_connections = max_connections
        #: False (tests): fsync, synchronous_commit and full_page_writes off.
        self.fsync = fsync
        self.process: ServerProcess | None = None
        #: With a password, TCP clients must give it (scram-sha-256); the Unix socket stays trusted.
        self.password = password
        auth = ["-A", "trust"]
        if password is not None:
            pwfile = self.workdir / "pwfile"
            pwfile.write_text(password + "\n")
            os.chown(pwfile, user.pw_uid, user.pw_gid)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        result = subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.workdir / "data"),
                "-U",
                "postgres",
                *auth,
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            **self._as_postgres(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        #: With TLS, TCP clients must use it (hostssl only); the Unix socket stays trusted.
        self.tls = tls
        self._tls_flags: list[str] = []
        if tls is not None:
            cert, key = self.workdir / "server.pem", self.workdir / "server.key"
            shutil.copyfile(tls.cert_file, cert)
            shutil.copyfile(tls.key_file, key)
            for path in (cert, key):
                os.chown(path, user.pw_uid, user.pw_gid)
            key.chmod(0o600)  # PostgreSQL refuses a key others can read
            (self.workdir / "data" / "pg_hba.conf").write_text(
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
            )
            self._tls_flags = ["-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}"]

    @staticmethod
    def _as_postgres() -> dict[str, Any]:
        return {"user": _USER, "group": _USER, "extra_groups": []}

    @property
    def dsn(self) -> str:
        userinfo = "postgres" if self.password is None else f"postgres:{self.password}"
        query = "?sslmode=verify-full" if self.tls is not None else ""
        return f"postgresql://{userinfo}@127.0.0.1:{self.port}/postgres{query}"

    def start(self) -> None:
        """Start the server (again) on the same port and data directory; wait until it accepts."""
        if self.process is not None and self.process.popen.poll() is None:
            return
        if self.process is not None:
            self.process.stop()  # exited on its own: close its log before the next one opens
        self.process = ServerProcess(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.workdir / "data"),
                "-p",
                str(self.port),
                "-k",
                str(self.workdir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"max_connections={self.max_connections}",
                *self._durability_flags(),
                *self._tls_flags,
            ],
            self.workdir,
            stop_signal=signal.SIGINT,
            cwd=self.workdir,
            **self._as_postgres(),
        )
        isready = str(self.bin / "pg_isready")

        def ready() -> bool:
            args = [isready, "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
            return subprocess.run(args, check=False).returncode == 0

        wait_for(ready, f"postgresql on port {self.port}", proc=self.process)

    def _durability_flags(self) -> list[str]:
        if self.fsync:
            return []
        return ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]

    def stop(self) -> None:
        """Fast shutdown (SIGINT): disconnects clients and exits."""
        if self.process is not None:
            self.process.stop()

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT): no checkpoint, so the next start runs crash recovery
        (which, among other things, empties UNLOGGED tables)."""
        if self.process is not None:
            if self.process.popen.poll() is None:
                self.process.popen.send_signal(signal.SIGQUIT)
                # Its backends must exit before it does; on a loaded machine that took more
                # than 15 s once. Only a server that never exits makes this wait long.
                self.process.popen.wait(120)
            self.process.stop()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def build_layer(dsn: str, namespace: str, **options: Any) -> PostgreSQLChannelLayer:
    """A layer whose schema is ``namespace``: same namespace, shared state."""
    return PostgreSQLChannelLayer(dsn=dsn, schema=namespace, **options)


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for the whole session."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgresql_backend(postgresql_server: PostgresServer) -> Backend:
    dsn = postgresql_server.dsn

    def build(namespace: str, **options: Any) -> PostgreSQLChannelLayer:
        return build_layer(dsn, namespace, **options)

    def env(namespace: str) -> dict[str, str]:
        return {
            "FASTAPI_WEBSOCKETS_BACKEND": "postgresql",
            "FASTAPI_WEBSOCKETS_POSTGRESQL_DSN": dsn,
            "FASTAPI_WEBSOCKETS_POSTGRESQL_SCHEMA": namespace,
        }

    return Backend("postgresql", build, env=env, extra={"dsn": dsn})


@pytest.fixture(scope="session")
def postgresql_tls_server(tls_certs: Certificates) -> Iterator[PostgresServer]:
    """A PostgreSQL whose TCP clients must use TLS, with the session's certificate."""
    server = PostgresServer(max_connections=100, tls=tls_certs)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgresql_tls_backend(postgresql_tls_server: PostgresServer, tls_certs: Certificates) -> Backend:
    dsn, ca = postgresql_tls_server.dsn, str(tls_certs.ca_file)

    def build(namespace: str, **options: Any) -> PostgreSQLChannelLayer:
        return build_layer(dsn, namespace, **{"tls_ca_file": ca, **options})

    def env(namespace: str) -> dict[str, str]:
        return {
            "FASTAPI_WEBSOCKETS_BACKEND": "postgresql",
            "FASTAPI_WEBSOCKETS_POSTGRESQL_DSN": dsn,
            "FASTAPI_WEBSOCKETS_POSTGRESQL_SCHEMA": namespace,
            "FASTAPI_WEBSOCKETS_POSTGRESQL_TLS_CA_FILE": ca,
        }

    return Backend("postgresql-tls", build, env=env, extra={"dsn": dsn, "server": postgresql_tls_server})


@pytest.fixture
def restartable_postgresql() -> Iterator[PostgresServer]:
    """A PostgreSQL of its own that a test may stop and start again."""
    server = PostgresServer(max_connections=50)
    try:
        server.start()
        yield server
    finally:
        server.destroy()
