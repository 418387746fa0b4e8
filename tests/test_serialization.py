"""The default serializer keeps Packers between calls: its output must not depend on that."""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

from fastapi_websockets.exceptions import SerializationError
from fastapi_websockets.serialization import MsgpackSerializer, default_serializer


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


class _Tagged(MsgpackSerializer):
    """A subclass with settings of its own, which a copy must keep."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag


@pytest.mark.parametrize(
    "duplicate",
    [
        lambda serializer: pickle.loads(pickle.dumps(serializer)),
        copy.copy,
        copy.deepcopy,
    ],
    ids=["pickle", "copy", "deepcopy"],
)
def test_a_serializer_can_be_pickled_and_copied(duplicate: Callable[[Any], Any]) -> None:
    # Settings holding a serializer get pickled (multiprocessing's spawn) and copied.
    original = _Tagged("mine")
    message = {"type": "chat", "text": "x" * 40, "raw": b"\x00\xff"}
    original.dumps(message)  # leaves an idle Packer in this thread
    duplicate_serializer = duplicate(original)
    assert isinstance(duplicate_serializer, _Tagged)
    assert duplicate_serializer.tag == "mine"
    assert duplicate_serializer.dumps(message) == original.dumps(message) == _packb(message)
    assert duplicate_serializer.loads(duplicate_serializer.dumps(message)) == message
    with pytest.raises(SerializationError):
        duplicate_serializer.dumps({"when": object()})
    assert duplicate_serializer.dumps(message) == _packb(message)


def test_the_default_serializer_can_be_pickled() -> None:
    assert pickle.loads(pickle.dumps(default_serializer)).dumps({"a": 1}) == _packb({"a": 1})


def test_tuple_dict_keys_come_back_as_tuples() -> None:
    # msgpack writes a tuple key as an array; decoded as a list it cannot be a key, and the
    # receiver dropped the whole message while the sender saw its send succeed.
    message: Any = {"type": "t", (1, (2, "b")): "pair", "v": [(1, 2)]}
    assert default_serializer.loads(default_serializer.dumps(message)) == {
        "type": "t",
        (1, (2, "b")): "pair",
        "v": [[1, 2]],
    }


def test_a_frame_with_a_map_as_a_key_is_still_refused() -> None:
    data = b"\x81\x81\xa1a\x01\x02"  # {{"a": 1}: 2}: no Python value can be that key
    with pytest.raises(SerializationError, match="cannot decode message frame"):
        default_serializer.loads(data)


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1])
def test_an_int_out_of_range_says_so(number: int) -> None:
    with pytest.raises(SerializationError, match=r"-2\*\*63 to 2\*\*64 - 1; send a larger one as a str"):
        default_serializer.dumps({"type": "t", "n": number})


def test_a_message_that_contains_itself_says_so() -> None:
    message: dict[str, Any] = {"type": "t"}
    message["self"] = message
    with pytest.raises(SerializationError, match="contains itself"):
        default_serializer.dumps(message)
