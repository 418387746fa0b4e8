"""The unclosed-transport report (tests/unclosed.py), run in fresh pytest processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.servers.redis import RedisNode

ROOT = Path(__file__).parent.parent

LEAKY = """
import asyncio
import gc

from fastapi_websockets.backends.redis import RedisChannelLayer

kept = []


async def test_a_layer_left_open() -> None:
    layer = RedisChannelLayer(url={url!r}, prefix="leak")
    await layer.send("x", {{"type": "x"}})
    kept.append(layer)  # never closed; freed by the next test


async def test_a_connection_of_the_test_left_open() -> None:
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    kept.append(await asyncio.open_connection(*server.sockets[0].getsockname()[:2]))
    server.close()


async def test_a_connection_of_the_test_closed_too_late() -> None:
    # Closed, but its buffer never flushed: the peer reads nothing, and the loop ends first.
    server = await asyncio.start_server(lambda reader, writer: kept.append(writer), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    writer.transport.set_write_buffer_limits(high=1 << 30)
    writer.write(b"x" * (64 << 20))
    writer.close()
    kept.append(writer)
    server.close()


def test_later() -> None:
    kept.clear()
    gc.collect()
"""


def run(tmp_path: Path, select: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.unclosed", "-k", select],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_transport_the_package_left_open_fails_the_run(tmp_path: Path, redis_server: RedisNode) -> None:
    (tmp_path / "test_leaky.py").write_text(LEAKY.format(url=redis_server.url))
    result = run(tmp_path, "layer_left_open or later")
    output = result.stdout + result.stderr
    assert "2 passed" in output, output
    assert result.returncode == 1, output
    assert "opened by the package (a bug: fails the run) in test_leaky.py::test_a_layer_left_open" in output
    assert "freed open in test_leaky.py::test_later" in output
    assert "fastapi_websockets/backends/redis.py:" in output


def test_a_transport_a_test_left_open_is_listed_only(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(LEAKY.format(url="redis://127.0.0.1:1/0"))
    result = run(tmp_path, "connection_of_the_test or later")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "opened by test code in test_leaky.py::test_a_connection_of_the_test_left_open" in output


def test_a_transport_freed_while_closing_is_listed_as_closing(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(LEAKY.format(url="redis://127.0.0.1:1/0"))
    result = run(tmp_path, "closed_too_late or later")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert (
        "opened by test code in test_leaky.py::test_a_connection_of_the_test_closed_too_late, "
        "freed while closing" in output
    ), output
