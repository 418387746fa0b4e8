"""A private rabbitmq-server node on free loopback ports, for the whole test session.

The node is started from ``/usr/lib/rabbitmq/bin/rabbitmq-server`` (not the
Debian wrapper, which switches user and writes to /var), with its own epmd,
cookie (``HOME``), mnesia and log directories in a temp dir, so it touches
nothing system-wide. It is stopped with SIGTERM to the wrapper, then epmd.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastapi_websockets.backends.rabbitmq import RabbitMQChannelLayer
from tests.servers import Backend, ServerProcess, ensure_apt, free_port_block, port_open, wait_for
from tests.servers.certs import Certificates

VARIANTS = {"rabbitmq": "rabbitmq_backend", "rabbitmq-tls": "rabbitmq_tls_backend"}

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


class RabbitNode:
    """One rabbitmq-server node: AMQP on ``port``, distribution on +1, epmd on +2, CLI on +3..+5.

    With ``tls``, ``port`` is an AMQPS listener (the session's certificate) and
    there is no plaintext listener at all.
    """

    def __init__(self, workdir: Path, tls: Certificates | None = None) -> None:
        ensure_apt(SERVER, "rabbitmq-server")
        self.workdir = workdir
        self.port = free_port_block(6)
        scheme, listener = (
            ("amqps", "listeners.tcp = none\nlisteners.ssl.1") if tls else ("amqp", "listeners.tcp.1")
        )
        self.url = f"{scheme}://guest:guest@127.0.0.1:{self.port}/"
        (workdir / "log").mkdir(parents=True, exist_ok=True)
        (workdir / "mnesia").mkdir(exist_ok=True)
        config = f"{listener} = 127.0.0.1:{self.port}\nloopback_users.guest = true\nlog.console = false\n"
        if tls is not None:
            config += (
                f"ssl_options.cacertfile = {tls.ca_file}\nssl_options.certfile = {tls.cert_file}\n"
                f"ssl_options.keyfile = {tls.key_file}\nssl_options.verify = verify_none\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
            )
        (workdir / "rabbitmq.conf").write_text(config)
        (workdir / "enabled_plugins").write_text("[].\n")
        (workdir / "rabbitmq-env.conf").write_text("")
        loopback = "-kernel inet_dist_use_interface {127,0,0,1}"
        self.env = dict(
            os.environ,
            HOME=str(workdir),
            RABBITMQ_NODENAME=f"rmq{self.port}@localhost",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.port + 1),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.port + 2),
            RABBITMQ_CTL_DIST_PORT_MIN=str(self.port + 3),
            RABBITMQ_CTL_DIST_PORT_MAX=str(self.port + 5),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=loopback,
            RABBITMQ_CTL_ERL_ARGS=loopback,
            RABBITMQ_MNESIA_BASE=str(workdir / "mnesia"),
            RABBITMQ_LOG_BASE=str(workdir / "log"),
            RABBITMQ_CONFIG_FILE=str(workdir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(workdir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(workdir / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(workdir / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(workdir / "rabbit.pid"),
        )
        if tls is not None:
            # These would open a plaintext listener on the AMQPS port.
            del self.env["RABBITMQ_NODE_IP_ADDRESS"], self.env["RABBITMQ_NODE_PORT"]
        self.epmd = ServerProcess(
            ["epmd", "-port", str(self.port + 2), "-address", "127.0.0.1"], workdir / "log", env=self.env
        )
        self.server: ServerProcess | None = None

    def start(self) -> None:
        """Start the node and wait until its AMQP port accepts connections."""
        self.server = ServerProcess([SERVER], self.workdir, env=self.env)
        wait_for(lambda: port_open(self.port), "rabbitmq-server", timeout=60, proc=self.server)

    def stop(self) -> None:
        """Stop the node (SIGTERM to the wrapper runs a graceful shutdown)."""
        if self.server is not None:
            self.server.stop(timeout=30)
            self.server = None
            wait_for(lambda: not port_open(self.port), "rabbitmq-server shutdown", timeout=30)

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM (a crash), then reap its wrapper."""
        if self.server is not None:
            # The wrapper is a shell; killing it would orphan beam.smp, whose PID it wrote here.
            pid = int((self.workdir / "rabbit.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            self.server.popen.wait(timeout=30)
            self.server.stop()
            self.server = None
            wait_for(lambda: not port_open(self.port), "rabbitmq-server death", timeout=30)

    def restart(self) -> None:
        """Stop and start the node again on the same ports and data directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the node and its epmd."""
        try:
            self.stop()
        finally:
            self.epmd.stop()

    def ctl(self, *args: str) -> str:
        """Run rabbitmqctl against this node and return its output."""
        result = subprocess.run(
            [CTL, "-q", "-n", self.env["RABBITMQ_NODENAME"], *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout

    def rows(self, *args: str) -> list[list[str]]:
        """rabbitmqctl list_* output as rows of tab-separated fields (header dropped)."""
        lines = [line for line in self.ctl(*args, "--no-table-headers").splitlines() if line.strip()]
        return [line.split("\t") for line in lines]


@pytest.fixture(scope="session")
def rabbitmq_node() -> Iterator[RabbitNode]:
    """A private rabbitmq-server node, started once per session."""
    with tempfile.TemporaryDirectory(prefix="fw-rabbitmq-") as tmp:
        node = RabbitNode(Path(tmp))
        try:
            node.start()
            yield node
        finally:
            node.close()


@pytest.fixture(scope="session")
def rabbitmq_backend(rabbitmq_node: RabbitNode) -> Backend:
    def build(namespace: str, **options: Any) -> RabbitMQChannelLayer:
        options.setdefault("url", rabbitmq_node.url)
        return RabbitMQChannelLayer(
            exchange_name=f"fw-{namespace}", queue_prefix=f"fw-{namespace}", **options
        )

    def env(namespace: str) -> dict[str, str]:
        return {
            "FASTAPI_WEBSOCKETS_BACKEND": "rabbitmq",
            "FASTAPI_WEBSOCKETS_RABBITMQ_URL": rabbitmq_node.url,
            "FASTAPI_WEBSOCKETS_RABBITMQ_EXCHANGE_NAME": f"fw-{namespace}",
            "FASTAPI_WEBSOCKETS_RABBITMQ_QUEUE_PREFIX": f"fw-{namespace}",
        }

    return Backend("rabbitmq", build, extra={"node": rabbitmq_node}, env=env)


@pytest.fixture(scope="session")
def rabbitmq_tls_node(tls_certs: Certificates) -> Iterator[RabbitNode]:
    """A private rabbitmq-server node with an AMQPS listener only."""
    with tempfile.TemporaryDirectory(prefix="fw-rabbitmq-tls-") as tmp:
        node = RabbitNode(Path(tmp), tls=tls_certs)
        try:
            node.start()
            yield node
        finally:
            node.close()


@pytest.fixture(scope="session")
def rabbitmq_tls_backend(rabbitmq_tls_node: RabbitNode, tls_certs: Certificates) -> Backend:
    ca = str(tls_certs.ca_file)

    def build(namespace: str, **options: Any) -> RabbitMQChannelLayer:
        options.setdefault("url", rabbitmq_tls_node.url)
        options.setdefault("tls_ca_file", ca)
        return RabbitMQChannelLayer(
            exchange_name=f"fw-{namespace}", queue_prefix=f"fw-{namespace}", **options
        )

    def env(namespace: str) -> dict[str, str]:
        return {
            "FASTAPI_WEBSOCKETS_BACKEND": "rabbitmq",
            "FASTAPI_WEBSOCKETS_RABBITMQ_URL": rabbitmq_tls_node.url,
            "FASTAPI_WEBSOCKETS_RABBITMQ_TLS_CA_FILE": ca,
            "FASTAPI_WEBSOCKETS_RABBITMQ_EXCHANGE_NAME": f"fw-{namespace}",
            "FASTAPI_WEBSOCKETS_RABBITMQ_QUEUE_PREFIX": f"fw-{namespace}",
        }

    return Backend("rabbitmq-tls", build, extra={"node": rabbitmq_tls_node}, env=env)
