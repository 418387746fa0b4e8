"""The cache of validated names: bounded, per kind, and never a way around a check."""

from __future__ import annotations

import pytest

from fastapi_websockets import names
from fastapi_websockets.exceptions import InvalidChannelName


def test_a_cached_channel_name_is_still_checked_as_a_group_name() -> None:
    assert names.validate_channel_name("chat.ab12!x1") == "chat.ab12!x1"
    assert names.validate_channel_name("chat.ab12!x1") == "chat.ab12!x1"
    with pytest.raises(InvalidChannelName):
        names.validate_group_name("chat.ab12!x1")


def test_the_cache_stays_bounded() -> None:
    limit = names._valid_channels._size
    for index in range(limit * 2 + 3):
        names.validate_channel_name(f"bounded.{index}")
        names.validate_group_name(f"bounded-group.{index}")
    assert 0 < len(names._valid_channels.values()) <= limit
    assert 0 < len(names._valid_groups.values()) <= limit


class _Sneaky(str):
    """A str that claims to equal a valid name: it must not pass for one."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash("room.1")


@pytest.mark.parametrize("bad", ["", " room", "room\n", "!room", "a!b!c", "x" * 201, 7, None])
def test_invalid_names_are_refused_after_valid_ones_were_cached(bad: object) -> None:
    names.validate_channel_name("room.1")
    with pytest.raises(InvalidChannelName):
        names.validate_channel_name(bad)
    with pytest.raises(InvalidChannelName):
        names.validate_group_name(bad)


def test_a_str_subclass_is_checked_by_its_characters() -> None:
    names.validate_channel_name("room.1")
    names.validate_group_name("room.1")
    with pytest.raises(InvalidChannelName):
        names.validate_channel_name(_Sneaky("bad name"))
    with pytest.raises(InvalidChannelName):
        names.validate_group_name(_Sneaky("bad name"))
    remembered = names._valid_channels.values() + names._valid_groups.values()
    assert remembered
    assert all(type(name) is str for name in remembered)


def test_a_name_refused_for_its_bang_says_what_to_use_instead() -> None:
    with pytest.raises(InvalidChannelName, match=r"marks process-specific.*such as ':' or '\.'"):
        names.validate_group_name("room!1")
    with pytest.raises(InvalidChannelName, match=r"new_channel\(\) adds its own.*such as ':' or '\.'"):
        names.validate_prefix("chat!")


async def test_send_checks_a_str_subclass_even_after_the_name_it_imitates_was_sent_to() -> None:
    from fastapi_websockets import InMemoryChannelLayer

    layer = InMemoryChannelLayer()
    await layer.send("room.1", {"type": "ok"})
    with pytest.raises(InvalidChannelName):
        await layer.send(_Sneaky("bad name"), {"type": "no"})
    assert await layer.receive("room.1") == {"type": "ok"}
    await layer.close()


async def test_is_local_gives_the_same_answers_when_it_has_seen_a_name_before() -> None:
    from fastapi_websockets.backends.postgresql import PostgreSQLChannelLayer

    # Constructed only (never started): is_local() needs no connection.
    layer, other = (PostgreSQLChannelLayer(dsn="postgresql://127.0.0.1:1/none") for _ in range(2))
    mine = f"chat.{layer.client_token}!x1"
    bare = f"{layer.client_token}!x2"
    theirs = f"chat.{other.client_token}!x1"
    decoy = f"chat.{layer.client_token}x!x1"
    for _ in range(3):
        assert layer.is_local(mine)
        assert layer.is_local(bare)
        assert not layer.is_local(theirs)
        assert not layer.is_local(decoy)
        assert not layer.is_local("named.channel")
        assert other.is_local(theirs)
        assert not other.is_local(mine)
    await layer.close()
    await other.close()
