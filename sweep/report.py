"""Results of a sweep: `trials.parquet` (one row per trial), `report.md` (the original study's table, best first),
and PNG plots (validation curves, accuracy vs parameter count with the Pareto front, hyperparameter importance).

Reads only files in the sweep folder: Ray's per-trial `params.json` / `result.json` / `error.txt` and its
experiment state (for trial status), plus our `config.yaml` and the Optuna study.
"""
from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from trainable.io import atomic_path, write_text
from trainable.loop import METRIC

from .config import ConfigError, Config, validate

STATUS_FINISHED, STATUS_STOPPED, STATUS_FAILED, STATUS_INCOMPLETE = "finished", "stopped_early", "failed", "incomplete"


def find_sweep(target: str, results_dir: str = "results") -> Path:
    p = Path(target)
    for cand in (p, Path(results_dir) / target):
        if (cand / "config.yaml").is_file():
            return cand
    raise ConfigError(f"{target}: no sweep folder found (looked for {p}/config.yaml and {results_dir}/{target}/config.yaml)")


def load_sweep_config(folder: Path) -> Config:
    from trainable.config import yaml_load

    return validate(yaml_load((folder / "config.yaml").read_text()), str(folder / "config.yaml"))


def _ray_statuses(folder: Path) -> dict[str, str]:
    """trial_id -> Ray status (TERMINATED, ERROR, RUNNING, PENDING, PAUSED) from the newest experiment state."""
    states = sorted(glob.glob(str(folder / "experiment_state-*.json")))
    if not states:
        return {}
    try:
        data = json.loads(Path(states[-1]).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for item in data.get("trial_data", []):
        try:
            trial = json.loads(item[0]) if isinstance(item[0], str) else item[0]
            out[trial["trial_id"]] = trial.get("status", "")
        except (KeyError, TypeError, json.JSONDecodeError, IndexError):
            continue
    return out


def _error_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("Error" in ln or "Exception" in ln) and ":" in ln and not ln.startswith(("File ", "^", "Traceback")):
            return ln[:500]
    return (lines[-1] if lines else "unknown error")[:500]


def _fill_from_checkpoint(tdir: Path, by_epoch: dict[int, dict]) -> None:
    """Epochs missing from Ray's result.json are taken from the metric history the newest readable checkpoint
    carries. Ray copies result.json to storage in the background; when the driver dies or the storage fails before
    a copy, the resumed trial continues from its newest checkpoint, past the rows that never arrived."""
    from trainable.loop import CheckpointError, load_checkpoint

    for ckpt in sorted(tdir.glob("checkpoint_*"), reverse=True):
        try:
            history = load_checkpoint(ckpt).get("history", [])
        except (CheckpointError, OSError, RuntimeError):
            continue
        for m in history:
            by_epoch.setdefault(int(m["epoch"]), m)
        return


def collect_trials(folder: Path, cfg: Config) -> list[dict]:
    """One dict per trial: hyperparameters, accuracies, epochs, status, error, curve."""
    statuses = _ray_statuses(folder)
    rows = []
    for params_file in sorted(folder.glob("*/params.json")):
        tdir = params_file.parent
        params = json.loads(params_file.read_text())
        results = []
        rfile = tdir / "result.json"
        if rfile.is_file():
            for ln in rfile.read_text().splitlines():
                try:
                    results.append(json.loads(ln))
                except json.JSONDecodeError:
                    pass  # a line cut by a crash
        trial_id = results[-1].get("trial_id") if results else None
        trial_id = trial_id or tdir.name.removeprefix("trial_")
        # A resumed trial repeats no epoch, but keep the last report of each epoch to be safe.
        by_epoch = {int(r["epoch"]): r for r in results if "epoch" in r}
        if by_epoch and len(by_epoch) < max(by_epoch):
            _fill_from_checkpoint(tdir, by_epoch)
        curve = [by_epoch[e][METRIC] for e in sorted(by_epoch)]
        last = by_epoch[max(by_epoch)] if by_epoch else {}
        epochs = max(by_epoch) if by_epoch else 0
        ray_status = statuses.get(trial_id, "")
        error = _error_line(tdir / "error.txt") if (tdir / "error.txt").is_file() else None
        warnings = (tdir / "warnings.txt").read_text().strip() if (tdir / "warnings.txt").is_file() else None
        if error and ray_status != "ERROR" and (ray_status or epochs >= cfg.train.epochs):
            # It failed once, Ray retried it and it recovered: the reason stays, as a warning.
            warnings = "\n".join(filter(None, [warnings, f"recovered after: {error}"]))
            error = None
        if error or ray_status == "ERROR":
            status = STATUS_FAILED
        elif ray_status in ("RUNNING", "PENDING", "PAUSED"):
            status = STATUS_INCOMPLETE
        elif epochs >= cfg.train.epochs:
            status = STATUS_FINISHED
        else:
            status = STATUS_STOPPED if epochs > 0 else STATUS_INCOMPLETE
        wall = (results[-1].get("time_total_s") if results else None)
        nodes = list(dict.fromkeys(r["node_ip"] for r in results if r.get("node_ip")))  # in order of use
        rows.append({
            "trial_id": trial_id, "trial_dir": tdir.name, "status": status, "error": error, "warnings": warnings,
            **{f"hp.{k}": v for k, v in params.items()},
            "final_val_acc": last.get(METRIC), "best_val_acc": last.get("best_val_acc"),
            "test_acc": last.get("test_acc"), "best_epoch": last.get("best_epoch"), "epochs": epochs,
            "stopped_early": status == STATUS_STOPPED, "params": last.get("params"), "size_kb": last.get("size_kb"),
            "train_time_s": last.get("train_time_s"), "wall_time_s": wall, "nodes": ",".join(nodes),
            "val_acc_curve": curve,
        })
    return rows


def _resolved(cfg: Config, row: dict, key: str):
    v = row.get(f"hp.{key}")
    if v is not None:
        return v
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def _ranked(rows: list[dict]) -> list[dict]:
    ok = [r for r in rows if r["status"] != STATUS_FAILED and r["best_val_acc"] is not None]
    return sorted(ok, key=lambda r: -r["best_val_acc"])


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (accuracy up, params down)."""
    front = []
    for i, (acc, size) in enumerate(points):
        if not any((a >= acc and s <= size) and (a > acc or s < size) for j, (a, s) in enumerate(points) if j != i):
            front.append(i)
    return front


def write_trials_parquet(folder: Path, rows: list[dict]) -> Path:
    keys = sorted({k for r in rows for k in r})
    cols = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        if any(isinstance(v, (dict, list)) for v in vals if v is not None) and k != "val_acc_curve":
            vals = [None if v is None else json.dumps(v) for v in vals]
        if any(isinstance(v, str) for v in vals) and any(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        for v in vals):
            vals = [None if v is None else str(v) for v in vals]  # a key sampled with mixed types
        cols[k] = vals
    table = pa.table({k: pa.array(v) for k, v in cols.items()}) if rows else pa.table({"trial_id": pa.array([], pa.string())})
    path = folder / "trials.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _fmt(v, nd=4):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.{nd}f}".rstrip("0").rstrip(".")
    return str(v)


def _plots(folder: Path, rows: list[dict], log: Callable[[str], None]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["val_acc_curve"]:
            style = "-" if r["status"] == STATUS_FINISHED else ":"
            ax.plot(range(1, len(r["val_acc_curve"]) + 1), r["val_acc_curve"], style, alpha=0.7, lw=1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Validation accuracy per trial (dotted: stopped early or failed)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=110)
    plt.close(fig)
    made.append("curves.png")

    ranked = _ranked(rows)
    if ranked:
        pts = [(r["best_val_acc"], r["params"]) for r in ranked]
        front = pareto_front(pts)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.scatter([p[1] for p in pts], [p[0] for p in pts], c=["tab:red" if i in front else "tab:blue" for i in
                                                               range(len(pts))], s=22)
        fp = sorted((pts[i] for i in front), key=lambda p: p[1])
        ax.step([p[1] for p in fp], [p[0] for p in fp], where="post", color="tab:red", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("best validation accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "pareto.png", dpi=110)
        plt.close(fig)
        made.append("pareto.png")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=None, storage=f"sqlite:///{(folder / 'optuna.db').resolve()}")
        imp = optuna.importance.get_param_importances(study)
        if imp:
            fig, ax = plt.subplots(figsize=(7, 0.4 * len(imp) + 1.2))
            names = list(imp)[::-1]
            ax.barh(names, [imp[n] for n in names], color="tab:green")
            ax.set_xlabel("importance (fANOVA)")
            ax.set_title("Hyperparameter importance")
            fig.tight_layout()
            fig.savefig(folder / "importance.png", dpi=110)
            plt.close(fig)
            made.append("importance.png")
    except Exception as e:  # importance needs >= 2 finished trials with varied parameters
        log(f"report: no importance plot ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return made


def build_report(folder: Path, log: Callable[[str], None] = print) -> Path:
    """Write trials.parquet, report.md and the plots; return the report's path."""
    cfg = load_sweep_config(folder)
    rows = collect_trials(folder, cfg)
    write_trials_parquet(folder, rows)
    plots = _plots(folder, rows, log)
    ranked = _ranked(rows)
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in
              (STATUS_FINISHED, STATUS_STOPPED, STATUS_FAILED, STATUS_INCOMPLETE)}
    teacher = json.loads((folder / "teacher.json").read_text()) if (folder / "teacher.json").is_file() else {}
    cmd = (folder / "command.txt").read_text().splitlines()[0] if (folder / "command.txt").is_file() else "?"
    lines = [f"# Sweep `{cfg.name}`", "",
             f"- command: `{cmd}`",
             f"- searcher {cfg.sweep.searcher} (seed {cfg.sweep.seed}), scheduler {cfg.sweep.scheduler.kind}, "
             f"{cfg.train.epochs} epochs max, metric {METRIC} (max)",
             f"- trials: {len(rows)} ({counts[STATUS_FINISHED]} finished, {counts[STATUS_STOPPED]} stopped early, "
             f"{counts[STATUS_FAILED]} failed, {counts[STATUS_INCOMPLETE]} incomplete); "
             f"epochs trained: {sum(r['epochs'] for r in rows)}"]
    per_node: dict[str, int] = {}
    for r in rows:
        for ip in filter(None, r["nodes"].split(",")):
            per_node[ip] = per_node.get(ip, 0) + 1
    if len(per_node) > 1:  # a cluster: where the trials ran (a trial moved by a retry counts on both)
        lines.append("- nodes: " + ", ".join(f"{ip} ({n} trial{'s' * (n != 1)})" for ip, n in sorted(per_node.items())))
    if teacher:
        lines.append(f"- teacher: {cfg.teacher.source} (val acc {_fmt(teacher.get('val_acc'))}, "
                     f"test acc {_fmt(teacher.get('test_acc'))})")
    if ranked:
        best = ranked[0]
        lines.append(f"- best: trial {best['trial_id']}, validation accuracy {_fmt(best['best_val_acc'])}, test accuracy "
                     f"{_fmt(best['test_acc'])}")
        edge = []
        try:
            from .config import load_space_for

            space = load_space_for(cfg)
            if space is not None:
                edge = space.on_edge({k[3:]: v for k, v in best.items() if k.startswith("hp.")})
        except Exception:
            pass
        lines.append(f"- edge of the search space: {'yes, ' + '; '.join(edge) + ' (widen the space)' if edge else 'no'}")
        front = [ranked[i] for i in pareto_front([(r["best_val_acc"], r["params"]) for r in ranked])]
        lines.append("- Pareto front (validation accuracy up, parameters down): " + ", ".join(
            f"{r['trial_id']} ({_fmt(r['best_val_acc'])}, {r['params']} params)" for r in sorted(front, key=lambda r: r["params"])))
    lines += ["", "| Rank | Model | vocab size | hidden dim | embedding dim | loss rate | temperature | Acc | Val Acc | Step "
              "| Train Time | step_size | Params | Size | Status |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(ranked + [r for r in rows if r not in ranked], 1):
        size = f"{r['size_kb'] / 1024:.2f} MB" if r["size_kb"] else "-"
        lines.append(
            f"| {i if r in ranked else '-'} | BiLSTM {r['trial_id']} | {_resolved(cfg, r, 'tokenizer.vocab_size')} | "
            f"{_resolved(cfg, r, 'student.hidden_dim')} | {_resolved(cfg, r, 'student.embedding_dim')} | "
            f"{_fmt(_resolved(cfg, r, 'train.alpha'))} | {_fmt(_resolved(cfg, r, 'train.temperature'))} | "
            f"{_fmt(r['test_acc'])} | {_fmt(r['best_val_acc'])} | {_fmt(r['best_epoch'])}/{r['epochs']} | "
            f"{_fmt(r['train_time_s'], 3)} s | {_resolved(cfg, r, 'train.step_size')} | {_fmt(r['params'])} | {size} | "
            f"{r['status']}{': ' + r['error'] if r['error'] else ''} |")
    lines += ["", "Acc: test accuracy of the trial's best-validation checkpoint. Step: best epoch / epochs run.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    path = folder / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
