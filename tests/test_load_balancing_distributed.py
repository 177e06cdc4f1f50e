"""Aux-loss-free balancing under data parallelism (2 CPU processes, gloo): the expert counts are summed over the
ranks before the bias update, so every rank ends with the bias of one model that saw the whole global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bias_update_uses_the_global_load_on_every_rank(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "tests" / "load_balancing_worker.py"), str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads(Path(f"{out}.{rank}").read_text())
        assert report["local_differs"]  # a rank alone would update from a different load
        assert report["counts_equal"] and report["bias_equal"] and report["bias_moved"]
