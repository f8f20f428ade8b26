"""The search replay: search methods replayed on the search table (`bench/search_table.py`) in simulated time, many
times each, with the product's own parts: the space loader (`search_spaces`), the sweep's Optuna samplers
(`sweep.samplers.make_sampler`), Optuna's ask/report/tell as `KDOptunaSearch` drives it, and ASHA's rule as Ray's
`ASHAScheduler` applies it in our `ResumableASHA` (`Asha` below; `tests/test_search_replay.py` feeds both the same
results and checks every stop/continue decision).

    python bench/search_replay.py                       # every method, 30 repetitions: results/search_replay.*
    python bench/search_replay.py --methods tpe/asha2 random/none --reps 5

A repetition draws, for every configuration, which of the table's seeds a trial of it gets (as one sweep's trials
each have one seed), then runs the method: `max_concurrent` simulated workers; a worker takes the sampler's next
suggestion, the trial runs epoch after epoch, each lasting its recorded CPU seconds (plus `--overhead` per trial,
Ray's start-up with actor reuse), each epoch's validation accuracy goes to Optuna (`report`) and to ASHA, a
stopped trial is told PRUNED and a finished one COMPLETE with its last value, as in a sweep. The incumbent is the
trial with the best validation accuracy over the epochs it ran (a sweep's "best", stopped trials included); it is
scored by its configuration's mean test accuracy over the table's seeds. Budgets are fractions of the grid's
trial-epochs (every configuration, every epoch, one seed) and of the grid's simulated wall time.

Figures: (a) cost to target: the budget fraction at which the incumbent first reaches the target (the grid's best
configuration by mean validation accuracy over seeds: its mean test accuracy minus one seed standard deviation);
(b) the incumbent's test accuracy at 10%, 25%, 50% of the budget, and how often it is on target there; each as
median, interquartile mean (IQM) and a bootstrap 95% interval of the IQM over repetitions; (c) regret (the
table's best mean test accuracy minus the incumbent's) against budget, one line per method.
Each finished repetition is appended to `--out`.jsonl, so a stopped replay resumes; a repetition is deterministic
for its seed.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEYS = ("student.hidden_dim", "student.embedding_dim", "train.alpha", "train.temperature", "train.step_size")
FRACTIONS = (0.10, 0.25, 0.50)


# ----------------------------------------------------------------------------- the table


@dataclass
class Table:
    """The grid runs of a search table, by configuration: per seed, the per-epoch curves."""

    runs: dict[tuple, list[dict]]  # config key -> one entry per seed: {"val", "test", "cpu", "seed"}
    epochs: int
    space_name: str
    meta: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, min_seeds: int = 1) -> "Table":
        """From the Parquet (or the JSON lines of a table still being made: configurations with at least
        `min_seeds` seeds are kept, so a replay can be tried before the table is finished)."""
        path = Path(path)
        if path.suffix == ".jsonl":
            recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            rows = [{**{k: v for k, v in r.items() if k != "curve"},
                     **{f"curve.{k}": [e[k] for e in r["curve"]] for k in ("val_acc", "test_acc", "cpu_s")}}
                    for r in recs]
            meta = next((r["meta"] for r in recs if "meta" in r), {})
        else:
            import pyarrow.parquet as pq

            t = pq.read_table(path)
            rows = t.to_pylist()
            meta = json.loads((t.schema.metadata or {}).get(b"kd_table", b"{}"))
        runs: dict[tuple, list[dict]] = {}
        epochs = 0
        for r in rows:
            if r.get("role") != "grid":
                continue
            key = tuple(r[k] for k in KEYS)
            epochs = max(epochs, len(r["curve.val_acc"]))
            runs.setdefault(key, []).append({"seed": r["train.seed"], "val": list(r["curve.val_acc"]),
                                             "test": list(r["curve.test_acc"]), "cpu": list(r["curve.cpu_s"])})
        runs = {k: sorted(v, key=lambda s: s["seed"]) for k, v in runs.items() if len(v) >= min_seeds}
        if not runs:
            raise SystemExit(f"{path}: no grid configuration with {min_seeds} seed(s) yet")
        return cls(runs, epochs, meta.get("space", "seed_grid.yaml"), meta)

    def test_mean(self, key: tuple) -> float:
        return float(np.mean([s["test"][-1] for s in self.runs[key]]))

    def test_std(self, key: tuple) -> float:
        v = [s["test"][-1] for s in self.runs[key]]
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    def val_mean(self, key: tuple) -> float:
        return float(np.mean([max(s["val"]) for s in self.runs[key]]))

    @property
    def grid_epochs(self) -> int:
        return len(self.runs) * self.epochs

    def targets(self) -> dict:
        """The grid's best (by mean validation over seeds), its test mean and seed std; the table's best test."""
        best = max(self.runs, key=lambda k: (self.val_mean(k), k))
        oracle = max(self.runs, key=lambda k: (self.test_mean(k), k))
        means = [self.test_mean(k) for k in self.runs]
        return {"grid_best": best, "grid_best_test": self.test_mean(best), "grid_best_std": self.test_std(best),
                "target": self.test_mean(best) - self.test_std(best),
                # stricter: among the best 5% of configurations by mean test accuracy
                "strict": float(np.quantile(means, 0.95)),
                "oracle": oracle, "oracle_test": self.test_mean(oracle)}


# ----------------------------------------------------------------------------- ASHA, as Ray decides it


class Asha:
    """Ray's asynchronous successive halving with one bracket (`ray.tune.schedulers.AsyncHyperBandScheduler` and
    its `_Bracket`, Ray 2.60), as `sweep.ray_scheduler.ResumableASHA` runs it: time is the trial's epoch, mode max.
    Rungs at grace * rf^k below max_t; a trial reaching a rung is stopped if its value is below the
    (1 - 1/rf) percentile of the values recorded there before it (the first to arrive always goes on); a trial at
    max_t stops."""

    def __init__(self, max_t: int, grace_period: int, reduction_factor: float):
        self.max_t, self.rf = max_t, reduction_factor
        n = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)  # Ray's expression, float for float
        self.rungs = [(grace_period * reduction_factor ** k, {}) for k in reversed(range(n))]

    def _record(self, tid, epoch: int, value: float) -> bool:
        for milestone, recorded in self.rungs:
            if epoch < milestone or tid in recorded:
                continue
            stop = bool(recorded) and value < np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100)
            recorded[tid] = value
            return stop
        return False

    def on_result(self, tid, epoch: int, value: float) -> bool:
        """True: stop the trial."""
        if epoch >= self.max_t:
            return True
        return self._record(tid, epoch, value)

    def on_complete(self, tid, epoch: int, value: float) -> None:
        self._record(tid, epoch, value)


# ----------------------------------------------------------------------------- one repetition


@dataclass(frozen=True)
class Method:
    """`sampler/scheduler`: sampler in sweep.samplers.SAMPLERS; scheduler `none`, `ashaG` (grace G, rf 2) or
    `ashaG-rfR`; or `epoch1/topK`: every configuration one epoch, then the best K (by that epoch) to the end."""

    name: str

    @property
    def sampler(self) -> str:
        return self.name.split("/")[0]

    @property
    def asha(self) -> tuple[int, float] | None:
        sched = self.name.split("/")[1]
        if sched == "none" or sched.startswith("top"):
            return None
        grace, _, rf = sched.removeprefix("asha").partition("-rf")
        return int(grace), float(rf or 2)

    @property
    def top_k(self) -> int | None:
        sched = self.name.split("/")[1]
        return int(sched[3:]) if sched.startswith("top") else None


def _space():
    from search_spaces import load_space

    return load_space(ROOT / "search_spaces" / "seed_grid.yaml")


class _Trial:
    __slots__ = ("tid", "key", "curve", "epoch", "best", "ot")

    def __init__(self, tid, key, curve, ot):
        self.tid, self.key, self.curve, self.ot = tid, key, curve, ot
        self.epoch, self.best = 0, -math.inf


def replay(table: Table, method: Method, rep: int, *, workers: int = 2, overhead_s: float = 0.4,
           cap: float = 1.0) -> dict:
    """One repetition: the incumbent's trajectory as [trial-epochs spent, simulated seconds, incumbent key]."""
    import optuna

    from sweep.samplers import make_sampler

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    rng = np.random.default_rng(rep)
    keys = sorted(table.runs)
    seed_of = {k: int(rng.integers(len(table.runs[k]))) for k in keys}
    space = _space()
    define = space.define_by_run()
    budget = cap * table.grid_epochs
    if method.top_k is not None:
        return _epoch1_topk(table, method.top_k, keys, seed_of, rng, workers, overhead_s, budget)
    sampler = make_sampler(method.sampler, rep, num_samples=10**6,
                           grid=space.grid() if method.sampler == "grid" else None)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    asha = Asha(table.epochs, *method.asha) if method.asha else None
    State = optuna.trial.TrialState
    events: list = []  # (time, seq, trial): the trial's next epoch ends then
    seq, spent, now, free = 0, 0, 0.0, workers
    asked, exhausted = 0, False
    best: _Trial | None = None
    traj: list[list] = []
    finished: list[list] = []  # [key, best validation] of the trials that ran every epoch

    grid_size = space.grid_size()

    def launch() -> None:
        nonlocal seq, asked, exhausted, free
        for _ in range(10_000):
            if method.sampler == "grid" and len(study.trials) >= grid_size:
                exhausted = True
                return
            ot = study.ask()
            values = define(ot)
            key = tuple(values[k] for k in KEYS)
            if key in table.runs:
                break
            study.tell(ot, state=State.FAIL)  # not in a table still being made: as if it failed at once
        else:
            raise RuntimeError("the sampler keeps suggesting configurations the table does not have")
        trial = _Trial(asked, key, table.runs[key][seed_of[key]], ot)
        asked += 1
        free -= 1
        seq += 1
        heapq.heappush(events, (now + overhead_s + trial.curve["cpu"][0], seq, trial))

    while True:
        while free > 0 and not exhausted and spent < budget:
            launch()
        if not events:
            break
        now, _, t = heapq.heappop(events)
        t.epoch += 1
        spent += 1
        value = t.curve["val"][t.epoch - 1]
        t.ot.report(value, t.epoch)
        if value > t.best:
            t.best = value
            if best is None or t.best > best.best:
                best = t
                traj.append([spent, now, list(best.key)])
        stop = asha.on_result(t.tid, t.epoch, value) if asha else t.epoch >= table.epochs
        if stop:
            if asha:
                asha.on_complete(t.tid, t.epoch, value)
            if t.epoch >= table.epochs:
                study.tell(t.ot, value)
                finished.append([list(t.key), t.best])
            else:
                study.tell(t.ot, state=State.PRUNED)
            free += 1
        else:
            seq += 1
            heapq.heappush(events, (now + t.curve["cpu"][t.epoch], seq, t))
        if spent >= budget:
            break
    return {"traj": traj, "spent": spent, "time": now, "trials": asked, "finished": finished}


