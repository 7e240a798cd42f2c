"""tests/sharded/sharded_worker.py as one rank of a simulated node (the argument order of launch.run_job):

    sharded_node_worker.py MODE OUT RESULTS      (MODE: save | resume; FSDP2 over every rank of every node)

It writes RESULTS/<MODE>_rank<r>.json, as launch.run_job expects.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sharded"))

import sharded_worker  # noqa: E402


def main() -> None:
    mode, out, results = sys.argv[1:4]
    sys.argv = [sys.argv[0], mode, "fsdp", out, results, "ckptd"]
    sharded_worker.main()
    rank = os.environ["RANK"]
    src = Path(results) / f"{mode}-fsdp-ckptd_rank{rank}.json"
    src.rename(Path(results) / f"{mode}_rank{rank}.json")


if __name__ == "__main__":
    main()
