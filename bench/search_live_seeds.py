"""The live confirmation's finalists over seeds (issue 19, item 5): the 3 best finished search trials of
`sweep run bench/search_live.yaml` retrained with seeds 1 and 2 (no Ray, the sweep's own config), so each has a
test accuracy over 3 seeds (its search trial is seed 0).

    python bench/search_live_seeds.py [results/search_live]
"""
import json
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweep.report import load_sweep_config  # noqa: E402
from trainable.config import ExperimentConfig  # noqa: E402
from trainable.loop import train_student  # noqa: E402
from trainable.prepare import prepare, student_inputs  # noqa: E402
from trainable.tasks import config_from_trial  # noqa: E402


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "results/search_live")
    base = load_sweep_config(folder).model_dump(exclude={"sweep"})
    prep = prepare(ExperimentConfig.model_validate(base), log=lambda m: None)
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    finalists = sorted((r for r in rows if r["kd_role"] == "search" and r["status"] == "finished"),
                       key=lambda r: -r["best_val_acc"])[:3]
    out = {}
    for r in finalists:
        hp = {k[3:]: v for k, v in r.items() if k.startswith("hp.") and v is not None}
        accs = [r["test_acc"]]
        for seed in (1, 2):
            cfg = config_from_trial(base, {**hp, "train.seed": seed})
            data, logits = student_inputs(prep.encoded, prep.logits, cfg)
            accs.append(train_student(cfg.student, cfg.train, data, logits, log=lambda m: None).test_acc)
        out[r["trial_id"]] = {"hp": hp, "test_acc": accs, "mean": statistics.mean(accs), "std": statistics.stdev(accs)}
        print(f"{r['trial_id']}: test {', '.join(f'{100 * a:.2f}' for a in accs)}; mean "
              f"{100 * statistics.mean(accs):.2f} +- {100 * statistics.stdev(accs):.2f}", flush=True)
    (folder / "finalist_seeds.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
