"""The task seam: everything that differs between studies lives in one task module.

A task is a module that defines `TASK`, an instance of a `Task` subclass. The sweep (config, Ray Tune, ASHA,
Optuna, resume, report, export, TensorBoard) takes its metric, its columns and its work from the task, so a new
study is one new module and nothing else. A config names its task with `task:` (default `DEFAULT_TASK`): a built-in
name (`trainable/tasks/<name>.py`) or the path of a `.py` file that defines `TASK` (relative to the config file).

The contract (see `Task` below for the signatures):
- `name`: the task's name, also the top-level config section that holds its own options (`section`, a pydantic
  model; None when the task has none).
- `metrics`: {name: mode} the task reports every epoch; the first is the default `sweep.metric`. `test_key`:
  the held-out score of the best-validation weights, reported beside it.
- `prepare(cfg, log, space)`: the expensive shared inputs, made once on the driver, cached by a hash of what
  produced them. `trial_inputs(prepared)`: what trials receive (once, through Ray's object store).
- `train(cfg, inputs, ..., metric=, mode=)`: one trial, plain PyTorch, no Ray: calls `on_epoch(metrics,
  checkpoint)` after every epoch (the budget step ASHA counts), resumes from a checkpoint folder. `metric`/`mode`
  are the sweep's (`sweep.metric`; None: the task's first): the best weights are those of its best epoch. Most
  tasks build a `trainable.loop.Job` and hand it to `trainable.loop.fit`, which owns epochs, best-weights
  tracking, checkpoints and TensorBoard.
- `columns`: the report table's columns (title -> a dotted config key, or a result key). `report_lines`: the
  task's own lines in the report's summary (classify: its teacher). `run_result`: what `sweep train` writes to
  result.json and the one line it says.
- `export(trial_dir, cfg, row, out, log, state=, params=, int8=)`: a trial as a folder the next stage reads, its
  manifest written by `write_manifest` (`task`, and what `predict` needs, e.g. `num_classes`).
- `predict(folder, texts)`: one JSON-able dict per text of an export; `predictor(folder, runtime=, batch_size=)`
  loads the export once for many texts, in one of the task's `runtimes` (`sweep predict`/`evaluate --runtime`).

numpy and trainable.data/io (they load pyarrow) are imported inside the functions that use them, so loading a task
(every command) does not load them.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import create_model

from ..config import ExperimentConfig, set_dotted

BUILTIN = ("classify", "lm", "tagger", "transformer")
# The task of a config without `task:` (the schema's default), and of an export whose manifest names none.
DEFAULT_TASK: str = ExperimentConfig.model_fields["task"].default
# An export's manifest: what it is (`task`) and what its task's `predict` needs. A task whose config.json is another
# library's (the transformer's: Hugging Face's, with `task` set in it) writes its own as EXTRA_MANIFEST.
MANIFEST, EXTRA_MANIFEST = "config.json", "export.json"


class TaskError(ValueError):
    """A task that cannot be found or loaded: one line naming it."""


def is_builtin(ref) -> bool:
    """Whether a config's `task` names a built-in task, whose loading runs only this package's own code. Any other
    reference (a .py file, a dotted module) is code chosen by whoever wrote the config: a folder we did not write
    (an export, a sweep) may name one, and it runs only when the user asks (`--task`, `--allow-task-code`)."""
    return isinstance(ref, str) and ref in BUILTIN


def has_twin(twin: dict[str, Any], value: Callable[[str], Any]) -> bool:
    """Whether a trial whose resolved config value at a dotted key is `value(key)` gets a no-teacher twin, `twin`
    being what a twin changes (`Task.twin`): there is a teacher to switch off and the trial still trains with it."""
    return bool(twin) and any(value(k) != v for k, v in twin.items())


class Task:
    """Base class of a task. Subclasses set the class attributes and override the methods they need."""

    name: str = ""
    section: Optional[type] = None  # the task's own config section (a trainable.config.Section subclass)
    metrics: dict[str, str] = {}  # metric name -> "max" | "min"; the first is the default
    test_key: Optional[str] = None  # e.g. "test_acc": the best-validation weights' held-out score
    # Report table: column title -> "hp:<dotted config key>", a result key, or "@best" (the best value of the
    # sweep's metric, titled by it), "@step", "@time", "@size"; without "@" entries the report appends the test
    # score, the best metric, step, time, params and size.
    columns: dict[str, str] = {}
    model_label: str = ""  # the report's Model column (default: the task's name)
    # What a finalist's no-teacher twin changes in its config, dotted key -> value (classify: train.alpha 1, the
    # hard labels alone). Empty: the task has no teacher to switch off, so its finalists get no twins.
    twin: dict[str, Any] = {}
    twin_label: str = ""  # how the report names that change (classify: "loss rate 1 (no teacher, no transfer rows)")
    # The finalists table's parameter columns: title -> dotted config key (the report shows each side's value).
    finalist_columns: dict[str, str] = {}
    runtimes: tuple[str, ...] = ("eager",)  # what `--runtime` may name for the task's export (eager, the default)
    description: str = ""

    # What every trial reports besides the metrics, and so what `sweep.constraints` can limit and the report can
    # rank by (trainable.loop.fit reports the parameter count and the weights' KiB every epoch).
    measures: tuple[str, ...] = ("params", "size_kb")

    def __init__(self):
        self.model_label = self.model_label or self.name

    def has_twin(self, value: Callable[[str], Any]) -> bool:
        return has_twin(self.twin, value)

    @property
    def metric(self) -> str:
        return next(iter(self.metrics))

    def mode(self, metric: str | None = None) -> str:
        return self.metrics[metric or self.metric]

    def objective(self, metric: str | None = None, mode: str | None = None) -> tuple[str, str]:
        """(metric, mode) that pick a trial's best weights: the sweep's, else the task's first metric."""
        metric = metric or self.metric
        if metric not in self.metrics:
            raise TaskError(f"task {self.name}: no metric {metric!r} (it reports {', '.join(self.metrics)})")
        return metric, mode or self.metrics[metric]

    def check(self, cfg) -> None:
        """Cross-section checks on a whole validated config; raise ValueError with a one-line reason."""

    def prepare(self, cfg, log: Callable[[str], None], space=None) -> Any:
        raise NotImplementedError

    def trial_inputs(self, prepared) -> dict:
        """Keyword arguments every trial's `train` receives as `inputs` (shipped once through the object store)."""
        return {"prepared": prepared}

    def save_artifacts(self, folder: Path, prepared) -> None:
        """Copies that make the sweep folder self-contained (tokenizers, teacher metrics)."""

    def train(self, cfg, inputs: dict, *, run_dir: Path | None, tb_dir: Path | None, resume_from: Path | None,
              on_epoch: Callable[[dict, Optional[Path]], None] | None, keep_checkpoints: int,
              log: Callable[[str], None], metric: str | None = None, mode: str | None = None):
        raise NotImplementedError

    def run_result(self, result, prepared) -> tuple[dict, str]:
        """`sweep train`'s result.json content and the line it says, from `train`'s result (a
        `trainable.loop.FitResult` for a task that trains through `fit`) and what `prepare` made."""
        out = dataclasses.asdict(result)
        out.pop("history")
        return out, (f"{self.name}: best {result.metric} {result.best:.4f}, test "
                     + ", ".join(f"{k} {v:.4f}" for k, v in result.test.items())
                     + f", params {result.params}, {result.samples_per_s:.0f} samples/s")

    def export(self, trial_dir: Path, cfg, row: dict, out: Path, log: Callable[[str], None], **options) -> None:
        """The trial of `trial_dir` (its report row `row`, its config `cfg`) into the empty folder `out`, with a
        manifest (`write_manifest`). `options`: `state`, the checkpoint to export (its `best_model` weights);
        `params`, the trial's sampled values; `int8`, the user's `--int8`."""
        raise TaskError(f"task {self.name}: export is not supported")

    def predict(self, folder: Path, texts: list[str]) -> list[dict]:
        """One JSON-able dict per text from an exported folder (what `sweep predict` prints); a classifier's
        carry `label` (what `sweep evaluate` scores)."""
        raise TaskError(f"task {self.name}: predict is not supported")

    def predictor(self, folder: Path, *, runtime: str = "eager",
                  batch_size: int = 512) -> Callable[[list[str]], list[dict]]:
        """`predict` over `folder` for many texts: a task whose export is worth loading once, or that has more
        `runtimes` than eager, loads it here (and raises TaskError for a missing file) and returns the function."""
        return lambda texts: self.predict(folder, texts)

    def report_lines(self, folder: Path, cfg) -> list[str]:
        """The task's own lines in the report's summary (classify: its teacher and transfer set)."""
        return []

    def prepared_lines(self, prepared) -> list[str]:
        """What `sweep prepare` says about what `prepare` made, besides its own log (classify: the teacher)."""
        return []

    # The planner (`sweep plan`) and GPU sizing (`sweep.resources.gpu: auto`). A task without them gets trial
    # counts only: no rows, no time estimate, and `gpu: auto` asks for a number instead.
    plan_keys: tuple[str, ...] = ()  # dotted keys a trial's cost depends on (sampled from the space)

    def epoch_rows(self, trial: dict, rows) -> tuple[int, int]:
        """(rows trained on, rows evaluated) in one epoch of `trial`, from the corpus counts `rows`."""
        raise NotImplementedError

    def work_per_row(self, trial: dict) -> float:
        """A trial's relative cost per row, to interpolate the timed trials' speeds between (any monotone size)."""
        return 1.0

    def probe_speed(self, cfg, trial: dict, lengths, budget_s: float) -> dict | None:
        """One short timed run of `trial` through the task's real training loop: {"train_s", "eval_s"} seconds per
        training and per evaluated row, "cpu_share" (the CPU time it got over its wall time). None: not supported."""
        return None

    def gpu_memory(self, cfg, values: Callable[[str], list], rows):
        """(largest trial's description, estimate) of its peak GPU memory (trainable.memory.MemoryEstimate);
        `values(key)`: every value a dotted key can take in a trial. None: not supported."""
        return None


