"""The end-to-end benchmark's consumer app, instrumented as ``BENCH_OBSERVE`` says.

Served by ``bench/bench_observability.py`` (one uvicorn process per
configuration, since instrumentation is process-wide): one of its
configurations, set up exactly as in the in-process
scenarios of that benchmark, then the app of ``ours_handler.py`` unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_observability import instrument

instrument(os.environ.get("BENCH_OBSERVE", "none"))

from ours_handler import app  # noqa: E402

__all__ = ["app"]
