"""Results of a sweep: `trials.parquet` (one row per trial), `report.md` (the original study's table, best first),
and PNG plots (validation curves, accuracy vs parameter count with the Pareto front, hyperparameter importance).

Reads only files in the sweep folder: the trials through sweep/results.py (Ray's per-trial `params.json` /
`result.json`, filled from the checkpoints, and its experiment state for trial status), their `error.txt`, plus
our `config.yaml` and the Optuna study. Besides its own files, it writes each finalist's KD gain into the finalist's
TensorBoard run (sweep/tb.py).
"""
from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from trainable.config import yaml_load
from trainable.io import atomic_path, write_text
from trainable.memory import fmt_bytes
from trainable.tasks import DEFAULT_TASK, fmt_number, is_builtin

from .config import SECOND_OBJECTIVE, Config, ConfigError, load_space_for, metric_of, validate
from .counts import FINALISTS_FILE, constraint_values, is_feasible, is_finished
from .results import ray_statuses, read_trials
from .tb import write_kd_gains

# The serving cost a trial measured (trainable/cost.py): ms per review at batch 1 and per batch of 64, fp32 and int8,
# and the exported files' KiB.
COST_KEYS = ("latency_ms", "latency_b64_ms", "latency_int8_ms", "latency_int8_b64_ms", "export_kb", "export_int8_kb")
STATUS_FINISHED, STATUS_STOPPED, STATUS_FAILED, STATUS_INCOMPLETE = "finished", "stopped_early", "failed", "incomplete"


def find_sweep(target: str, results_dir: str = "results") -> Path:
    p = Path(target)
    for cand in (p, Path(results_dir) / target):
        if (cand / "config.yaml").is_file():
            return cand.resolve()  # absolute: resume/report/export then run in the sweep's launch directory
    raise ConfigError(f"{target}: no sweep folder found (looked for {p}/config.yaml and {results_dir}/{target}/config.yaml)")


def load_sweep_config(folder: Path, allow_task_code: bool = False) -> Config:
    """The sweep's stamped config. A task other than a built-in one is a module of code that the folder names:
    it is loaded only with `allow_task_code` (the user's `--allow-task-code`), so opening a folder we did not
    write runs nothing of its choosing."""
    path = folder / "config.yaml"
    raw = yaml_load(path.read_text(encoding="utf-8"))
    task = raw.get("task", DEFAULT_TASK) if isinstance(raw, dict) else DEFAULT_TASK
    if not allow_task_code and not is_builtin(task):
        raise ConfigError(f"{path}: task: {task} is a task module (code), not a built-in task; it runs only with "
                          f"--allow-task-code")
    return validate(raw, str(path))


def _error_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("Error" in ln or "Exception" in ln) and ":" in ln and not ln.startswith(("File ", "^", "Traceback")):
            return ln[:500]
    return (lines[-1] if lines else "unknown error")[:500]


def _nodes(tdir: Path, by_epoch: dict[int, dict]) -> list[str]:
    """The nodes a trial's epochs ran on, in order of use. Ray's rows say it (`node_ip`), and so does the trial's own
    record (trainable/adapter.py `WHERE`), which reaches storage as each epoch ends: epochs filled from the checkpoint
    because their rows never arrived have only that one."""
    where: dict[int, str] = {}
    if (tdir / "where.jsonl").is_file():
        for ln in (tdir / "where.jsonl").read_text().splitlines():
            try:
                rec = json.loads(ln)
                where[int(rec["epoch"])] = rec["node_ip"]  # a retried epoch: the last run of it counts
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                pass  # a line cut by a crash
    for e, r in by_epoch.items():
        if r.get("node_ip"):
            where.setdefault(e, r["node_ip"])
    return list(dict.fromkeys(where[e] for e in sorted(where) if e in by_epoch))


def _best_of(values: list, mode: str):
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return (max(finite) if mode == "max" else min(finite)) if finite else None