def has_hook(task: Task, name: str) -> bool:
    """Whether `task` implements the optional hook `name` (e.g. "gpu_memory") rather than inheriting `Task`'s."""
    return getattr(type(task), name) is not getattr(Task, name)


def train_task(task: Task, cfg, inputs: dict, *, metric: str | None, mode: str | None, log: Callable[[str], None],
               warn: Callable[[str], None] | None = None, **kwargs):
    """`task.train` told the sweep's metric and mode. A task file written before `train` took them keeps its own
    choice of best weights, said in `warn` (default `log`), rather than failing every trial."""
    params = inspect.signature(task.train).parameters
    if "metric" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return task.train(cfg, inputs, metric=metric, mode=mode, log=log, **kwargs)
    (warn or log)(f"warning: task {task.name}: train() takes no metric/mode, so its best weights follow its own "
                  f"choice, not {metric!r}")
    return task.train(cfg, inputs, log=log, **kwargs)


def text_splits(data_cfg, rows_values: list, val_rows: int, test_rows: int) -> tuple[dict[str, list[str]], str]:
    """Unlabeled reviews from `data.transfer_file`, split once with `data.seed`: {"val", "test", "train"} and a key
    that names them (file hash, seed, sizes) for caches. `rows_values`: every training size a trial can ask for
    (None: all the rest); the largest is prepared and a smaller trial takes its first rows (nested subsets)."""
    import numpy as np

    from ..data import locate_transfer, read_texts
    from ..io import sha256_file, sha256_json

    path = locate_transfer(data_cfg)
    texts = read_texts(path, data_cfg.text_column)
    if len(texts) < val_rows + test_rows + 1:
        raise TaskError(f"data.transfer_file: {path} has {len(texts)} reviews; val_rows + test_rows need "
                        f"{val_rows + test_rows + 1} or more")
    rest = len(texts) - val_rows - test_rows
    n_train = rest if any(r is None for r in rows_values) else min(max(rows_values), rest)
    order = np.random.default_rng(data_cfg.seed).permutation(len(texts))
    pick = {"val": order[:val_rows], "test": order[val_rows:val_rows + test_rows],
            "train": order[val_rows + test_rows:val_rows + test_rows + n_train]}
    key = sha256_json({"file": sha256_file(path), "seed": data_cfg.seed, "val": val_rows, "test": test_rows,
                       "train": n_train})
    return {k: [texts[i] for i in v] for k, v in pick.items()}, key


