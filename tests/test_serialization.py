"""The default serializer keeps Packers between calls: its output must not depend on that."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from fastapi_websockets.exceptions import SerializationError
from fastapi_websockets.serialization import MsgpackSerializer


def _packb(message: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(message, use_bin_type=True)
    return data


def test_a_refused_value_leaves_nothing_behind_for_the_next_message() -> None:
    serializer = MsgpackSerializer()
    message = {"type": "chat", "text": "x" * 300, "raw": b"\x00\xff", "n": [1, 2.5, None, True]}
    for bad in ({"type": "chat", "text": "y" * 500, "when": object()}, {"n": 2**70}, {"s": {1, 2}}):
        with pytest.raises(SerializationError):
            serializer.dumps(bad)
        assert serializer.dumps(message) == _packb(message)
    assert serializer.loads(serializer.dumps(message)) == {**message, "n": [1, 2.5, None, True]}


class _Nested(dict[str, Any]):
    """A dict whose items() serializes another message while the outer one is being packed."""

    def __init__(self, serializer: MsgpackSerializer, inner: dict[str, Any]) -> None:
        super().__init__(inner)
        self.serializer = serializer
        self.inner_data = b""

    def items(self) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        self.inner_data = self.serializer.dumps({"inner": "i" * 100})
        return iter(list(super().items()))


def test_a_pack_inside_a_pack_gets_its_own_packer() -> None:
    serializer = MsgpackSerializer()
    nested = _Nested(serializer, {"a": 1, "b": "two"})
    message = {"type": "outer", "body": nested, "tail": "t" * 50}
    data = serializer.dumps(message)
    assert serializer.loads(data) == {"type": "outer", "body": {"a": 1, "b": "two"}, "tail": "t" * 50}
    assert nested.inner_data == _packb({"inner": "i" * 100})


def test_threads_packing_at_once_get_their_own_output() -> None:
    serializer = MsgpackSerializer()
    wrong: list[int] = []

    def pack(index: int) -> None:
        message = {"type": "t", "id": index, "text": str(index) * 200}
        expected = _packb(message)
        for _ in range(2000):
            if serializer.dumps(message) != expected:
                wrong.append(index)
                return

    threads = [threading.Thread(target=pack, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
