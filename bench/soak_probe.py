"""The demo app, with a memory probe a soak can trigger from outside (``soak_churn.py --probe``).

``uvicorn bench.soak_probe:app`` serves ``examples/chat/app.py`` unchanged. On SIGUSR1 the
process writes ``probe-<n>.json`` into ``$SOAK_PROBE_DIR``: its RSS, what Python's allocator
holds (``sys.getallocatedblocks``), what glibc's malloc holds (``mallinfo2``), the live object
count of every type, the asyncio tasks by name and by where they wait, and the number of threads. With
``SOAK_PROBE_TRACE=<frames>`` it also traces allocations (``tracemalloc``, slow) and dumps a
snapshot next to each probe, so two probes can be diffed by the line that allocated what grew.
It also records the counters (``stats``) of every open channel layer, so a soak's failed
cycles can be told from messages dropped at a full mailbox. With ``SOAK_PROBE_LOG=<file>``
the library's loggers write at DEBUG level to that file.
Together they tell a leak (objects, tasks or traced bytes grow with the cycles) from allocator
growth (RSS and malloc's arena grow while Python's blocks and malloc's bytes in use do not).
On SIGUSR2 it calls ``malloc_trim(0)`` and writes ``trim.json``: its RSS before and after
glibc handed its free pages back.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import json
import logging
import os
import re
import signal
import sys
import threading
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from examples.chat.app import app
from fastapi_websockets import BaseChannelLayer

__all__ = ["app"]

_OUT = Path(os.environ.get("SOAK_PROBE_DIR", "."))
_TRACE = int(os.environ.get("SOAK_PROBE_TRACE", "0"))
_LOG = os.environ.get("SOAK_PROBE_LOG", "")
_taken = 0


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (2.33+): every field a size_t.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None  # not glibc 2.33+
    return libc


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc() -> dict[str, int]:
    """glibc's heap figures: bytes in arenas, in mmapped blocks, in use and free."""
    libc = _libc()
    if libc is None:
        return {}
    info = libc.mallinfo2()
    return {"arena": info.arena, "mmapped": info.hblkhd, "in_use": info.uordblks, "free": info.fordblks}


def _task_names() -> dict[str, int]:
    """The running asyncio tasks, counted by name with numbers taken out."""
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        return {}  # the signal came before or after the event loop ran
    return dict(Counter(re.sub(r"\d+", "N", task.get_name()) for task in tasks).most_common(50))


def _awaiting(task: asyncio.Task[Any]) -> str:
    """Where ``task`` waits: the innermost six frames of its chain of awaits (library and app code)."""
    where: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        code = frame.f_code
        where.append(f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return " > ".join(where[-6:])


def _waits() -> dict[str, int]:
    """The running asyncio tasks, counted by where they wait."""
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        return {}
    return dict(Counter(_awaiting(task) for task in tasks).most_common(30))


def _probe(signum: int, frame: FrameType | None) -> None:
    global _taken
    _taken += 1
    gc.collect()
    objects = gc.get_objects()
    types = Counter(type(thing).__qualname__ for thing in objects)
    layers = [thing for thing in objects if isinstance(thing, BaseChannelLayer) and not thing.closed]
    found: dict[str, Any] = {
        "rss": _rss(),
        "python_blocks": sys.getallocatedblocks(),
        "malloc": _malloc(),
        "threads": threading.active_count(),
        "types": dict(types.most_common(200)),
        "tasks": _task_names(),
        "waits": _waits(),
        "layer_stats": [dataclasses.asdict(layer.stats) for layer in layers],
    }
    if _TRACE:
        snapshot = tracemalloc.take_snapshot()
        snapshot.dump(str(_OUT / f"probe-{_taken}.trace"))
        found["traced"], found["traced_peak"] = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()  # the next probe's peak is the peak since this one
    (_OUT / f"probe-{_taken}.json").write_text(json.dumps(found))


def _trim(signum: int, frame: FrameType | None) -> None:
    # malloc_trim hands glibc's free pages back to the kernel: what RSS loses then was
    # allocator slack (freed memory kept for reuse), not live objects.
    libc, before = _libc(), _rss()
    if libc is not None:
        libc.malloc_trim(0)
    (_OUT / "trim.json").write_text(json.dumps({"rss_before": before, "rss_after": _rss()}))


if _TRACE:
    tracemalloc.start(_TRACE)
if _LOG:
    _handler = logging.FileHandler(_LOG)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    _library = logging.getLogger("fastapi_websockets")
    _library.addHandler(_handler)
    _library.setLevel(logging.DEBUG)
signal.signal(signal.SIGUSR1, _probe)
signal.signal(signal.SIGUSR2, _trim)
