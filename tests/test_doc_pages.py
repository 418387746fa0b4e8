"""Every example of the backend pages (docs/backends/*.md) runs here, against its broker's real server,
and so do those of docs/operating.md.

How a block becomes an example, and how it is read: tests/doc_examples.py. The
only change made to an example is its local broker address, pointed at the
server the test session started.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML comes with uvicorn[standard]

from fastapi_websockets import (
    BaseChannelLayer,
    NATSChannelLayer,
    PostgreSQLChannelLayer,
    RabbitMQChannelLayer,
    RedisChannelLayer,
    get_channel_layer,
    get_channel_layer_from_env,
    parse_channel_layers,
    parse_channel_layers_from_env,
)
from fastapi_websockets.config import BACKEND_ALIASES
from tests.doc_examples import (
    ROOT,
    check_round_trip,
    env_block,
    examples,
    fences,
    local_addresses_to,
    read_doc,
    run_python,
)
from tests.servers.certs import Certificates

CLASSES: dict[str, type[BaseChannelLayer]] = {
    "redis": RedisChannelLayer,
    "postgresql": PostgreSQLChannelLayer,
    "nats": NATSChannelLayer,
    "rabbitmq": RabbitMQChannelLayer,
}
PAGES = {broker: read_doc(f"docs/backends/{broker}.md") for broker in CLASSES}
#: The Python examples of each page, in page order; every Python block of a page is one of them.
PYTHON = {
    "redis": ["redis-config", "redis-sentinel", "redis-history"],
    "postgresql": ["postgresql-config", "postgresql-history"],
    "nats": ["nats-config", "nats-history"],
    "rabbitmq": ["rabbitmq-config", "rabbitmq-history"],
}
#: The texts each history example's page sends to "room:1" after the position it reads from.
MISSED = {"redis": [], "postgresql": [], "nats": ["missed"], "rabbitmq": []}


def server_address(broker: str, request: pytest.FixtureRequest) -> str:
    """The URL or DSN of the session's server of ``broker`` (started on first use)."""
    fixture, attribute = {
        "redis": ("redis_server", "url"),
        "postgresql": ("postgresql_server", "dsn"),
        "nats": ("nats_node", "url"),
        "rabbitmq": ("rabbitmq_node", "url"),
    }[broker]
    address: str = getattr(request.getfixturevalue(fixture), attribute)
    return address


