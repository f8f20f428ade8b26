"""The search side of a sweep, as Ray pickles it into the sweep's saved state (so it lives at module level): the
Optuna searcher with our pruning, NaN and constraint rules (`KDOptunaSearch`), the study pickled by file name
(`SweepStudy`), the search generator a resume re-points at the folder resumed (`FolderSearchGenerator`), and the
finalists with their reruns and twins (`FinalistSearch`)."""
from __future__ import annotations

import copy
import math
import pickletools
import secrets
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna
from ray.tune.experiment.config_parser import _create_trial_from_spec
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.variant_generator import _resolve_nested_dict, format_vars
from ray.tune.utils.util import flatten_dict, merge_dicts

from trainable.tasks import has_twin

from .counts import FINALISTS_FILE, OF, ROLE, constraint_values, is_feasible, is_finished
from .results import ray_statuses
from .samplers import RAY_TRIAL_ATTR
from .tb import trial_number


# ----------------------------------------------------------------------------- a sweep folder that moves

# The sweep folder being resumed (set by `resuming`). Ray unpickles the searcher and the scheduler in the driver
# (tuner.pkl at Tuner.restore, searcher-state-*.pkl when fit starts): what they name inside the sweep folder, the
# Optuna study and the folder ASHA replays, is re-pointed at the folder being resumed, so a moved folder resumes
# and a copy never writes into the original's study.
_resumed_folder: Path | None = None


@contextmanager
def resuming(folder: Path):
    global _resumed_folder
    _resumed_folder = Path(folder).resolve()
    try:
        yield
    finally:
        _resumed_folder = None


class SweepStudy(optuna.storages.RDBStorage):
    """The sweep's SQLite study (`path`, inside the sweep folder), pickled by its file name: unpickled while a
    sweep is resumed (`resuming`) it opens that folder's file, else the same path again (a copy in this run)."""

    def __init__(self, path: str | Path):
        self.sweep_file = Path(path).resolve()
        super().__init__(f"sqlite:///{self.sweep_file}")

    def __reduce__(self):
        return _open_sweep_study, (self.sweep_file.name, str(self.sweep_file.parent))


def _open_sweep_study(name: str, folder: str) -> SweepStudy:
    return SweepStudy((_resumed_folder or Path(folder)) / name)


# A trial id is `<prefix>_<number>` (`3f2a1b_00004`): the number, 0, 1, ... in the order the trials are made, names
# the trial's TensorBoard run (sweep/tb.py). The prefix is new in every driver process, so that a resumed sweep's
# ids never repeat those of its earlier drivers.
_ID_PREFIX = secrets.token_hex(3)


class FolderSearchGenerator(SearchGenerator):
    """Ray's SearchGenerator (it turns the searcher's suggestions into trials), except that its trial ids are
    numbered (`create_trial_if_possible`), and that when `sweep resume` restores it, the saved experiment it makes
    new trials from is re-pointed at the folder being resumed. Ray (checked on 2.60) re-points the trials it
    restores (TuneController._restore_trials) but not this experiment, whose storage context names the old
    folder: a moved sweep's new trials were written where it used to be, and a copy's into the original."""

    def create_trial_if_possible(self, experiment_spec: dict):
        """Ray's own (2.60: ray/tune/search/search_generator.py), but the trial id ends in the next trial number
        instead of being random. The number is kept with the search's state, so a resumed sweep goes on counting."""
        number = getattr(self, "_next_number", self._counter)  # (a generator pickled before numbered ids)
        trial_id = f"{_ID_PREFIX}_{number:05d}"
        suggested = self.searcher.suggest(trial_id)
        if suggested == Searcher.FINISHED:
            self._finished = True
            return None
        if suggested is None:
            return None  # the same id is offered again next time: no searcher keeps an id it made no trial for
        spec = copy.deepcopy(experiment_spec)
        spec["config"] = merge_dicts(spec["config"], copy.deepcopy(suggested))
        self._counter += 1
        self._next_number = number + 1
        tag = f"{self._counter}_{format_vars(_resolve_nested_dict(spec['config']))}"
        return _create_trial_from_spec(spec, self._parser, evaluated_params=flatten_dict(suggested),
                                       experiment_tag=tag, trial_id=trial_id)

    def get_state(self) -> dict:
        return {**super().get_state(), "next_number": getattr(self, "_next_number", self._counter)}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        # A trial started after the state was saved by a driver that then died is run again under a new id
        # (sweep/report.py leaves the dead one out); its number is not given again, so the two keep two runs.
        self._next_number = max([state.get("next_number", self._counter)]
                                + [n + 1 for n in _numbers_in(_resumed_folder)])
        if _resumed_folder is not None:
            # The searcher's state can be newer than Ray's trials saved beside it: a trial suggested just before
            # the driver died is live to the searcher but not among the trials Ray restores, so it never ends,
            # and with max_concurrent trials live the search waited for it forever (CI: a tagger sweep resumed
            # to "0 running" and hung). Its suggestion goes to the next trial made, which takes its place in the
            # count (and its Optuna trial, still running, with the same parameters).
            self._counter -= forget_unrestored(self.searcher, set(ray_statuses(_resumed_folder)))
        storage = getattr(self._experiment, "storage", None)  # also the experiment's spec["storage"]
        if _resumed_folder is not None and storage is not None:
            storage.storage_fs_path = str(_resumed_folder.parent)
            storage.experiment_dir_name = _resumed_folder.name

    def save_to_dir(self, dirpath: str, session_str: str) -> None:
        """Ray's snapshot of the search (into the driver's staging folder, which Ray then copies to the sweep
        folder), plus the finalists' decisions beside it: the file always agrees with the searcher state saved
        with it. Written anywhere else it would not: Ray copies the folder's *.json down into staging when it
        resumes and back up after, so a file written straight into the sweep folder was overwritten by its copy
        from before the crash (checked on Ray 2.60)."""
        super().save_to_dir(dirpath, session_str)
        decisions = self.searcher.decisions() if isinstance(self.searcher, FinalistSearch) else None
        if decisions is not None:
            from trainable.io import write_json

            write_json(Path(dirpath) / FINALISTS_FILE, decisions)