def _epoch1_topk(table, k, keys, seed_of, rng, workers, overhead_s, budget) -> dict:
    """Every configuration for one epoch (in a random order), then the K best by that epoch to the end."""
    order = [keys[i] for i in rng.permutation(len(keys))]
    ends = [0.0] * workers  # each worker's clock
    spent, best, traj = 0, (-math.inf, None), []

    def run(key, epochs, first: bool) -> None:
        nonlocal spent, best
        curve = table.runs[key][seed_of[key]]
        w = int(np.argmin(ends))
        for e in epochs:
            ends[w] += curve["cpu"][e] + (overhead_s if first and e == epochs[0] else 0.0)
            spent += 1
            if curve["val"][e] > best[0]:
                best = (curve["val"][e], key)
                traj.append([spent, ends[w], list(key)])

    for key in order:
        if spent < budget:
            run(key, [0], True)
    first = sorted(order, key=lambda c: -table.runs[c][seed_of[c]]["val"][0])[:k]
    finished = []
    for key in first:
        if spent < budget:
            run(key, list(range(1, table.epochs)), False)
            finished.append([list(key), max(table.runs[key][seed_of[key]]["val"])])
    # Trajectory points were appended per worker clock; keep them in time order for "at a budget" reads.
    traj.sort(key=lambda p: p[0])
    return {"traj": traj, "spent": spent, "time": max(ends), "trials": len(order), "finished": finished}


