"""Real redis-server processes: a single node, a restartable node and a 3-node cluster.

Everything binds to 127.0.0.1 on free ports, keeps its files in a private temp
dir and runs without persistence. A server that does not come up raises, so
the tests that need it error out instead of being skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastapi_websockets.backends.redis import RedisChannelLayer
from tests.servers import Backend, ServerProcess, ensure_apt, free_port, free_port_block, wait_for

VARIANTS = {
    "redis": "redis_backend",
    "redis-nopubsub": "redis_nopubsub_backend",
    "redis-cluster": "redis_cluster_backend",
}


def redis_binaries() -> tuple[str, str]:
    """Paths of redis-server and redis-cli, installing Debian's redis-server if missing."""
    server = ensure_apt("redis-server", "redis-server")
    cli = ensure_apt("redis-cli", "redis-server")
    return server, cli


def _ping(cli: str, port: int) -> bool:
    result = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), "ping"], capture_output=True, text=True, timeout=5
    )
    return result.stdout.strip() == "PONG"


class RedisNode:
    """One redis-server on a fixed loopback port; can be stopped and started again."""

    def __init__(self, workdir: Path, port: int, *, cluster_port: int | None = None) -> None:
        self.server, self.cli = redis_binaries()
        self.workdir = workdir
        self.port = port
        self.cluster_port = cluster_port
        self.proc: ServerProcess | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.server,
            "--port",
            str(self.port),
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
        self.proc = ServerProcess(args, self.workdir)
        try:
            wait_for(lambda: _ping(self.cli, self.port), f"redis-server on port {self.port}", proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def cli_call(self, *args: str) -> str:
        """Run one redis-cli command against this node and return its output."""
        result = subprocess.run(
            [self.cli, "-h", "127.0.0.1", "-p", str(self.port), *args],
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
    node.start()
    yield node
    node.stop()


@pytest.fixture
def restartable_redis(redis_tmpdir: Path) -> Iterator[RedisNode]:
    """A redis-server of its own, for tests that stop and restart it on the same port."""
    node = RedisNode(Path(tempfile.mkdtemp(dir=redis_tmpdir)), free_port())
    node.start()
    yield node
    node.stop()


class RedisCluster:
    """Three masters, no replicas, formed with ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path) -> None:
        base = free_port_block(6)
        self.nodes = [RedisNode(workdir / f"node{i}", base + i, cluster_port=base + 3 + i) for i in range(3)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
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
                lambda node=node: "cluster_state:ok" in node.cli_call("cluster", "info"),
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
            variables[f"FASTAPI_WEBSOCKETS_REDIS_{key.upper()}"] = str(value).lower()
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