def forget_unrestored(searcher, restored: set[str]) -> int:
    """Forget, in a searcher chain (FinalistSearch, Ray's ConcurrencyLimiter, KDOptunaSearch), the live trials
    that are not in `restored` (the trial ids Ray restores), each suggestion kept for the next trial suggested.
    Returns how many were forgotten."""
    if isinstance(searcher, FinalistSearch):
        return searcher.forget(restored)
    if isinstance(searcher, ConcurrencyLimiter):
        gone = {t for t in searcher.live_trials if t not in restored}
        searcher.live_trials -= gone
        searcher.num_unfinished_live_trials -= len(gone)
        if isinstance(searcher.searcher, KDOptunaSearch):
            searcher.searcher.requeue(gone)
        return len(gone)
    return 0


def _numbers_in(folder: Path | None) -> list[int]:
    """The numbers of the trials whose folders (`trial_<id>`) are in the sweep `folder`."""
    found = (trial_number(d.name.removeprefix("trial_")) for d in folder.glob("trial_*")) if folder else ()
    return [n for n in found if n is not None]


def foreign_studies(pickle_bytes: bytes, own: Path) -> list[str]:
    """The SQLite studies other than `own` that a pickle names by URL (read with pickletools: nothing is
    unpickled, nothing runs). A sweep saved before `SweepStudy` pickled its study by absolute URL; moved or
    copied, its state would open the original's study (or fail where it is gone)."""
    own_url = f"sqlite:///{Path(own).resolve()}"
    found = []
    try:
        for _, arg, _ in pickletools.genops(pickle_bytes):
            if isinstance(arg, str) and arg.startswith("sqlite:///") and arg != own_url and arg not in found:
                found.append(arg)
    except Exception:  # noqa: BLE001 - a pickle pickletools cannot walk: Ray's own unpickling will say what is wrong
        pass
    return found


