"""Python bytecodes per delivery, by function, of an end-to-end app's server: load does not move them.

Run from the repository root::

    .venv/bin/python bench/count_bytecodes.py [--app ours_handler] [--clients 100] [--broadcasts 20]

It runs ``bench/profile_consumer.py cpu`` (uvicorn and the app in this
process, the clients in another) with an opcode trace in place of its cProfile
pass: ``sys.settrace`` with ``f_trace_opcodes``, also armed on the coroutine
frames already suspended (a long-lived sender loop resumes in them). It
prints the bytecodes each function executed and its calls, per delivery.
Where ``bench/count_instructions.py`` says how much, this says in which Python
function; what bytecodes do not show (creating and freeing tasks, frames and
objects) only the instructions count. broadcaster's app needs its package
importable (``PYTHONPATH`` to a directory holding it) and ``--app
broadcaster_local``.
"""

from __future__ import annotations

import asyncio
import collections
import cProfile
import runpy
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from count_instructions import profile_consumer_args

ROOT = Path(__file__).resolve().parent.parent
_bytecodes: collections.Counter[str] = collections.Counter()
_calls: collections.Counter[str] = collections.Counter()
_deliveries = 1


def _name(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename.split("site-packages/")[-1].replace(f"{ROOT}/", "")
    return f"{path}:{code.co_firstlineno}({code.co_name})"


def _tracer(frame: FrameType, event: str, arg: Any) -> Any:
    frame.f_trace_opcodes = True
    key = _name(frame)
    if event == "call":
        _calls[key] += 1

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            _bytecodes[key] += 1
        return local

    return local


def _arm_suspended() -> None:
    for task in asyncio.all_tasks():
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            frame = frame or getattr(awaited, "gi_frame", None)
            if frame is not None:
                frame.f_trace = _tracer(frame, "resume", None)
                frame.f_trace_opcodes = True
            inner = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
            awaited = inner or getattr(awaited, "gi_yieldfrom", None)


class _OpcodeCounter:
    """Stands in for ``cProfile.Profile`` in ``profile_consumer.py``: counts, then prints its own report.

    ``profile_consumer.py`` skips its cProfile report for a profiler that
    ``reports_itself`` and stops its clients and server as after a cProfile
    pass (a ``SystemExit`` raised here, inside its event loop, left them to
    be torn down with a traceback each).
    """

    reports_itself = True

    def enable(self) -> None:
        _arm_suspended()
        sys.settrace(_tracer)

    def disable(self) -> None:
        sys.settrace(None)
        total = sum(_bytecodes.values())
        print(f"\nbytecodes per delivery: {total / _deliveries:,.1f}")
        for key, count in _bytecodes.most_common(40):
            print(f"{count / _deliveries:8.1f}  {_calls[key] / _deliveries:5.2f} calls  {key}")


def main() -> None:
    global _deliveries
    args = sys.argv[1:]
    app = args[args.index("--app") + 1] if "--app" in args else "ours_handler"
    clients = int(args[args.index("--clients") + 1]) if "--clients" in args else 100
    broadcasts = int(args[args.index("--broadcasts") + 1]) if "--broadcasts" in args else 20
    _deliveries = clients * broadcasts
    cProfile.Profile = _OpcodeCounter  # type: ignore[assignment,misc]
    sys.argv = ["profile_consumer.py", *profile_consumer_args(app, clients, broadcasts)]
    runpy.run_path(str(ROOT / "bench" / "profile_consumer.py"), run_name="__main__")


if __name__ == "__main__":
    main()