def collect_trials(folder: Path, cfg: Config, log: Callable[[str], None] | None = None) -> list[dict]:
    """One dict per trial: hyperparameters, the task's metric (final, best, curve: `final_<metric>`,
    `best_<metric>`, `<metric>_curve`) and test score, epochs, status, error. For classify: final_val_acc,
    best_val_acc, val_acc_curve, test_acc. With `sweep.constraints`, `feasible`: whether the trial's measures meet
    them (counts.is_feasible). `log`: where to name the trial folders left out."""
    metric, mode = metric_of(cfg)
    test_key = cfg.task_def.test_key
    statuses = ray_statuses(folder)
    numbers = optuna_numbers(folder)
    rows, left_out = [], []
    for rec in read_trials(folder):
        tdir, trial_id, params, by_epoch = rec.folder, rec.trial_id, rec.params, rec.by_epoch
        if statuses and trial_id not in statuses:
            # Started after Ray's last state snapshot by a driver that then died: the resumed sweep ran it again
            # under a new id (its Optuna trial is FAIL, a finalist's rerun or twin was issued again). Not a trial.
            left_out.append(tdir.name)
            continue
        curve = [by_epoch[e].get(metric) for e in sorted(by_epoch)]
        last, epochs = rec.last, rec.epochs
        ray_status = statuses.get(trial_id, "")
        error = _error_line(tdir / "error.txt") if (tdir / "error.txt").is_file() else None
        warnings = (tdir / "warnings.txt").read_text().strip() if (tdir / "warnings.txt").is_file() else None
        if error and ray_status != "ERROR" and (ray_status or is_finished(epochs, cfg.train.epochs)):
            # It failed once, Ray retried it and it recovered: the reason stays, as a warning.
            warnings = "\n".join(filter(None, [warnings, f"recovered after: {error}"]))
            error = None
        if error or ray_status == "ERROR":
            status = STATUS_FAILED
        elif ray_status in ("RUNNING", "PENDING", "PAUSED"):
            status = STATUS_INCOMPLETE
        elif is_finished(epochs, cfg.train.epochs):
            status = STATUS_FINISHED
        else:
            status = STATUS_STOPPED if epochs > 0 else STATUS_INCOMPLETE
        wall = rec.last_row.get("time_total_s")
        nodes = _nodes(tdir, by_epoch)
        rows.append({
            "trial_id": trial_id, "optuna_number": numbers.get(trial_id), "trial_dir": tdir.name, "status": status, "error": error, "warnings": warnings,
            "kd_role": params.get("kd_role", "search"), "kd_of": params.get("kd_of"),
            **{f"hp.{k}": v for k, v in params.items() if k not in ("kd_role", "kd_of")},
            f"final_{metric}": last.get(metric),
            f"best_{metric}": last[f"best_{metric}"] if f"best_{metric}" in last else _best_of(curve, mode),
            **({test_key: last.get(test_key)} if test_key else {}), "best_epoch": last.get("best_epoch"),
            "epochs": epochs,
            "stopped_early": status == STATUS_STOPPED, "params": last.get("params"), "size_kb": last.get("size_kb"),
            **{k: last.get(k) for k in (*COST_KEYS, "cost_time_s") if k in last},
            "train_time_s": last.get("train_time_s"), "wall_time_s": wall, "nodes": ",".join(nodes),
            f"{metric}_curve": curve,
            **({"feasible": is_feasible(cfg.sweep.constraints, last)} if cfg.sweep.constraints else {}),
        })
    if left_out and log is not None:
        log(f"warning: {folder}: left out {len(left_out)} trial folder(s) that Ray's last saved state does not "
            f"know (started by a driver that died before saving it; a resumed sweep runs them again under new "
            f"ids): {', '.join(left_out)}")
    return rows


