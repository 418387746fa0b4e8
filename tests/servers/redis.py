"""Real redis-server processes: a single node, a restartable node, a 3-node cluster,
a TLS-only node and a Sentinel group (one master, one replica, three sentinels).

Everything binds to 127.0.0.1 on free ports, keeps its files in a private temp
dir and runs without persistence. A server that does not come up raises, so
the tests that need it error out instead of being skipped.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from fastapi_websockets.backends.redis import RedisChannelLayer
from tests.servers import (
    Backend,
    ServerProcess,
    ensure_apt,
    exited_at_bind,
    free_port,
    free_port_block,
    retry_on_taken_port,
    wait_for,
)
from tests.servers.certs import Certificates

VARIANTS = {
    "redis": "redis_backend",
    "redis-nopubsub": "redis_nopubsub_backend",
    "redis-cluster": "redis_cluster_backend",
    "redis-tls": "redis_tls_backend",
    "redis-sentinel": "redis_sentinel_backend",
}
#: The name the sentinels know the master by.
SENTINEL_MASTER = "fwmaster"


def redis_binaries() -> tuple[str, str]:
    """Paths of redis-server and redis-cli, installing Debian's redis-server if missing."""
    server = ensure_apt("redis-server", "redis-server")
    cli = ensure_apt("redis-cli", "redis-server")
    return server, cli


def _ping(cli: str, port: int, tls: list[str] | None = None) -> bool:
    result = subprocess.run(
        [cli, *(tls or []), "-h", "127.0.0.1", "-p", str(port), "ping"],
        capture_output=True,
        text=True,
        timeout=5,
    )
    return result.stdout.strip() == "PONG"


