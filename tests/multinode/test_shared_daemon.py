"""Fresh-context review of the multi-node two-phase commit (issue 6), on simulated nodes (one torchrun
launch per node, tests/multinode/launch.py) running tests/multinode/review_worker.py. The test failed on
the code it was written against and passes since the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import stop_daemon
from launch import node_endpoint, run_job

pytestmark = pytest.mark.timeout(400)

WORKER = Path(__file__).with_name("review_worker.py")


@pytest.fixture
def endpoints():
    eps: list[str] = []
    yield eps
    for ep in eps:
        stop_daemon(ep)


def test_two_launches_on_one_host_sharing_a_daemon_either_save_or_are_refused_at_construction(
    tmp_path: Path, endpoints: list[str]
) -> None:
    shared = node_endpoint(0)
    endpoints.append(shared)
    job = run_job(
        "shared_daemon",
        tmp_path / "out",
        tmp_path / "results",
        nnodes=2,
        nproc=1,
        endpoints=[shared, shared],
        node_env={0: {"CKPTD_NODE_ID": ""}, 1: {"CKPTD_NODE_ID": ""}},
        script=WORKER,
    )
    recs = job.results.values()
    committed = all("path1" in r for r in recs)
    refused_clearly = all(
        "construct_error" in r and ("CKPTD_ENDPOINT" in r["construct_error"] or "daemon" in r["construct_error"])
        for r in recs
    )
    assert committed or refused_clearly, "\n".join(f"rank {r['rank']}: {r}" for r in recs)