def optuna_numbers(folder: Path) -> dict[str, int]:
    """Ray trial id -> Optuna trial number, from the study's user attrs (the searcher sets them; a sweep run before
    that has none). Read with sqlite, not by loading the study, so it works without the study's name."""
    from .samplers import RAY_TRIAL_ATTR

    db = folder / "optuna.db"
    if not db.is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            found = conn.execute("select t.number, a.value_json from trial_user_attributes a join trials t "
                                 "on t.trial_id = a.trial_id where a.key = ?", (RAY_TRIAL_ATTR,)).fetchall()
    except sqlite3.Error:
        return {}
    return {json.loads(value): int(number) for number, value in found}


def _resolved(cfg: Config, row: dict, key: str):
    v = row.get(f"hp.{key}")
    if v is not None:
        return v
    node = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def _candidates(rows: list[dict], metric: str) -> list[dict]:
    """Search trials that did not fail and have a value of `metric`, feasible or not."""
    key = f"best_{metric}"
    return [r for r in rows if r["status"] != STATUS_FAILED and isinstance(r.get(key), (int, float))
            and math.isfinite(r[key]) and r.get("kd_role", "search") == "search"]


def _ranked(rows: list[dict], metric: str = "val_acc", mode: str = "max", *, feasible: bool = True) -> list[dict]:
    """Search trials that did not fail and (with `sweep.constraints`; `feasible`) meet the constraints, best value
    of `metric` first: "the best" is the first, for the report, `sweep export` and the front. A finalist's rerun or
    no-teacher twin is a measurement of the finalist, never a candidate for "best". `feasible=False`: the
    infeasible ones instead, ranked the same way."""
    key = f"best_{metric}"
    ok = [r for r in _candidates(rows, metric) if (r.get("feasible") is not False) == feasible]
    return sorted(ok, key=lambda r: -r[key] if mode == "max" else r[key])


def constraint_misses(cfg: Config, row: dict) -> str:
    """The constraints a trial does not meet, e.g. "latency_ms 1.32 > 1, export_int8_kb not measured"."""
    out = []
    for key, over in constraint_values(cfg.sweep.constraints, row).items():
        if over > 0:
            v = row.get(key)
            out.append(f"{key} {_fmt(v)} > {_fmt(cfg.sweep.constraints[key])}" if isinstance(v, (int, float))
                       else f"{key} not measured")
    return ", ".join(out)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def kd_gain(distilled: list[float], twins: list[float]) -> tuple[float, float]:
    """(gain, its standard error) in accuracy units: mean(distilled) - mean(twins), and
    sqrt(s_d^2 / n_d + s_t^2 / n_t) (0 when each side has one run)."""
    (md, sd), (mt, st) = mean_std(distilled), mean_std(twins)
    return md - mt, math.sqrt(sd * sd / len(distilled) + st * st / len(twins))