async def run_against_server(broker: str, name: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    code = local_addresses_to(examples(PAGES[broker])[name], server_address(broker, request))
    return await run_python(code, f"docs/backends/{broker}.md:{name}")


@pytest.mark.parametrize("broker", CLASSES)
def test_every_python_block_is_an_example(broker: str) -> None:
    page = PAGES[broker]
    assert fences(page, "python") == len(PYTHON[broker])
    assert list(examples(page)) == PYTHON[broker]
    # Its other bash blocks are `pip install` lines (nats.md names its extra in the prose).
    assert list(examples(page, "bash")) == [f"{broker}-tls"]
    assert fences(page, "bash") == (1 if broker == "nats" else 2)


@pytest.mark.parametrize("broker", CLASSES)
async def test_configuration_example(broker: str, request: pytest.FixtureRequest) -> None:
    namespace = await run_against_server(broker, f"{broker}-config", request)
    layer = namespace.get("layer") or get_channel_layer(namespace["CHANNEL_LAYERS"])
    async with layer:
        assert isinstance(layer, CLASSES[broker])
        await check_round_trip(layer)


@pytest.mark.parametrize("broker", CLASSES)
async def test_history_example(broker: str, request: pytest.FixtureRequest) -> None:
    namespace = await run_against_server(broker, f"{broker}-history", request)
    async with namespace["layer"] as layer:
        assert isinstance(layer, CLASSES[broker])
        page = namespace["page"]
        assert page.recovered
        assert [message["text"] for message in page.messages] == MISSED[broker]


@pytest.mark.parametrize("broker", CLASSES)
async def test_tls_settings_example(broker: str, tls_certs: Certificates) -> None:
    """The page's TLS variables configure its broker with exactly the URL and CA file it shows."""
    env = env_block(examples(PAGES[broker], "bash")[f"{broker}-tls"])
    prefix = f"FASTAPI_WEBSOCKETS_{broker.upper()}_"
    settings = parse_channel_layers_from_env(env)["default"]
    assert env["FASTAPI_WEBSOCKETS_BACKEND"] == broker
    assert settings.backend == BACKEND_ALIASES[broker]
    address_key = {"postgresql": "dsn", "nats": "servers"}.get(broker, "url")
    address = env[prefix + address_key.upper()]
    assert settings.config == {
        address_key: address.split(",") if broker == "nats" else address,
        "tls_ca_file": env[prefix + "TLS_CA_FILE"],
    }
    scheme = {"redis": "rediss://", "postgresql": "postgresql://", "nats": "tls://", "rabbitmq": "amqps://"}
    assert address.startswith(scheme[broker])
    # The CA file is the reader's: with one that exists here, the layer is built as an app's
    # startup builds it (creating a layer does not connect).
    layer = get_channel_layer_from_env({**env, prefix + "TLS_CA_FILE": str(tls_certs.ca_file)})
    assert isinstance(layer, CLASSES[broker])
    await layer.close()


async def test_sentinel_example() -> None:
    """The Sentinel mapping is valid as shown; its addresses are the reader's, so it is not connected."""
    namespace = await run_python(
        examples(PAGES["redis"])["redis-sentinel"], "docs/backends/redis.md:redis-sentinel"
    )
    settings = parse_channel_layers(namespace["CHANNEL_LAYERS"])["default"]
    assert settings.backend == BACKEND_ALIASES["redis"]
    assert settings.config["sentinel_master"] == "mymaster"
    assert len(settings.config["sentinels"]) == 3
    layer = get_channel_layer(namespace["CHANNEL_LAYERS"])
    assert isinstance(layer, RedisChannelLayer)
    await layer.close()


OPERATING = read_doc("docs/operating.md")
#: docs/operating.md's example as its page frames it: a fragment of the app module of a
#: worker, where `app` is the FastAPI app. It instruments the process it runs in, so it runs
#: in one of its own; it then shows what Prometheus would scrape at /metrics.
INSTRUMENTED_APP = """
import asyncio

import httpx
from fastapi import FastAPI

app = FastAPI()
{example}

async def scrape() -> str:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        response = await client.get("/metrics/")
        response.raise_for_status()
        return response.text

print(asyncio.run(scrape()))
"""


def test_every_block_of_the_operating_page_is_an_example() -> None:
    assert fences(OPERATING, "python") == len(examples(OPERATING)) == 1
    assert fences(OPERATING, "yaml") == len(examples(OPERATING, "yaml")) == 1
    # Its one bash block is the two `pip install` lines of the extras.
    assert fences(OPERATING, "bash") == 1


def test_instrument_example_serves_the_metrics() -> None:
    script = INSTRUMENTED_APP.format(example=examples(OPERATING)["instrument"])
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert "# TYPE fastapi_websockets_open_connections gauge" in result.stdout
    assert "# TYPE fastapi_websockets_handler_duration_seconds histogram" in result.stdout


def test_alerts_example_is_a_prometheus_rules_file() -> None:
    rules_file = yaml.safe_load(examples(OPERATING, "yaml")["alerts"])
    [group] = rules_file["groups"]
    assert group["name"] == "fastapi-websockets"
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "annotations"}, rule
        assert re.fullmatch(r"[A-Z]\w+", rule["alert"])
        assert "fastapi_websockets_" in rule["expr"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s"))
        # An annotation names only labels the expression keeps: all of the series' own
        # unless its outermost aggregation keeps only those it lists (`sum by (...)`).
        kept = re.search(r"by \(([^)]*)\)", rule["expr"])
        for text in rule.get("annotations", {}).values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert kept is None or label in kept.group(1).replace(" ", "").split(","), (rule, label)


def test_install_lines_name_extras_that_exist() -> None:
    """The `pip install` blocks (README, backend and operating pages) name only declared extras."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    declared = set(re.findall(r"^([\w-]+) = ", section, flags=re.M))
    docs = [read_doc("README.md"), OPERATING, *PAGES.values()]
    blocks = [block for text in docs for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]
    # In the commands and in their comments ("# or [postgresql], [nats], ...").
    named = {
        extra
        for block in blocks
        if "pip install" in block
        for extras in re.findall(r"\[([\w,]+)\]", block)
        for extra in extras.split(",")
    }
    assert {"redis", "postgresql", "nats", "rabbitmq", "all", "metrics", "tracing"} <= named
    assert named <= declared, named - declared