class KDOptunaSearch(OptunaSearch):
    """OptunaSearch that
    - reports our own `epoch` as Optuna's step (Ray's training_iteration restarts at 1 after a restore),
    - never tells Optuna a NaN or infinite value (a failed trial is FAIL, and is never the best),
    - names the study's objectives after the metrics (`Study.set_metric_names`: optuna-dashboard shows them),
    - records a trial stopped early (by ASHA, before `max_epochs`) as PRUNED, which keeps its last reported value
      in the study, so TPE learns from it,
    - with `constraints` ({measure: limit}, `sweep.constraints`), sets each on the Optuna trial before telling it
      (`Trial.set_constraint`, Optuna's supported way since 5.0: its `constraints_func` is deprecated), from the
      trial's last result: a finished trial and one stopped early alike (its cost is measured at its first epoch),
      so TPE and GP learn where the feasible region is. A failed trial gets none (Optuna ignores failed trials).
    """

    _constraints: dict[str, float] = {}  # (a searcher pickled before constraints had none)

    def __init__(self, *args, max_epochs: int, constraints: dict[str, float] | None = None, **kwargs):
        self._max_epochs = max_epochs
        self._constraints = dict(constraints or {})
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        # Named objectives (optuna-dashboard shows "val_acc", not "Objective 0"); a resumed study keeps its names.
        if self._ot_study.metric_names is None:
            with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and unchanged since
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names([self._metric] if isinstance(self._metric, str)
                                                else list(self._metric))

    def requeue(self, trial_ids: set[str]) -> None:
        """Ray trials that a resumed driver does not restore (see forget_unrestored): each one's Optuna trial, still
        running, goes to the next trial suggested, which gets the same parameters."""
        gone = [t for t in sorted(trial_ids) if t in self._ot_trials and t not in self._completed_trials]
        self._requeued = getattr(self, "_requeued", []) + [self._ot_trials.pop(t) for t in gone]

    def suggest(self, trial_id: str):
        if trial_id not in self._ot_trials and getattr(self, "_requeued", None):
            self._ot_trials[trial_id] = self._requeued.pop(0)  # (Ray's suggest asks Optuna only for a new id)
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:  # the study names its Ray trial: `sweep export --trial NUMBER` goes by it
            ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = result.get(self.metric) if isinstance(self.metric, str) else None
        if isinstance(self.metric, list) or value is None or not math.isfinite(value):
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            try:
                ot_trial.report(value, int(result.get("epoch", 0)))
            except optuna.exceptions.UpdateFinishedTrialError:
                # Told (stopped or complete) just before a driver crash that came before Ray's next state snapshot:
                # Ray resumes it as unfinished. The study already holds its outcome.
                self._completed_trials.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        State = optuna.trial.TrialState
        multi = isinstance(self.metric, list)
        metrics = self.metric if multi else [self.metric]
        values = [None if not result else result.get(m) for m in metrics]
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        self._completed_trials.add(trial_id)
        if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            return  # told before a crash that came before Ray's next state snapshot
        if error or not finite:
            self._ot_study.tell(ot_trial, state=State.FAIL)
            return
        for key, value in constraint_values(self._constraints, result).items():
            ot_trial.set_constraint(key, value)
        if not is_finished(result.get("epoch"), self._max_epochs):
            self._ot_study.tell(ot_trial, state=State.PRUNED)
        else:
            self._ot_study.tell(ot_trial, values if multi else values[0])

    def restore(self, checkpoint_path: str) -> None:
        """After a crash, Optuna trials asked after Ray's last state snapshot belong to no Ray trial: mark them
        failed, so no trial is left RUNNING in the study."""
        super().restore(checkpoint_path)
        known = {t._trial_id for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if frozen._trial_id not in known:
                self._ot_study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)


# ----------------------------------------------------------------------------- finalists and their twins


def is_extra(trial) -> bool:
    """Whether a Ray trial is a finalist's rerun or twin (search trials carry no ROLE key)."""
    return bool((getattr(trial, "config", None) or {}).get(ROLE))


def pick_finalists(done: dict[str, dict], *, twins: int, max_epochs: int, mode: str = "max") -> list[str]:
    """The `twins` best finished feasible search trials, best first (ties by id). `done`: search trial id ->
    {"error", "epoch", "best", "feasible"}: "best" is the trial's best value of the sweep's metric, better by
    `mode`; "feasible" whether it meets `sweep.constraints` (an infeasible trial is not what would be deployed, so
    its KD gain is not worth measuring: with no feasible trial there are no finalists)."""
    sign = -1 if mode == "max" else 1
    finished = [(tid, d.get("best", d.get("best_val_acc")))  # (searcher states saved before "best": val_acc only)
                for tid, d in done.items() if is_finished(d.get("epoch"), max_epochs, failed=bool(d.get("error")))
                and d.get("feasible", True)]
    finished = [(tid, v) for tid, v in finished if isinstance(v, (int, float)) and math.isfinite(v)]
    return [tid for tid, _ in sorted(finished, key=lambda x: (sign * x[1], x[0]))[:twins]]


def finalist_trials(done: dict[str, dict], configs: dict[str, dict], *, twins: int, seeds: int, twin: dict,
                    base: dict, base_seed: int, max_epochs: int, mode: str = "max") -> list[dict]:
    """The extra trials once the search is over. `done` as for `pick_finalists`, whose finalists these are;
    `configs`: search trial id -> its config. Each finalist gets `seeds - 1` reruns with the next seeds (its own
    trial is the first seed) and, unless it already has no teacher, a twin per seed: the same config with what the
    task's twin changes (`twin`, `Task.twin`; classify: train.alpha 1), `base` being the sweep's values there."""
    extra = []
    for tid in pick_finalists(done, twins=twins, max_epochs=max_epochs, mode=mode):
        cfg = configs[tid]
        seed0 = cfg.get("train.seed", base_seed)
        for i in range(1, seeds):
            extra.append({**cfg, "train.seed": seed0 + i, ROLE: "rerun", OF: tid})
        if has_twin(twin, lambda k: cfg.get(k, base.get(k))):
            for i in range(seeds):
                extra.append({**cfg, **twin, "train.seed": seed0 + i, ROLE: "twin", OF: tid})
    return extra