def with_finalists(table: Table, method: Method, rep: int, budget: float, k: int, seeds: int, *,
                   workers: int = 2, overhead_s: float = 0.4) -> dict:
    """The method's search with what is left of `budget` (a fraction of the grid's trial-epochs) after the
    finalists' reruns, then the product's finalists: the `k` best finished search trials by validation, each
    rerun with `seeds - 1` more seeds (the table's other seeds; every epoch), and the one with the best mean
    validation accuracy over its seeds is chosen. With seeds 1, the best search trial (the current default)."""
    rerun_cost = k * (seeds - 1) * table.epochs / table.grid_epochs
    r = replay(table, method, rep, workers=workers, overhead_s=overhead_s, cap=max(budget - rerun_cost, 0.0))
    if seeds == 1 or not r["finished"]:
        key = incumbent_at(r["traj"], math.inf)
        return {"chosen": list(key) if key else None, "spent": r["spent"]}
    rng = np.random.default_rng(10_000 + rep)
    top = sorted(r["finished"], key=lambda f: -f[1])[:k]
    best, best_val = None, -math.inf
    for key, own in top:
        runs = table.runs[tuple(key)]
        own_i = next(i for i, s_ in enumerate(runs) if max(s_["val"]) == own)
        others = [i for i in rng.permutation(len(runs)) if i != own_i][:seeds - 1]
        val = float(np.mean([own] + [max(runs[i]["val"]) for i in others]))
        if val > best_val:
            best, best_val = key, val
    return {"chosen": best, "spent": r["spent"] + len(top) * (seeds - 1) * table.epochs}