class RedisNode:
    """One redis-server on a fixed loopback port; can be stopped and started again.

    With ``tls``, the port speaks TLS only (no plaintext port at all), with the
    session's server certificate; ``extra_args`` go to redis-server as given.
    """

    def __init__(
        self,
        workdir: Path,
        port: int,
        *,
        cluster_port: int | None = None,
        tls: Certificates | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.server, self.cli = redis_binaries()
        self.workdir = workdir
        self.port = port
        self.cluster_port = cluster_port
        self.tls = tls
        self.extra_args = extra_args or []
        self.proc: ServerProcess | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def _cli_tls(self) -> list[str]:
        return ["--tls", "--cacert", str(self.tls.ca_file)] if self.tls else []

    def _port_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            str(self.tls.cert_file),
            "--tls-key-file",
            str(self.tls.key_file),
            "--tls-ca-cert-file",
            str(self.tls.ca_file),
            "--tls-auth-clients",
            "no",
        ]

    def start(self) -> None:
        args = [
            self.server,
            *self._port_args(),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        if self.cluster_port is not None:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.workdir / "nodes.conf"),
                "--cluster-node-timeout",
                "5000",
                "--cluster-port",
                str(self.cluster_port),
            ]
        args += self.extra_args
        if self.proc is not None and self.proc.popen.poll() is not None:
            self.proc.stop()  # exited: close its log before the next one opens
        self.proc = ServerProcess(args, self.workdir)
        try:
            wait_for(
                lambda: _ping(self.cli, self.port, self._cli_tls),
                f"redis-server on port {self.port}",
                proc=self.proc,
            )
        except BaseException:
            self.stop()
            raise

    def first_start(self) -> None:
        """Start the server for the first time, on fresh ports if one it was given is taken meanwhile."""
        retry_on_taken_port(self.start, self._move)

    def _move(self) -> None:
        if self.cluster_port is None:
            self.port = free_port()
        else:
            self.port = free_port_block(2)
            self.cluster_port = self.port + 1

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def kill(self) -> None:
        """SIGKILL the server (a crash: no final write of its data) and reap it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.stop()  # already gone: only closes its log
            self.proc = None

    def cli_call(self, *args: str) -> str:
        """Run one redis-cli command against this node and return its output."""
        result = subprocess.run(
            [self.cli, *self._cli_tls, "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return result.stdout


@pytest.fixture(scope="session")
def redis_tmpdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fw-redis-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(redis_tmpdir: Path) -> Iterator[RedisNode]:
    """A single redis-server shared by the whole session."""
    node = RedisNode(redis_tmpdir / "single", free_port())
    node.first_start()
    yield node
    node.stop()


@pytest.fixture
def restartable_redis(redis_tmpdir: Path) -> Iterator[RedisNode]:
    """A redis-server of its own, for tests that stop and restart it on the same port."""
    node = RedisNode(Path(tempfile.mkdtemp(dir=redis_tmpdir)), free_port())
    node.first_start()
    yield node
    node.stop()


def _cluster_ok(node: RedisNode) -> bool:
    return "cluster_state:ok" in node.cli_call("cluster", "info")


class RedisCluster:
    """Three masters, no replicas, formed with ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path) -> None:
        bases = [free_port_block(2) for _ in range(3)]
        self.nodes = [
            RedisNode(workdir / f"node{i}", base, cluster_port=base + 1) for i, base in enumerate(bases)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.first_start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        first = self.nodes[0]
        subprocess.run(
            [first.cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=True,
        )
        for node in self.nodes:
            wait_for(
                partial(_cluster_ok, node),
                f"cluster node {node.port}",
                timeout=60,
                proc=node.proc,
            )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(redis_tmpdir: Path) -> Iterator[RedisCluster]:
    """A 3-node Redis Cluster shared by the whole session."""
    cluster = RedisCluster(redis_tmpdir / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _env_value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _backend(name: str, url: str, **fixed: Any) -> Backend:
    def build(namespace: str, **options: Any) -> RedisChannelLayer:
        return RedisChannelLayer(url=url, prefix=namespace, **{**fixed, **options})

    def env(namespace: str) -> dict[str, str]:
        variables = {
            "FASTAPI_WEBSOCKETS_BACKEND": "redis",
            "FASTAPI_WEBSOCKETS_REDIS_URL": url,
            "FASTAPI_WEBSOCKETS_REDIS_PREFIX": namespace,
        }
        for key, value in fixed.items():
            variables[f"FASTAPI_WEBSOCKETS_REDIS_{key.upper()}"] = _env_value(value)
        return variables

    return Backend(name, build, extra={"url": url}, env=env)


@pytest.fixture(scope="session")
def redis_backend(redis_server: RedisNode) -> Backend:
    return _backend("redis", redis_server.url, use_pubsub=True)


@pytest.fixture(scope="session")
def redis_nopubsub_backend(redis_server: RedisNode) -> Backend:
    return _backend("redis-nopubsub", redis_server.url, use_pubsub=False)


@pytest.fixture(scope="session")
def redis_cluster_backend(redis_cluster: RedisCluster) -> Backend:
    return _backend("redis-cluster", redis_cluster.url, cluster=True)


@pytest.fixture(scope="session")
def redis_tls_server(redis_tmpdir: Path, tls_certs: Certificates) -> Iterator[RedisNode]:
    """A redis-server that speaks TLS only, with the session's certificate for 127.0.0.1."""
    node = RedisNode(redis_tmpdir / "tls", free_port(), tls=tls_certs)
    node.first_start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def redis_tls_backend(redis_tls_server: RedisNode, tls_certs: Certificates) -> Backend:
    return _backend("redis-tls", redis_tls_server.url, tls_ca_file=str(tls_certs.ca_file))


class SentinelGroup:
    """One master, one replica and three sentinels (quorum 2) on loopback.

    The sentinels declare a master down after 1 s and may fail over again 2 s
    later, so a failover test takes seconds, not minutes.
    """

    def __init__(self, workdir: Path) -> None:
        # Without the delay (5 s by default), the replica is in sync soon after it starts.
        self.master = RedisNode(
            workdir / "master", free_port(), extra_args=["--repl-diskless-sync-delay", "0"]
        )
        self.replica = RedisNode(workdir / "replica", free_port())
        # Sentinels find each other through the master, so each can have any port and move alone.
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.workdir = workdir
        self.sentinels: list[ServerProcess] = []

    @property
    def addresses(self) -> list[str]:
        """The sentinels as the layer's ``sentinels`` option wants them."""
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def start(self) -> None:
        self.master.first_start()
        # The master may have moved to another port: the replica learns its port only now.
        self.replica.extra_args = ["--replicaof", "127.0.0.1", str(self.master.port)]
        self.replica.first_start()
        # A failover to a replica that never synced would lose everything.
        wait_for(
            lambda: "master_link_status:up" in self.replica.cli_call("info", "replication"),
            "replica in sync",
            timeout=60,
            proc=self.replica.proc,
        )
        for port in self.sentinel_ports:
            self.sentinels.append(self._start_sentinel(port))
        self._wait_for_sentinels(timeout=60)

    def _start_sentinel(self, port: int) -> ServerProcess:
        server, _ = redis_binaries()
        directory = self.workdir / f"sentinel{port}"
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"
        # Sentinel rewrites its config file as it learns the group: it must be writable.
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {self.master.port} 2\n"
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n"
            f"sentinel failover-timeout {SENTINEL_MASTER} 2000\n"
        )
        return ServerProcess([server, str(config), "--sentinel"], directory)

    def _wait_for_sentinels(self, timeout: float, moves: int = 5) -> None:
        """Wait until every sentinel knows the replica and the two others.

        Every sentinel is watched on each round, not only the one waited for: a
        sentinel that died leaves the others waiting for it forever. One that
        died at bind (its port was taken after we chose it) starts again on a
        fresh port; it had not announced itself, so the others learn only the new one.
        """
        deadline = time.monotonic() + timeout
        while True:
            for index, proc in enumerate(self.sentinels):
                if proc.popen.poll() is None:
                    continue
                if not exited_at_bind(proc) or moves == 0:
                    raise RuntimeError(
                        f"sentinel {self.sentinel_ports[index]} exited with {proc.popen.returncode}\n"
                        + self._sentinel_logs()
                    )
                proc.stop()
                moves -= 1
                self.sentinel_ports[index] = free_port()
                self.sentinels[index] = self._start_sentinel(self.sentinel_ports[index])
            if all(self._knows_group(port) for port in self.sentinel_ports):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinels not ready after {timeout} s\n" + self._sentinel_logs())
            time.sleep(0.05)

    def _sentinel_logs(self) -> str:
        return "\n".join(
            f"--- sentinel {port}:\n{proc.log_tail(20)}"
            for port, proc in zip(self.sentinel_ports, self.sentinels, strict=True)
        )

    def sentinel_call(self, port: int, *args: str) -> str:
        result = subprocess.run(
            [self.master.cli, "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout

    def _knows_group(self, port: int) -> bool:
        try:
            fields = self.sentinel_call(port, "sentinel", "master", SENTINEL_MASTER).split()
        except subprocess.CalledProcessError:  # not listening yet
            return False
        state = dict(zip(fields[::2], fields[1::2], strict=False))
        return state.get("num-slaves") == "1" and state.get("num-other-sentinels") == "2"

    def master_port(self) -> int:
        """The master's port as the first sentinel reports it now."""
        reply = self.sentinel_call(
            self.sentinel_ports[0], "sentinel", "get-master-addr-by-name", SENTINEL_MASTER
        )
        return int(reply.split()[1])

    def kill_master(self) -> RedisNode:
        """SIGKILL the current master (a crash); returns the node that was killed."""
        node = self.master if self.master_port() == self.master.port else self.replica
        assert node.proc is not None
        node.proc.popen.send_signal(signal.SIGKILL)
        node.proc.popen.wait()
        return node

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.stop()
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def sentinel_group(redis_tmpdir: Path) -> Iterator[SentinelGroup]:
    """A Sentinel group of its own, for tests that kill its master."""
    group = SentinelGroup(Path(tempfile.mkdtemp(dir=redis_tmpdir)))
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="session")
def redis_sentinel_group(redis_tmpdir: Path) -> Iterator[SentinelGroup]:
    """A Sentinel group shared by the whole session (never failed over)."""
    group = SentinelGroup(redis_tmpdir / "sentinel")
    try:
        group.start()
        yield group
    finally:
        group.stop()


def sentinel_backend(group: SentinelGroup, name: str = "redis-sentinel") -> Backend:
    """Layers that find the group's master through its sentinels."""
    return _backend(name, "redis:///0", sentinels=group.addresses, sentinel_master=SENTINEL_MASTER)


@pytest.fixture(scope="session")
def redis_sentinel_backend(redis_sentinel_group: SentinelGroup) -> Backend:
    return sentinel_backend(redis_sentinel_group)