def fmt_number(v, nd: int = 4) -> str:
    """A number as the report prints it (nd significant digits, trailing zeros dropped; "-" for none or NaN), for the
    lines a task adds to it (`report_lines`)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.{nd}f}".rstrip("0").rstrip(".")
    return str(v)


def write_manifest(folder: Path, task: str, fields: dict, file: str = MANIFEST) -> None:
    """An export's manifest, `folder/file` (MANIFEST, or EXTRA_MANIFEST beside another library's config.json):
    `task` and `fields` (what the task's `predict` needs to rebuild the model; `num_classes` for a classifier)."""
    from ..io import write_json

    write_json(Path(folder) / file, {"task": task, **fields})


def read_manifest(folder: Path) -> dict:
    """An export's manifest: config.json, with EXTRA_MANIFEST's keys over it where there is one; `task` is
    DEFAULT_TASK where neither names one (a student exported before its manifest named its task, or a folder with
    neither file). TaskError, naming the file, for one that is not a JSON object."""
    meta: dict = {}
    for name in (MANIFEST, EXTRA_MANIFEST):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise TaskError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise TaskError(f"{path}: expected a JSON object (an export's description), got {type(data).__name__}")
        meta.update(data)
    return {"task": DEFAULT_TASK, **meta}


_loaded: dict[str, Task] = {}
_models: dict[tuple, type] = {}


def config_model(task: Task, base: type) -> type:
    """`base` (trainable.config.ExperimentConfig, or sweep.config.Config) with the task's own section as a field
    named after the task, and the task as `task_def`: the class a config of this task validates with."""
    key = (base, task.name, id(task))
    if key not in _models:
        fields = {task.name: (task.section, task.section())} if task.section is not None else {}
        model = create_model(f"{base.__name__}_{task.name}", __base__=base, **fields)
        model.task_def = task
        model.__reduce__ = _reduce  # pickled (e.g. in a Ray trial) as its data, validated again when loaded
        _models[key] = model
    return _models[key]


def _reduce(cfg):
    return _rebuild, (type(cfg).__mro__[1], cfg.model_dump())


def _rebuild(base: type, raw: dict):
    return validate_config(raw, base)


def validate_config(raw: dict, base: type | None = None):
    """A whole config validated: the task it names loaded (TaskError), its section validated by the task's model
    and every other unknown key refused (pydantic's ValidationError), then the task's checks across sections
    (ValueError). `base`: the schema (default trainable.config.ExperimentConfig)."""
    base = base or ExperimentConfig
    ref = raw.get("task", DEFAULT_TASK) if isinstance(raw, dict) else DEFAULT_TASK
    if not isinstance(ref, str):
        raise TaskError(f"task: expected a task name or a .py file, got {ref!r}")
    task = load_task(ref)
    for key in raw:
        if key in BUILTIN and key != task.name and key not in base.model_fields:
            raise TaskError(f"{key}: unknown key (task {ref} has no section {key!r})")
    cfg = config_model(task, base).model_validate(raw)
    task.check(cfg)
    return cfg


def config_from_trial(base: dict, trial: dict[str, Any]):
    """The base config with a trial's dotted keys applied, validated with its task; keys without a dot (bundle
    labels) are ignored."""
    raw = copy.deepcopy(base)
    for key, value in trial.items():
        if "." in key:
            set_dotted(raw, key, value)
    return validate_config(raw)


def load_task(ref: str) -> Task:
    """The task a config names: a built-in name, a dotted module path, or a `.py` file defining `TASK`."""
    if ref in _loaded:
        return _loaded[ref]
    if ref.endswith(".py"):
        path = Path(ref)
        if not path.is_file():
            raise TaskError(f"task: {ref}: file not found (a task module is a .py file defining TASK)")
        # A stable module name per file, so a worker that receives the module by value and the driver agree.
        name = "kd_task_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise TaskError(f"task: {ref}: could not be loaded ({type(e).__name__}: {e})") from None
    else:
        modname = f"trainable.tasks.{ref}" if ref in BUILTIN else ref
        if ref not in BUILTIN and "." not in ref:
            raise TaskError(f"task: unknown task {ref!r} (built in: {', '.join(BUILTIN)}; or the path of a .py "
                            f"file that defines TASK)")
        try:
            module = importlib.import_module(modname)
        except ImportError as e:
            raise TaskError(f"task: {ref}: cannot be imported ({e})") from None
    task = getattr(module, "TASK", None)
    if not isinstance(task, Task):
        raise TaskError(f"task: {ref}: the module defines no TASK (an instance of trainable.tasks.Task)")
    if not task.metrics:
        raise TaskError(f"task: {ref}: TASK.metrics is empty (name -> 'max' or 'min')")
    _loaded[ref] = task
    return task