def grid_wall_time(table: Table, rep: int, workers: int, overhead_s: float) -> float:
    """The grid's simulated wall time: every configuration, every epoch, on `workers` workers."""
    res = replay(table, Method("grid/none"), rep, workers=workers, overhead_s=overhead_s)
    return res["time"]


# ----------------------------------------------------------------------------- figures


def incumbent_at(traj: list, budget: float, axis: int = 0):
    """The incumbent key once `budget` (trial-epochs, axis 0; seconds, axis 1) was spent, or None."""
    key = None
    for point in traj:
        if point[axis] > budget:
            break
        key = tuple(point[2])
    return key


def cost_to_target(table: Table, traj: list, target: float, axis: int = 0) -> float:
    for point in traj:
        if table.test_mean(tuple(point[2])) >= target - 1e-12:
            return point[axis]
    return math.inf


def iqm(values) -> float:
    v = np.sort(np.asarray(values, dtype=float))
    n = len(v)
    lo, hi = int(math.floor(n * 0.25)), int(math.ceil(n * 0.75))
    return float(np.mean(v[lo:hi])) if hi > lo else float(np.mean(v))


def bootstrap_ci(values, stat=iqm, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    stats = [stat(v[rng.integers(len(v), size=len(v))]) for _ in range(n)]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def summarise(table: Table, reps: list[dict], grid_time: float) -> dict:
    tg = table.targets()
    total = table.grid_epochs
    cost = [cost_to_target(table, r["traj"], tg["target"]) / total for r in reps]
    cost_t = [cost_to_target(table, r["traj"], tg["target"], axis=1) / grid_time for r in reps]
    strict = [cost_to_target(table, r["traj"], tg["strict"]) / total for r in reps]
    out = {"reps": len(reps), "cost": _stats(cost), "cost_time": _stats(cost_t), "cost_strict": _stats(strict),
           "mean_trials": float(np.mean([r["trials"] for r in reps]))}
    for f in FRACTIONS:
        accs, hits, strict_hits = [], [], []
        for r in reps:
            key = incumbent_at(r["traj"], f * total)
            acc = table.test_mean(key) if key is not None else math.nan
            accs.append(acc)
            hits.append(1.0 if key is not None and acc >= tg["target"] - 1e-12 else 0.0)
            strict_hits.append(1.0 if key is not None and acc >= tg["strict"] - 1e-12 else 0.0)
        out[f"at{int(f * 100)}"] = _stats(accs)
        out[f"strict{int(f * 100)}"] = {"rate": float(np.mean(strict_hits)), "ci": bootstrap_ci(strict_hits, np.mean)}
        out[f"hit{int(f * 100)}"] = {"rate": float(np.mean(hits)), "ci": bootstrap_ci(hits, np.mean)}
    return out


def _stats(values) -> dict:
    v = [x for x in values]
    finite = [x for x in v if math.isfinite(x)]
    s = {"median": float(np.median(v)), "iqm": iqm(v), "reached": len(finite) / len(v)}
    s["ci"] = bootstrap_ci(v) if all(math.isfinite(x) for x in v) else _ci_inf(v)
    return s


def _ci_inf(v) -> tuple[float, float]:
    # Unreached runs count as +inf: the IQM's interval is then open above where more than a quarter is unreached.
    big = np.where(np.isfinite(v), v, 1e9)
    lo, hi = bootstrap_ci(big)
    return lo, (math.inf if hi >= 1e9 else hi)


def anytime(table: Table, reps: list[dict], points: int = 41) -> tuple[list[float], list[float]]:
    """Mean regret (points) against the budget fraction."""
    tg = table.targets()
    xs = list(np.linspace(0.0, 1.0, points))
    ys = []
    for x in xs:
        regrets = []
        for r in reps:
            key = incumbent_at(r["traj"], x * table.grid_epochs)
            regrets.append(100 * (tg["oracle_test"] - (table.test_mean(key) if key else 0.5)))
        ys.append(float(np.mean(regrets)))
    return xs, ys


def correlations(table: Table) -> dict:
    """Do early epochs predict the end? Spearman's rank correlation, across configurations, between the validation
    accuracy at each epoch (mean over seeds) and the final test accuracy (mean over seeds): for all of them, for
    the heavily distilled (loss rate alpha <= 0.1), for the rest, and within the best quarter (where a searcher's
    choice is made: ranking the good against the good)."""
    from scipy.stats import spearmanr

    groups = {"all": list(table.runs), "alpha<=0.1": [k for k in table.runs if k[2] <= 0.1],
              "alpha>=0.5": [k for k in table.runs if k[2] >= 0.5]}
    cut = float(np.quantile([table.test_mean(k) for k in table.runs], 0.75))
    groups["best quarter (final test)"] = [k for k in table.runs if table.test_mean(k) >= cut]
    out = {}
    for name, keys in groups.items():
        final = [table.test_mean(k) for k in keys]
        rows = []
        for e in range(table.epochs):
            val = [float(np.mean([s["val"][e] for s in table.runs[k]])) for k in keys]
            rows.append(float(spearmanr(val, final).statistic))
        out[name] = {"n": len(keys), "spearman": rows}
    return out


DEFAULT_METHODS = [f"{s}/{sch}" for s in ("grid", "random", "tpe", "qmc", "gp")
                   for sch in ("none", "asha1", "asha2", "asha3")] + ["epoch1/top5", "epoch1/top10", "epoch1/top20"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default=str(ROOT / "results" / "search_table.parquet"))
    ap.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2, help="max_concurrent: simulated workers")
    ap.add_argument("--overhead", type=float, default=0.4, help="seconds per trial start (Ray, actor reuse)")
    ap.add_argument("--cap", type=float, default=1.0, help="stop a repetition at this fraction of the grid budget")
    ap.add_argument("--gp-cap", type=float, default=0.5, help="the cap for GP (its asks cost ~1 s at 150 trials)")
    ap.add_argument("--gp-reps", type=int, default=10,
                    help="repetitions for GP (about 100 s each at its cap on this machine; 30 for the rest)")
    ap.add_argument("--min-seeds", type=int, default=3)
    ap.add_argument("--finalists", nargs="*", default=[], metavar="METHOD+fKxN",
                    help="fixed-budget runs that choose the best among K finalists by their mean over N seeds")
    ap.add_argument("--out", default=str(ROOT / "results" / "search_replay"))
    args = ap.parse_args(argv)

    table = Table.load(args.table, min_seeds=args.min_seeds)
    tg = table.targets()
    out = Path(args.out)
    lines_path = out.with_suffix(".jsonl")
    done: dict[tuple[str, int], dict] = {}
    if lines_path.is_file():
        for line in lines_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("configs") == len(table.runs) and r.get("workers") == args.workers:
                done[(r["method"], r["rep"])] = r
    print(f"table: {len(table.runs)} configurations x {table.epochs} epochs = {table.grid_epochs} trial-epochs; "
          f"grid best {_fmt_key(tg['grid_best'])} test {100 * tg['grid_best_test']:.2f} +- "
          f"{100 * tg['grid_best_std']:.2f} -> target {100 * tg['target']:.2f}; table best test "
          f"{100 * tg['oracle_test']:.2f} ({_fmt_key(tg['oracle'])})", flush=True)
    grid_time = float(np.mean([grid_wall_time(table, r, args.workers, args.overhead) for r in range(5)]))
    results: dict[str, list[dict]] = {}
    with lines_path.open("a") as f:
        for name in args.methods:
            method = Method(name)
            cap = args.gp_cap if method.sampler == "gp" else args.cap
            reps = []
            t0 = time.time()
            for rep in range(min(args.reps, args.gp_reps) if method.sampler == "gp" else args.reps):
                r = done.get((name, rep))
                if r is None:
                    r = {"method": name, "rep": rep, "configs": len(table.runs), "workers": args.workers,
                         "cap": cap, **replay(table, method, rep, workers=args.workers, overhead_s=args.overhead,
                                              cap=cap)}
                    f.write(json.dumps(r) + "\n")
                    f.flush()
                reps.append(r)
            results[name] = reps
            s = summarise(table, reps, grid_time)
            print(f"{name:16s} {time.time() - t0:6.0f}s  cost to target: median {_pct(s['cost']['median'])} "
                  f"IQM {_pct(s['cost']['iqm'])} [{_pct(s['cost']['ci'][0])}, {_pct(s['cost']['ci'][1])}]  "
                  f"on target at 25%: {100 * s['hit25']['rate']:.0f}%  test at 25%: "
                  f"{100 * s['at25']['iqm']:.2f}", flush=True)
    selection = {}
    for spec in args.finalists:  # e.g. tpe/asha2+f3x3: that method, then 3 finalists with 3 seeds each
        name, _, fin = spec.partition("+f")
        k, _, n = fin.partition("x")
        method, t0 = Method(name), time.time()
        rows = {}
        for f in FRACTIONS:
            picks = [with_finalists(table, method, rep, f, int(k), int(n), workers=args.workers,
                                    overhead_s=args.overhead) for rep in range(args.reps)]
            accs = [table.test_mean(tuple(p_["chosen"])) for p_ in picks]
            rows[f"at{int(f * 100)}"] = _stats(accs)
            for name_, level in (("hit", tg["target"]), ("strict", tg["strict"])):
                hits = [1.0 if a >= level - 1e-12 else 0.0 for a in accs]
                rows[f"{name_}{int(f * 100)}"] = {"rate": float(np.mean(hits)), "ci": bootstrap_ci(hits, np.mean)}
        selection[spec] = rows
        print(f"{spec:20s} {time.time() - t0:6.0f}s  on target at 25%: {100 * rows['hit25']['rate']:.0f}%, top 5%: "
              f"{100 * rows['strict25']['rate']:.0f}%, test at 25%: {100 * rows['at25']['iqm']:.2f}", flush=True)
    write_report(table, results, grid_time, out, args, selection)
    return 0


