"""Does ASHA prejudge distillation? Distilled students can trail in their first epochs and win later; a grace period
that is too short stops them. For each grace period: run the sweep (the quickstart by default), then retrain every
trial ASHA stopped to the full epoch count, with the same config, and count the stopped trials that would have
beaten the sweep's best finished trial.

    python bench/asha_prejudge.py                                  # quickstart, grace periods 1 and 2
    python bench/asha_prejudge.py --config CONFIG --grace 1,2,3

Prints one line per stopped trial and a summary table; figures go to results/benchmarks.md by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rerun_stopped(folder: Path) -> list[dict]:
    import torch

    from sweep.report import collect_trials, load_sweep_config
    from trainable.tasks import config_from_trial
    from trainable.loop import train_student
    from trainable.prepare import prepare, student_inputs

    cfg = load_sweep_config(folder)
    rows = collect_trials(folder, cfg)
    base = cfg.model_dump(exclude={"sweep"})
    prep = None
    out = []
    for r in rows:
        if r["status"] != "stopped_early" or r.get("kd_role") not in (None, "search"):
            continue
        params = json.loads((folder / r["trial_dir"] / "params.json").read_text())
        tcfg = config_from_trial(base, params)
        if prep is None:
            from sweep.config import student_transfer_rows, student_vocab_sizes

            prep = prepare(cfg, lambda m: None, vocab_sizes=student_vocab_sizes(cfg),
                           transfer_rows=student_transfer_rows(cfg))
        torch.set_num_threads(2)
        data, logits = student_inputs(prep.encoded, prep.logits, tcfg)
        full = train_student(tcfg.student, tcfg.train, data, logits, log=lambda m: None)
        out.append({"trial_id": r["trial_id"], "stopped_at": r["epochs"], "val_at_stop": r["best_val_acc"],
                    "full_val": full.val_acc, "full_test": full.test_acc, "alpha": tcfg.train.alpha})
        print(f"  {r['trial_id']}: stopped at epoch {r['epochs']} (val {r['best_val_acc']:.4f}); to the end: "
              f"val {full.val_acc:.4f}, test {full.test_acc:.4f} (alpha {tcfg.train.alpha:.2f})", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "search_spaces" / "quickstart.yaml"))
    ap.add_argument("--grace", default="1,2")
    ap.add_argument("--results-dir", default=str(ROOT / "results" / "asha-prejudge"))
    args = ap.parse_args()
    summary = []
    for g in [int(x) for x in args.grace.split(",")]:
        name = f"asha-grace{g}"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "sweep.cli", "run", args.config, "--force", "--set", f"name={name}",
               "--set", f"results_dir={args.results_dir}", "--set", f"sweep.scheduler.grace_period={g}",
               "--set", "sweep.twins=0"]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ}, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        folder = Path(args.results_dir) / name
        from sweep.report import collect_trials, load_sweep_config

        rows = collect_trials(folder, load_sweep_config(folder))
        finished = [r for r in rows if r["status"] == "finished"]
        best = max(finished, key=lambda r: r["best_val_acc"])
        print(f"grace {g}: {len(rows)} trials, {len(finished)} finished, best finished val {best['best_val_acc']:.4f} "
              f"test {best['test_acc']:.4f}, {sum(r['epochs'] for r in rows)} trial-epochs, {wall:.0f} s", flush=True)
        reruns = rerun_stopped(folder)
        beaten = [x for x in reruns if x["full_val"] > best["best_val_acc"]]
        summary.append((g, len(rows), len(reruns), sum(r["epochs"] for r in rows), best["best_val_acc"],
                        best["test_acc"], len(beaten), max((x["full_val"] for x in reruns), default=float("nan")),
                        wall))
    print("\n| grace period | trials | stopped early | trial-epochs | best finished val / test | stopped trials that "
          "would have beaten it | best stopped trial, run to the end (val) | sweep wall |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|")
    for g, n, stopped, te, bv, bt, nb, bs, wall in summary:
        print(f"| {g} | {n} | {stopped} | {te} | {100 * bv:.2f} / {100 * bt:.2f} | {nb} | {100 * bs:.2f} | {wall:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