def finalists(rows: list[dict], cfg: Config, folder: Path | None = None) -> list[dict]:
    """One entry per finalist, best first: its test accuracies over seeds (its own trial first), its no-teacher
    twins', the KD gain (None until both sides have a finished run, or when the finalist has no teacher) and
    whether runs are still missing. The finalists are those FinalistSearch decided on (its FINALISTS_FILE in
    `folder`). A sweep saved before that file existed: the trials the reruns and twins name, plus, once those exist,
    the `sweep.twins` best finished search trials by the sweep's metric (a finalist with alpha 1 has no twin, and
    with one seed nothing names it). A sweep with no reruns or twins (older, or `twins: 0`) has none."""

    seeds = cfg.sweep.finalist_seeds
    metric, mode = metric_of(cfg)
    key, sign = f"best_{metric}", -1 if mode == "max" else 1
    search = [r for r in rows if r.get("kd_role", "search") == "search"]
    decisions = folder / FINALISTS_FILE if folder is not None else None
    if decisions is not None and decisions.is_file():
        ids = list(json.loads(decisions.read_text())["finalists"])
    else:
        ids = [r["kd_of"] for r in rows if r.get("kd_of")]
        if ids:
            done = [r for r in search if r["status"] == STATUS_FINISHED and isinstance(r.get(key), (int, float))
                    and math.isfinite(r[key]) and r.get("feasible") is not False]
            best = sorted(done, key=lambda r: (sign * r[key], r["trial_id"]))
            ids += [r["trial_id"] for r in best[:cfg.sweep.twins]]
    by_id = {r["trial_id"]: r for r in search}

    test_key = cfg.task_def.test_key  # the held-out score the KD gain compares (classify: test_acc)

    def test_accs(rs: list[dict]) -> list[float]:
        return [r[test_key] for r in rs if r["status"] == STATUS_FINISHED and r.get(test_key) is not None]

    out = []
    for fid in dict.fromkeys(ids):
        f = by_id.get(fid)
        if f is None:
            continue
        no_teacher = not cfg.task_def.has_twin(lambda k: _resolved(cfg, f, k))
        acc = test_accs([f] + [r for r in rows if r.get("kd_of") == fid and r["kd_role"] == "rerun"])
        twin_acc = test_accs([r for r in rows if r.get("kd_of") == fid and r["kd_role"] == "twin"])
        gain = kd_gain(acc, twin_acc) if acc and twin_acc and not no_teacher else None
        pending = len(acc) < seeds or len(twin_acc) < (0 if no_teacher else seeds)
        out.append({"trial_id": fid, "row": f, "acc": acc, "twin_acc": twin_acc, "gain": gain,
                    "no_teacher": no_teacher, "pending": pending})
    worst = float("inf")  # a finalist without a value (not expected) goes last
    return sorted(out, key=lambda e: (sign * e["row"][key] if isinstance(e["row"].get(key), (int, float))
                                      else worst, e["trial_id"]))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (accuracy up, params down)."""
    front = []
    for i, (acc, size) in enumerate(points):
        if not any((a >= acc and s <= size) and (a > acc or s < size) for j, (a, s) in enumerate(points) if j != i):
            front.append(i)
    return front


def front_members(ranked: list[dict], metric: str, mode: str, second: str = "params") -> list[dict]:
    """The ranked trials on the Pareto front of (`metric` in its mode, `second` down), smallest `second` first;
    empty when a trial lacks `second`. The report's front line, its plot and `sweep export --pareto` all use it."""
    if not ranked or not all(isinstance(r.get(second), (int, float)) for r in ranked):
        return []
    sign = 1 if mode == "max" else -1
    front = pareto_front([(sign * r[f"best_{metric}"], r[second]) for r in ranked])
    return sorted((ranked[i] for i in front), key=lambda r: (r[second], r["trial_id"]))


def write_trials_parquet(folder: Path, rows: list[dict]) -> Path:
    keys = sorted({k for r in rows for k in r})
    cols = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        if any(isinstance(v, (dict, list)) for v in vals if v is not None) and not k.endswith("_curve"):
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


_fmt = fmt_number  # the report's number format, shared with the tasks' own report lines


def _save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:  # a plot cut short by a crash is never left under the real name
        fig.savefig(tmp, format="png", dpi=110)