def _pct(x: float) -> str:
    return "never" if not math.isfinite(x) else f"{100 * x:.0f}%"


def _fmt_key(key: tuple) -> str:
    return f"h{key[0]}/e{key[1]} alpha {key[2]} T {key[3]} step {key[4]}"


def write_report(table: Table, results: dict[str, list[dict]], grid_time: float, out: Path, args,
                 selection: dict | None = None) -> None:
    tg = table.targets()
    summary = {name: summarise(table, reps, grid_time) for name, reps in results.items()}
    out.with_suffix(".json").write_text(json.dumps({"targets": {k: (list(v) if isinstance(v, tuple) else v)
                                                               for k, v in tg.items()},
                                                    "grid_time_s": grid_time, "summary": summary}, indent=1))
    lines = [f"Table: {len(table.runs)} configurations x {table.epochs} epochs ({table.grid_epochs} trial-epochs, "
             f"simulated grid wall time {grid_time / 3600:.2f} h on {args.workers} workers). Target: the grid's best "
             f"by mean validation ({_fmt_key(tg['grid_best'])}) {100 * tg['grid_best_test']:.2f} - one seed std "
             f"{100 * tg['grid_best_std']:.2f} = {100 * tg['target']:.2f}% test. Table best "
             f"{100 * tg['oracle_test']:.2f}%; strict target: the best 5% of configurations "
             f"(>= {100 * tg['strict']:.2f}%). {args.reps} repetitions per method ({min(args.reps, args.gp_reps)} for GP); budgets are fractions of the "
             f"grid's trial-epochs (and of its wall time); median / IQM [95% CI of the IQM].",
             "",
             "| method | trials | cost to target | cost to target (wall) | on target at 10% / 25% / 50% "
             "| cost to strict target | in the top 5% at 10% / 25% / 50% | test at 10% | test at 25% | test at 50% |",
             "| --- | ---: | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in summary.items():
        c, ct = s["cost"], s["cost_time"]
        lines.append(
            f"| {name} | {s['mean_trials']:.0f} | {_pct(c['median'])} / {_pct(c['iqm'])} [{_pct(c['ci'][0])}, "
            f"{_pct(c['ci'][1])}] | {_pct(ct['median'])} / {_pct(ct['iqm'])} | "
            + " / ".join(f"{100 * s[f'hit{p}']['rate']:.0f}%" for p in (10, 25, 50)) + " | "
            + f"{_pct(s['cost_strict']['median'])} / {_pct(s['cost_strict']['iqm'])} | "
            + " / ".join(f"{100 * s[f'strict{p}']['rate']:.0f}%" for p in (10, 25, 50)) + " | "
            + " | ".join(f"{100 * s[f'at{p}']['median']:.2f} / {100 * s[f'at{p}']['iqm']:.2f} "
                         f"[{100 * s[f'at{p}']['ci'][0]:.2f}, {100 * s[f'at{p}']['ci'][1]:.2f}]" for p in (10, 25, 50))
            + " |")
    if selection:
        lines += ["", "Choosing the best at a fixed budget (search + the finalists' reruns within it): the best search "
                  "trial (fKx1) or the best of K finalists by mean validation over N seeds (fKxN).", "",
                  "| method | on target at 10% / 25% / 50% | in the top 5% at 10% / 25% / 50% | test at 10% | "
                  "test at 25% | test at 50% |", "| --- | --- | --- | --- | --- | --- |"]
        for spec, s in selection.items():
            lines.append(f"| {spec} | " + " / ".join(f"{100 * s[f'hit{p}']['rate']:.0f}%" for p in (10, 25, 50))
                         + " | " + " / ".join(f"{100 * s[f'strict{p}']['rate']:.0f}%" for p in (10, 25, 50)) + " | "
                         + " | ".join(f"{100 * s[f'at{p}']['median']:.2f} / {100 * s[f'at{p}']['iqm']:.2f} "
                                      f"[{100 * s[f'at{p}']['ci'][0]:.2f}, {100 * s[f'at{p}']['ci'][1]:.2f}]"
                                      for p in (10, 25, 50)) + " |")
    corr = correlations(table)
    lines += ["", "Do early epochs predict the end? Spearman's rank correlation across configurations between the "
              "validation accuracy at epoch e (mean over seeds) and the final test accuracy (mean over seeds):", "",
              "| configurations | n | " + " | ".join(f"e{e + 1}" for e in range(table.epochs)) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in range(table.epochs)) + " |"]
    for name, c in corr.items():
        lines.append(f"| {name} | {c['n']} | " + " | ".join(f"{x:.2f}" for x in c["spearman"]) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 5.5))
        for name, reps in results.items():
            xs, ys = anytime(table, reps)
            ax.plot([100 * x for x in xs], ys, label=name, lw=1.2,
                    ls="-" if "none" in name else ("--" if "asha" in name else ":"))
        ax.set_xlabel("budget: % of the grid's trial-epochs")
        ax.set_ylabel("regret: table best - incumbent mean test accuracy (pt)")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.axhline(100 * (tg["oracle_test"] - tg["target"]), color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=6, ncol=3)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out.with_name(out.name + "_anytime.png"), dpi=110)
    except Exception as e:  # the figures are a convenience; the numbers are above
        print(f"plot skipped: {e}", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