class FinalistSearch(Searcher):
    """The search trials from the wrapped searcher, then, once every one of them is complete, the finalists' reruns
    and no-teacher twins (`finalist_trials`), as trials of the same experiment: Ray saves this wrapper's state with
    the experiment (`get_state`), so `sweep resume` neither loses nor repeats them. The wrapped searcher (Optuna)
    never hears of the extra trials. At most `max_concurrent` extra trials are live at once, like the search's.
    The finalists are the best by the wrapped searcher's metric and mode (the sweep's); `decisions` are what
    FolderSearchGenerator writes to FINALISTS_FILE with every snapshot of this state."""

    def __init__(self, searcher: Searcher, *, num_search: int, twins: int, seeds: int, twin: dict, base: dict,
                 base_seed: int, max_epochs: int, max_concurrent: int, constraints: dict[str, float] | None = None):
        self.searcher = searcher
        self.constraints = dict(constraints or {})  # `sweep.constraints`: the finalists are feasible trials
        self.num_search, self.twins, self.seeds = num_search, twins, seeds
        # What a twin changes and the sweep's values there (plain data: this object is pickled with the sweep).
        # A state saved before them had base_alpha; set_state keeps these, from the resumed sweep's config.
        self.twin, self.base = dict(twin), dict(base)
        self.base_seed, self.max_epochs = base_seed, max_epochs
        self.max_concurrent = max_concurrent
        self.configs: dict[str, dict] = {}  # search trial id -> config
        self.done: dict[str, dict] = {}  # search trial id -> what decides the finalists
        self.queue: list[dict] | None = None  # the extra trials not issued yet, made once
        self.extra: dict[str, bool] = {}  # extra trial id -> complete
        self.finalists: list[str] = []
        self.planned: list[dict] = []  # every extra trial, as {"role", "of", "train.seed"}
        self.roles: dict[str, dict] = {}  # extra trial id -> {"role", "of"}
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if len(self.configs) < self.num_search:
            cfg = self.searcher.suggest(trial_id)
            if cfg == Searcher.FINISHED:
                self.num_search = len(self.configs)  # e.g. a grid used up early
            elif cfg is not None:
                self.configs[trial_id] = cfg
                return cfg
            else:
                return None
        if any(tid not in self.done for tid in self.configs):
            return None  # the finalists are known only when the search is over
        if self.queue is None:
            self.finalists = pick_finalists(self.done, twins=self.twins, max_epochs=self.max_epochs, mode=self.mode)
            self.queue = finalist_trials(self.done, self.configs, twins=self.twins, seeds=self.seeds,
                                         twin=self.twin, base=self.base, base_seed=self.base_seed,
                                         max_epochs=self.max_epochs, mode=self.mode)
            self.planned = [{"role": e[ROLE], "of": e[OF], "train.seed": e["train.seed"]} for e in self.queue]
        if not self.queue:
            return Searcher.FINISHED  # Ray ends the experiment once the trials already issued are done
        if sum(not complete for complete in self.extra.values()) >= self.max_concurrent:
            return None
        self.extra[trial_id] = False
        cfg = self.queue.pop(0)
        self.issued = {**getattr(self, "issued", {}), trial_id: cfg}  # (a state saved before had none)
        if hasattr(self, "roles"):  # (a state saved before the decisions file has none)
            self.roles[trial_id] = {"role": cfg[ROLE], "of": cfg[OF]}
        return cfg

    def forget(self, restored: set[str]) -> int:
        """forget_unrestored for this wrapper: a search trial Ray does not restore leaves `configs` (and the wrapped
        searcher requeues its suggestion); an extra trial goes back to the front of the queue."""
        for t in [t for t in self.configs if t not in restored and t not in self.done]:
            del self.configs[t]
        n = forget_unrestored(self.searcher, restored)
        issued = getattr(self, "issued", {})
        for t in [t for t, complete in self.extra.items() if not complete and t not in restored and t in issued]:
            del self.extra[t]
            getattr(self, "roles", {}).pop(t, None)
            self.queue.insert(0, issued.pop(t))
            n += 1
        return n

    def decisions(self) -> dict | None:
        """Who the finalists are (best first), the extra trials planned for them, and which issued trial is a rerun
        or twin of which; None until the search is over (or for a state saved before the decisions were kept)."""
        if self.queue is None or not hasattr(self, "planned"):
            return None
        return {"metric": self.metric, "mode": self.mode, "search_trials": len(self.configs),
                "finalists": self.finalists, "extra": self.planned, "trials": self.roles}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.configs:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.extra:
            self.extra[trial_id] = True
        if trial_id not in self.configs:
            return
        self.searcher.on_trial_complete(trial_id, result=result, error=error)
        result = result or {}
        self.done[trial_id] = {"error": error, "epoch": result.get("epoch"), "best": result.get(f"best_{self.metric}"),
                               "feasible": is_feasible(getattr(self, "constraints", {}), result)}

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
