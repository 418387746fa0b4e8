"""Every example of the README runs here, and its first commands are the ones CI runs.

How a block becomes an example, and how it is read: tests/doc_examples.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from fastapi_websockets import (
    BaseChannelLayer,
    InMemoryChannelLayer,
    PostgreSQLChannelLayer,
    RedisChannelLayer,
    close_default_layers,
    get_channel_layer_from_env,
    parse_channel_layers_from_env,
)
from fastapi_websockets.config import BACKEND_ALIASES
from tests.doc_examples import (
    ROOT,
    assignments,
    check_round_trip,
    env_block,
    examples,
    fences,
    local_addresses_to,
    run_python,
    shell_words,
)
from tests.e2e.demo import next_frame
from tests.e2e.server import serve, serve_in_subprocess
from tests.servers.postgresql import PostgresServer
from tests.servers.redis import RedisNode

README = (ROOT / "README.md").read_text()
EXAMPLES = examples(README)
SHELL_EXAMPLES = examples(README, "bash")


async def run_example(name: str) -> dict[str, Any]:
    return await run_python(EXAMPLES[name], f"README.md:{name}")


def test_every_python_block_is_an_example() -> None:
    assert fences(README, "python") == len(EXAMPLES) == 9
    # The other bash blocks: the two commands CI runs (checked below) and `pip install`.
    assert fences(README, "bash") == 4
    assert list(SHELL_EXAMPLES) == ["demo-workers", "env-aliases"]
    # The browser client, run in Chromium by tests/browser/test_readme_client.py.
    assert fences(README, "js") == len(examples(README, "js")) == 1


def test_readme_starts_with_the_two_commands_ci_runs() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["bash scripts/demo", "bash scripts/test"]
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "exec bash scripts/test"
    for script in ("scripts/demo", "scripts/test"):
        assert (ROOT / script).stat().st_mode & 0o111


async def test_config_example() -> None:
    namespace = await run_example("config")
    assert isinstance(namespace["layer"], RedisChannelLayer)
    assert isinstance(namespace["events_layer"], InMemoryChannelLayer)
    assert namespace["events_layer"].capacity == 500
    for layer in (namespace["layer"], namespace["events_layer"]):
        await layer.close()


async def test_env_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTAPI_WEBSOCKETS_INMEMORY_CAPACITY", "42")
    namespace = await run_example("env")
    assert isinstance(namespace["layer"], InMemoryChannelLayer)
    assert namespace["layer"].capacity == 42
    await namespace["layer"].close()


async def test_layer_api_example() -> None:
    namespace = await run_example("layer-api")
    layer: BaseChannelLayer = namespace["layer"]
    assert layer.closed
    assert namespace["message"] == {"type": "message", "text": "hello"}
    assert namespace["channel_name"].startswith("ws.")


async def test_consumer_example() -> None:
    await close_default_layers()
    namespace = await run_example("consumer")
    async with (
        serve(namespace["app"]) as url,
        connect(f"{url}/ws/lobby") as a,
        connect(f"{url}/ws/lobby") as b,
    ):
        await a.send(json.dumps({"text": "hi"}))
        assert json.loads(await asyncio.wait_for(a.recv(), 10)) == {"text": "hi"}
        assert json.loads(await asyncio.wait_for(b.recv(), 10)) == {"text": "hi"}
    await close_default_layers()


async def test_security_example() -> None:
    await close_default_layers()
    namespace = await run_example("security")
    async with serve(namespace["app"]) as url:
        endpoint = f"{url}/ws/account"
        for origin, session in [("https://evil.example", "s3cret"), ("https://app.example.com", "wrong")]:
            with pytest.raises(InvalidStatus) as refused:
                await connect(
                    endpoint, origin=Origin(origin), additional_headers={"Cookie": f"session={session}"}
                )
            assert refused.value.response.status_code == 403
        cookie = {"Cookie": "session=s3cret"}
        async with connect(
            endpoint, origin=Origin("https://chat.example.com"), additional_headers=cookie
        ) as ws:
            await ws.send(json.dumps({"n": 1}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"user": "ann", "echo": {"n": 1}}
            await ws.send("x" * (64 * 1024 + 1))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1009
    await close_default_layers()


async def test_raw_endpoint_example() -> None:
    namespace = await run_example("raw-endpoint")
    async with serve(namespace["app"]) as url, connect(f"{url}/ws") as ws:
        await ws.send("hello")
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"text": "hello"}
        await ws.send(b"\x00\x01")
        assert await asyncio.wait_for(ws.recv(), 10) == b"\x00\x01"
    await namespace["layer"].close()


async def test_testing_example(channel_layer: BaseChannelLayer) -> None:
    namespace = await run_example("testing")
    await namespace["test_room"](channel_layer)


async def test_demo_app_serves_page_and_chats_across_connections() -> None:
    with serve_in_subprocess("examples.chat.app:app") as url:
        http = url.replace("ws://", "http://")
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(http + "/", timeout=10).read().decode())
        assert "<title>fastapi-websockets chat</title>" in page
        # As a browser does: the page's origin in the handshake; another site's page is refused.
        page_origin = Origin(http)
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{url}/ws/lobby?name=eve", origin=Origin("https://evil.example"))
        assert refused.value.response.status_code == 403
        async with (
            connect(f"{url}/ws/lobby?name=ann", origin=page_origin) as ann,
            connect(f"{url}/ws/lobby?name=bob", origin=page_origin) as bob,
        ):
            for ws in (ann, bob):
                await next_frame(ws, "online")
            await bob.send(json.dumps({"text": "hello ann"}))
            said = await next_frame(ann, "message")
            assert (said["user"], said["text"]) == ("bob", "hello ann")
            request = urllib.request.Request(http + "/rooms/lobby/announce?text=hi", method="POST")
            await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=10).read())
            assert (await next_frame(bob, "message"))["text"] == "hello ann"
            assert (await next_frame(bob, "notice"))["text"] == "announcement: hi"


async def test_history_example() -> None:
    namespace = await run_example("history")
    assert namespace["layer"].closed
    assert namespace["page"].recovered


async def test_env_aliases_example(postgresql_server: PostgresServer) -> None:
    env = env_block(SHELL_EXAMPLES["env-aliases"])
    settings = parse_channel_layers_from_env(env)
    assert list(settings) == ["default", "events"]
    assert settings["default"].backend == BACKEND_ALIASES["inmemory"]
    assert settings["events"].backend == BACKEND_ALIASES["postgresql"]
    assert settings["events"].config == {"dsn": env["FASTAPI_WEBSOCKETS_EVENTS_POSTGRESQL_DSN"]}
    assert isinstance(get_channel_layer_from_env(env), InMemoryChannelLayer)
    # The same variables with the test's server in the DSN: the "events" alias is usable.
    local = {
        key: local_addresses_to(value, postgresql_server.dsn) if "DSN" in key else value
        for key, value in env.items()
    }
    async with get_channel_layer_from_env(local, alias="events") as events:
        assert isinstance(events, PostgreSQLChannelLayer)
        await check_round_trip(events)


async def test_demo_workers_example(redis_server: RedisNode) -> None:
    [command] = shell_words(SHELL_EXAMPLES["demo-workers"])
    env, words = assignments(command)
    assert words[:2] == ["bash", "scripts/demo"]
    # The script ends by handing its arguments to uvicorn serving the demo app; its venv
    # and pip steps are the suite's own setup, so the test runs that last line.
    [run] = [line for line in (ROOT / "scripts/demo").read_text().splitlines() if line.startswith("exec ")]
    assert "-m uvicorn examples.chat.app:app " in run
    assert run.endswith('"$@"')
    env = {
        key: local_addresses_to(value, redis_server.url) if "URL" in key else value
        for key, value in env.items()
    }
    with serve_in_subprocess("examples.chat.app:app", env, args=words[2:]) as url:
        # The operating system picks each connection's worker, and the second worker may still be
        # starting when the first accepts: connect again (keeping one socket per worker) until both
        # have served one.
        async with contextlib.AsyncExitStack() as stack:
            sockets: dict[int, ClientConnection] = {}
            for attempt in range(300):
                ws = await connect(f"{url}/ws/lobby?name=u{attempt}")
                worker = (await next_frame(ws, "hello"))["worker"]
                if worker in sockets:
                    await ws.close()
                    await asyncio.sleep(0.1)
                    continue
                sockets[worker] = await stack.enter_async_context(ws)
                if len(sockets) == 2:
                    break
            assert len(sockets) == 2, "every connection reached the same worker"
            first, second = sockets.values()
            await first.send(json.dumps({"text": "across workers"}))
            said = await next_frame(second, "message")
            assert said["text"] == "across workers"


def test_plugin_example(tmp_path: Path) -> None:
    """The conftest line enables the plugin: the testing example passes with it, not without it."""
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    (tmp_path / "test_example.py").write_text(EXAMPLES["testing"])

    def run_pytest() -> str:
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        return result.stdout + result.stderr

    assert "fixture 'channel_layer' not found" in run_pytest()
    (tmp_path / "conftest.py").write_text(EXAMPLES["plugin"])
    output = run_pytest()
    assert "1 passed" in output, output
