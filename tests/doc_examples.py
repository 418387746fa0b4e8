"""The examples of the documentation, as the tests that run them read them.

A fenced block is an example when ``<!-- example: NAME -->`` sits on the line
right before its fence; its fence's language says how a test runs it (Python
is executed, a ``bash`` block of variable assignments is parsed). Examples
that talk to a broker name it on ``localhost`` or ``127.0.0.1`` with the
broker's usual port, as a reader would; :func:`local_addresses_to` points them
at the test's own server instead, which is the only change a test makes to an
example's text.
"""

from __future__ import annotations

import ast
import asyncio
import re
import shlex
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_LABELLED = re.compile(r"<!-- example: ([\w-]+) -->\n```(\w+)\n(.*?)```", flags=re.S)
#: A broker URL or DSN whose host is this machine (``redis://:PASSWORD@/0`` names none).
_LOCAL_ADDRESS = re.compile(
    r"\b(?:redis|postgresql|nats|amqp)://[^\s\"']*?(?:localhost|127\.0\.0\.1)[^\s\"']*"
)


def read_doc(relative: str) -> str:
    """The text of a documentation file, by its path from the repository root."""
    return (ROOT / relative).read_text()


def examples(text: str, language: str = "python") -> dict[str, str]:
    """``{name: code}`` of the labelled blocks of ``language`` in ``text``, in document order."""
    found: dict[str, str] = {}
    for name, fence, code in _LABELLED.findall(text):
        if fence == language:
            assert name not in found, f"two examples named {name!r}"
            found[name] = code
    return found


def fences(text: str, language: str) -> int:
    """How many blocks of ``language`` ``text`` has, labelled or not."""
    return len(re.findall(rf"^```{language}\n", text, flags=re.M))


def local_addresses_to(code: str, address: str) -> str:
    """``code`` with every local broker address in it replaced by ``address`` (there must be one)."""
    replaced, count = _LOCAL_ADDRESS.subn(address, code)
    assert count, f"no local broker address to point at the test server in:\n{code}"
    return replaced


async def run_python(code: str, name: str, **context: Any) -> dict[str, Any]:
    """Execute an example (top-level ``await`` allowed) and return its namespace.

    ``context`` pre-binds names, for examples documented as fragments of a
    larger program; an example that stands alone gets none.
    """
    namespace: dict[str, Any] = {"__name__": f"example_{name.replace('-', '_')}", **context}
    compiled = compile(code, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, namespace)
    if asyncio.iscoroutine(result):
        await result
    return namespace


def shell_words(code: str) -> list[list[str]]:
    """The commands of a shell block, each split into words (comments dropped, ``\\`` joined)."""
    joined = code.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def assignments(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """The leading ``NAME=value`` words of a command and the rest of it."""
    env: dict[str, str] = {}
    rest = list(words)
    while rest and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", rest[0]):
        key, _, value = rest.pop(0).partition("=")
        env[key] = value
    return env, rest


def env_block(code: str) -> dict[str, str]:
    """The variables a block of ``NAME=value`` lines sets (a line with anything else is an error)."""
    env: dict[str, str] = {}
    for words in shell_words(code):
        assigned, rest = assignments(words)
        assert not rest, f"not an assignment: {' '.join(rest)}"
        env.update(assigned)
    return env


async def check_round_trip(layer: Any) -> None:
    """Prove an example's layer reaches its server: a message to a new channel comes back."""
    channel = await layer.new_channel("doc")
    await layer.send(channel, {"type": "doc.check", "text": "through the broker"})
    assert await asyncio.wait_for(layer.receive(channel), 20) == {
        "type": "doc.check",
        "text": "through the broker",
    }
