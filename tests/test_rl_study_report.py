"""bench/rl_study.py's report: per-seed stage scores, mean and spread, and each stage's gain over its baseline
checked against issue 9's targets (mean gain reached and every seed up)."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("rl_study", Path(__file__).resolve().parents[1] / "bench" / "rl_study.py")
rl_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rl_study)


def write_run(root: Path, seed: int, method: str, scores: dict, kept: dict | None = None) -> None:
    stages = [{"stage": name, "strict": value, **({"pass@8": min(1.0, value + 0.2)} if name != "init" else {}),
               **(kept if kept and name == method else {})} for name, value in scores.items()]
    run = rl_study.run_dir(root, method, seed)
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"seed": seed, "stages": stages}))


def test_report_checks_each_gain_against_its_target_on_every_seed(tmp_path):
    sft = {0: (0.10, 0.40), 1: (0.12, 0.50), 2: (0.11, 0.45)}
    grpo = {0: 0.90, 1: 0.85, 2: 0.46}  # mean gain +28.7, every seed up (seed 2 by one point)
    dpo = {0: 0.60, 1: 0.45, 2: 0.70}  # mean gain +13.3, but seed 1 fell
    for seed, (direct, cot) in sft.items():
        base = {"init": 0.0, "sft_direct": direct, "sft_cot": cot}
        write_run(tmp_path, seed, "grpo", {**base, "grpo": grpo[seed]}, {"kept_step": 40, "last_step_strict": 0.8})
        write_run(tmp_path, seed, "dpo", {**base, "dpo": dpo[seed]})
    table = rl_study.report(tmp_path)
    summary = json.loads((tmp_path / "study.json").read_text())
    assert summary["sft_cot"]["gain_over_sft_direct"]["met"]
    assert abs(summary["sft_cot"]["gain_over_sft_direct"]["mean"] - 34.0) < 1e-9
    assert summary["grpo"]["gain_over_sft_cot"]["met"] and abs(summary["grpo"]["gain_over_sft_cot"]["mean"] - 28.666666666666668) < 1e-9
    assert not summary["dpo"]["gain_over_sft_cot"]["met"]
    assert summary["dpo"]["gain_over_sft_cot"]["per_seed"]["1"] < 0
    assert "| grpo - sft_cot | +50.0 | +35.0 | +1.0 | +28.7 | +10 | yes | 40 (80%), 40 (80%), 40 (80%) |" in table
    assert "rlhf" not in summary
