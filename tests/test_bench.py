"""The benchmark harness's two-process p2p scenario runs against a real Redis (figures, not speeds)."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.servers.redis import RedisNode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import harness


def test_p2p2_closes_its_loops_across_two_processes(redis_server: RedisNode) -> None:
    """p2p2 prints every p2p figure, measured in a child that heard of each arrival over the pipe.

    Each loop ends only once every message sent was reported back, so a figure for both
    loops means the reports reached the sending process; the report hop and the reads per
    message are what only the two-process form measures.
    """
    assert redis_server.proc is not None
    server = {
        "broker": "redis",
        "url": redis_server.url,
        "port": redis_server.port,
        "pids": [redis_server.proc.popen.pid],
    }
    sizes = {"p2p_seconds": 0.2, "p2p_messages": 300, "limit": 60.0}
    result = harness.run_job(harness.find_impl("redis", "redis"), "p2p2", server, sizes)
    assert "error" not in result, result
    for name in ("p2p1", "p2p16"):
        assert result[f"{name}_rate"] > 0
        assert result[f"{name}_p50"] > 0
        assert result[f"{name}_peer_cpu_us"] >= 0
        assert 0 < result[f"{name}_reads_per_msg"] <= 1
    assert result["report_hop_p50"] > 0