def _plots(folder: Path, rows: list[dict], metric: str, mode: str, log: Callable[[str], None],
           second: str = "params") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        curve = r[f"{metric}_curve"]
        if curve:
            style = "-" if r["status"] == STATUS_FINISHED else ":"
            ax.plot(range(1, len(curve) + 1), [float("nan") if v is None else v for v in curve], style, alpha=0.7,
                    lw=1.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dotted: stopped early or failed)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_png(fig, folder / "curves.png")
    plt.close(fig)
    made.append("curves.png")

    ranked = _ranked(rows, metric, mode)
    sign = 1 if mode == "max" else -1
    if ranked and all(isinstance(r.get(second), (int, float)) for r in ranked):
        pts = [(r[f"best_{metric}"], r[second]) for r in ranked]
        front = pareto_front([(sign * v, p) for v, p in pts])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.scatter([p[1] for p in pts], [p[0] for p in pts], c=["tab:red" if i in front else "tab:blue" for i in
                                                               range(len(pts))], s=22)
        fp = sorted((pts[i] for i in front), key=lambda p: p[1])
        ax.step([p[1] for p in fp], [p[0] for p in fp], where="post", color="tab:red", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel({"params": "parameters"}.get(second, second))
        ax.set_ylabel(f"best {metric}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _save_png(fig, folder / "pareto.png")
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
            ax.set_xlabel("importance (PED-ANOVA, Optuna's default evaluator)")
            ax.set_title("Hyperparameter importance")
            fig.tight_layout()
            _save_png(fig, folder / "importance.png")
            plt.close(fig)
            made.append("importance.png")
    except Exception as e:  # importance needs >= 2 finished trials with varied parameters
        log(f"report: no importance plot ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return made


def _title(key: str) -> str:
    return {"test_acc": "Acc", "best_val_acc": "Val Acc"}.get(key, key)


def _best_title(metric: str) -> str:
    """The title of the best-value column: "Val Acc" (the original study's) for val_acc, else "best <metric>"."""
    return "Val Acc" if metric == "val_acc" else f"best {metric}"


def _with_result_columns(columns: dict[str, str], metric: str, test_key: str | None) -> dict[str, str]:
    """The task's columns, with the result columns where the task put them ("@..." entries) or after its own."""
    if any(v.startswith("@") for v in columns.values()):
        return columns
    out = dict(columns)
    if test_key:
        out[_title(test_key)] = test_key
    out[_best_title(metric)] = f"best_{metric}"
    out.update({"Step": "@step", "Train Time": "@time", "Params": "params", "Size": "@size"})
    return out


def _cell(cfg: Config, r: dict, spec: str) -> str:
    if spec == "@best":  # the best value of the sweep's metric, whichever the task's metrics it is
        return _fmt(r.get(f"best_{metric_of(cfg)[0]}"))
    if spec.startswith("hp:"):
        return _fmt(_resolved(cfg, r, spec[3:]))
    if spec == "@step":
        return f"{_fmt(r['best_epoch'])}/{r['epochs']}"
    if spec == "@time":
        return f"{_fmt(r['train_time_s'], 3)} s"
    if spec == "@size":
        return f"{r['size_kb'] / 1024:.2f} MB" if r.get("size_kb") else "-"
    return _fmt(r.get(spec))


def build_report(folder: Path, log: Callable[[str], None] = print, allow_task_code: bool = False) -> Path:
    """Write trials.parquet, report.md and the plots; return the report's path. `allow_task_code`: see
    `load_sweep_config`."""
    cfg = load_sweep_config(folder, allow_task_code)
    task = cfg.task_def
    metric, mode = metric_of(cfg)
    best_key, test_key = f"best_{metric}", task.test_key
    second = SECOND_OBJECTIVE[cfg.sweep.objectives]
    rows = collect_trials(folder, cfg, log)
    ranked = _ranked(rows, metric, mode)
    rank = {id(r): i for i, r in enumerate(ranked, 1)}
    for r in rows:  # the report table's rank: 1 is the best (feasible) trial; None: not ranked
        r["rank"] = rank.get(id(r))
    write_trials_parquet(folder, rows)
    plots = _plots(folder, rows, metric, mode, log, second)
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in
              (STATUS_FINISHED, STATUS_STOPPED, STATUS_FAILED, STATUS_INCOMPLETE)}
    n_extra = sum(1 for r in rows if r.get("kd_role", "search") != "search")
    cmd = (folder / "command.txt").read_text().splitlines()[0] if (folder / "command.txt").is_file() else "?"
    lines = [f"# Sweep `{cfg.name}`", "",
             f"- command: `{cmd}`",
             f"- task {cfg.task}" + (f" ({task.description})" if task.description else ""),
             f"- searcher {cfg.sweep.searcher} (seed {cfg.sweep.seed}), scheduler {cfg.sweep.scheduler.kind}, "
             f"{cfg.train.epochs} epochs max, metric {metric} ({mode})",
             f"- trials: {len(rows)} ({counts[STATUS_FINISHED]} finished, {counts[STATUS_STOPPED]} stopped early, "
             f"{counts[STATUS_FAILED]} failed, {counts[STATUS_INCOMPLETE]} incomplete"
             + (f"; {n_extra} of them finalists' reruns and twins" if n_extra else "") + "); "
             f"epochs trained: {sum(r['epochs'] for r in rows)}"]
    per_node: dict[str, int] = {}
    for r in rows:
        for ip in filter(None, r["nodes"].split(",")):
            per_node[ip] = per_node.get(ip, 0) + 1
    if len(per_node) > 1:  # a cluster: where the trials ran (a trial moved by a retry counts on both)
        lines.append("- nodes: " + ", ".join(f"{ip} ({n} trial{'s' * (n != 1)})" for ip, n in sorted(per_node.items())))
    lines += task.report_lines(folder, cfg)  # the task's own (classify: its teacher and transfer set)
    sizing = folder / "gpu_sizing.json"  # written by sweep.resources.gpu: auto
    if sizing.is_file():
        g = json.loads(sizing.read_text())
        lines.append(f"- GPU sizing (gpu: auto): largest trial ~{fmt_bytes(g['estimate_bytes'])} (an estimate); "
                     + (f"{g['trials_per_gpu']} per {fmt_bytes(g['gpu_bytes'])} GPU, {g['gpu_per_trial']:g} GPU "
                        f"per trial" if g.get("gpu_bytes") else "no GPU in the cluster, trials ran on CPU"))
    if cfg.sweep.constraints:
        limits = ", ".join(f"{k} <= {_fmt(v)}" for k, v in cfg.sweep.constraints.items())
        ran, infeasible = _candidates(rows, metric), _ranked(rows, metric, mode, feasible=False)
        line = f"- constraints: {limits}: {len(ranked)} of {len(ran)} search trials feasible"
        if infeasible:
            top = infeasible[0]
            beats = bool(ranked) and (top[best_key] > ranked[0][best_key] if mode == "max"
                                      else top[best_key] < ranked[0][best_key])
            line += (f"; the best infeasible: trial {top['trial_id']}, {metric} {_fmt(top[best_key])}"
                     + (f", {test_key} {_fmt(top.get(test_key))}" if test_key else "")
                     + f" ({constraint_misses(cfg, top)})"
                     + (f", {_fmt(abs(top[best_key] - ranked[0][best_key]))} {metric} beyond the best feasible"
                        if beats else ""))
        lines.append(line)
        if not ranked and ran:
            lines.append("- best: none, no search trial meets the constraints (loosen them or widen the space)")
    if ranked:
        best = ranked[0]
        lines.append(f"- best: trial {best['trial_id']}, {metric} {_fmt(best[best_key])}"
                     + (f", {test_key} {_fmt(best.get(test_key))}" if test_key else ""))
        edge = []
        try:
            space = load_space_for(cfg)
            if space is not None:
                edge = space.on_edge({k[3:]: v for k, v in best.items() if k.startswith("hp.")})
        except Exception:
            pass
        lines.append(f"- edge of the search space: {'yes, ' + '; '.join(edge) + ' (widen the space)' if edge else 'no'}")
        front = front_members(ranked, metric, mode, second)
        if front:
            unit = {"params": "params", "latency_ms": "ms/review"}.get(second, second)
            lines.append(f"- Pareto front ({metric} {'up' if mode == 'max' else 'down'}, "
                         f"{'parameters' if second == 'params' else second} down"
                         f"{', feasible trials' if cfg.sweep.constraints else ''}): " + ", ".join(
                             f"{r['trial_id']} ({_fmt(r[best_key])}, {_fmt(r[second])} {unit})" for r in front))
        lines.append(f"- export the best: `sweep export {folder} --out DIR`; any trial: `--trial ID|NUMBER` "
                     f"(Ray trial id or Optuna trial number)"
                     + (f"; the front ({len(front)} trials): `sweep export {folder} --pareto DIR`" if front else ""))
    fin = finalists(rows, cfg, folder)
    write_kd_gains(folder, fin)  # each finalist's `kd/gain` in its TensorBoard run, for the HParams table
    if fin:
        def acc_cell(accs):
            if not accs:
                return "-"
            m, sd = mean_std(accs)
            return f"{100 * m:.2f}" + (f" ± {100 * sd:.2f} (n={len(accs)})" if cfg.sweep.finalist_seeds > 1 else "")

        lines += ["", "## Finalists and their no-teacher twins", "",
                  "| Finalist | " + "".join(f"{t} | " for t in task.finalist_columns)
                  + "Acc (distilled) | Acc (twin: no teacher) | KD gain |",
                  "|---|" + "---:|" * (len(task.finalist_columns) + 3)]
        for e in fin:
            r = e["row"]
            gain = "-" if e["gain"] is None else (f"{100 * e['gain'][0]:+.2f} pt" + (
                f" ± {100 * e['gain'][1]:.2f}" if len(e["acc"]) > 1 or len(e["twin_acc"]) > 1 else ""))
            if e["no_teacher"]:
                gain = "n/a (no teacher)"
            lines.append(f"| {r['trial_id']} | "
                         + "".join(f"{_fmt(_resolved(cfg, r, k))} | " for k in task.finalist_columns.values())
                         + f"{acc_cell(e['acc'])} | {acc_cell(e['twin_acc'])} | "
                         f"{gain}{' (incomplete)' if e['pending'] else ''} |")
        changed = task.twin_label or ", ".join(f"{k} {v}" for k, v in task.twin.items())
        lines += ["", f"How to read it: the finalists are the {cfg.sweep.twins} best finished "
                  f"{'feasible ' if cfg.sweep.constraints else ''}search trials (best {metric}). Each is retrained with {changed} and "
                  "everything else the same: its twin. Acc is the test accuracy of a run's best-validation weights. "
                  "KD gain = the finalist's mean Acc minus its twin's, in points: what the teacher added to this "
                  "student, measured rather than assumed. With `sweep.finalist_seeds` N > 1, each side is the mean ± "
                  "sample std over n seeds (the finalist's own search trial is its first seed), and the gain's ± is "
                  "the standard error of the difference, sqrt(std_d²/n_d + std_t²/n_t); a gain within about twice "
                  "that of zero is not a gain. With one seed there is no ±, and a gain of a few tenths of a point may "
                  "be seed noise. A finalist that already trains without a teacher has no twin: n/a. Reruns and "
                  "twins are measurements, never candidates: the ranking below and `sweep export` use search trials "
                  "only."]
    columns = task.columns or {k[3:]: f"hp:{k[3:]}" for k in dict.fromkeys(k for r in rows for k in r)
                               if k.startswith("hp.")}
    columns = _with_result_columns(columns, metric, test_key)
    columns = {(_best_title(metric) if spec == "@best" else title): spec for title, spec in columns.items()}
    lines += ["", "| Rank | Model | " + " | ".join(columns) + " | Status |",
              "|---:|---|" + "---:|" * len(columns) + "---|"]
    shown = ranked + _ranked(rows, metric, mode, feasible=False)
    for i, r in enumerate(shown + [r for r in rows if r not in shown], 1):
        role = "" if r.get("kd_role", "search") == "search" else f" ({r['kd_role']} of {r['kd_of']})"
        cells = [_cell(cfg, r, spec) for spec in columns.values()]
        miss = (f" (infeasible: {constraint_misses(cfg, r)})" if r.get("feasible") is False
                and r["status"] != STATUS_FAILED else "")
        lines.append(f"| {i if r in ranked else '-'} | {task.model_label} {r['trial_id']} | " + " | ".join(cells)
                     + f" | {r['status']}{': ' + r['error'] if r['error'] else ''}{miss}{role} |")
    lines += ["", (f"{_title(test_key)}: {test_key} of the trial's best-validation checkpoint. " if test_key else "")
              + f"Best: the best {metric} over the epochs run. Step: best epoch / epochs run.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    path = folder / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
