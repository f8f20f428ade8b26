"""The sweep's typed config: `ExperimentConfig` plus the sweep section, loaded from YAML with `--set` overrides and
validated completely before any work starts. Errors are one line naming the file and the key.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, field_validator,
                      model_validator)

from search_spaces import load_space
from trainable.config import ExperimentConfig, Section, validation_problem, yaml_load
from trainable.config import set_dotted as _set_dotted
from trainable.tasks import validate_config


class ConfigError(ValueError):
    """A bad config: one line naming the file and the key."""


def check_writable(cfg) -> None:
    """`results_dir` and `cache_dir` can be written (or made) by this user: checked before any work, so that a
    sweep does not train a teacher and then fail to save it. Creates nothing."""
    for key in ("results_dir", "cache_dir"):
        path = Path(getattr(cfg, key)).expanduser().absolute()
        probe = path
        while not probe.exists():  # the nearest existing folder is where it would be made
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError(f"{key}: {path} is not a folder ({probe} is a file)")
        if not os.access(probe, os.W_OK | os.X_OK):
            where = "" if probe == path else f" (it would be made in {probe})"
            raise ConfigError(f"{key}: {path} is not writable by this user{where}")


class SchedulerSection(Section):
    kind: Literal["asha", "none"] = "asha"
    # Epochs every trial gets before it can be stopped. 1, chosen by the search replay (results/benchmarks.md, "The
    # search earns its keep"): on the 8-epoch table, epoch-1 validation ranks configurations as the final test does
    # (Spearman 0.85 overall, 0.95 for heavily distilled students), and TPE with grace 1 beats grace 2 and 3.
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(2.0, gt=1.0)


class ResourcesSection(Section):
    cpu: float = Field(1.0, gt=0.0)  # per trial
    # per trial: 0.25 packs four students on one GPU; auto: as many as the largest trial's memory estimate lets
    # share the cluster's GPU (sweep/plan.py), or the CPU when the cluster has no GPU
    gpu: float | Literal["auto"] = 0.0
    gpu_fallback: bool = False  # no GPU in the cluster: run on CPU instead of refusing

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number of GPUs per trial (e.g. 0.25) or 'auto'")
        if value != value or abs(value) == float("inf"):
            raise ValueError("Input should be a finite number")
        if value < 0:
            raise ValueError("Input should be greater than or equal to 0")
        return float(value)

    @model_validator(mode="after")
    def _check(self) -> "ResourcesSection":
        if self.gpu != "auto" and self.gpu > 1 and self.gpu != int(self.gpu):
            raise ValueError(f"gpu: a trial asking for more than one GPU must ask for a whole number, got {self.gpu}")
        return self


class SweepSection(Section):
    space: Optional[str | dict] = None  # a search-space YAML (path, relative to this config) or one inline
    searcher: Literal["tpe", "random", "grid", "qmc", "gp"] = "tpe"
    # accuracy: the sweep's metric alone; accuracy_and_size / accuracy_and_latency: a Pareto front of the metric and
    # the parameter count / the measured ms per review (latency_ms), both down
    objectives: Literal["accuracy", "accuracy_and_size", "accuracy_and_latency"] = "accuracy"
    # {measure: limit}: a trial is feasible when every measure (a key of its results that the task names in
    # `measures`, e.g. latency_ms, export_kb, size_kb) is at most its limit; "the best" is the best feasible trial
    constraints: dict[str, PositiveFloat] = {}
    metric: Optional[str] = None  # one of the task's metrics (classify: val_acc, val_loss); None: the task's first
    seed: int = 0
    num_samples: Optional[PositiveInt] = None  # None: 16, or the grid's size for a grid search
    max_concurrent: PositiveInt = 2
    scheduler: SchedulerSection = SchedulerSection()
    resources: ResourcesSection = ResourcesSection()
    # After the search, the `twins` best finished students are retrained without the teacher (train.alpha 1,
    # everything else the same): the report's KD-gain column. `finalist_seeds` N: each finalist and each twin is
    # trained with N seeds (the finalist's own search trial is its first), reported as mean +- std.
    twins: NonNegativeInt = 3
    finalist_seeds: PositiveInt = 1
    max_failures: NonNegativeInt = 1  # retries of a trial whose process died (not of one that raised)
    keep_checkpoints: PositiveInt = 2
    reuse_actors: bool = True  # run the next trial in a finished trial's process (saves Ray's per-trial start)
    address: Optional[str] = None  # an existing Ray cluster; None: local Ray on 127.0.0.1
    dashboard: bool = False


class Config(ExperimentConfig):
    sweep: SweepSection = SweepSection()

    @model_validator(mode="after")
    def _check_metric(self) -> "Config":
        task = self.task_def  # set on the task's config class (trainable.tasks.validate_config)
        if task is not None and self.sweep.metric is not None and self.sweep.metric not in task.metrics:
            raise ValueError(f"sweep.metric: task {self.task} has no metric {self.sweep.metric!r} "
                             f"(it reports: {', '.join(task.metrics)})")
        if task is not None:
            measures = ", ".join(task.measures)
            for key in self.sweep.constraints:
                if key in task.metrics:
                    raise ValueError(f"sweep.constraints.{key}: {key} is a metric (what the sweep optimizes), not a "
                                     f"cost; a constraint limits one of: {measures}")
                if key not in task.measures:
                    raise ValueError(f"sweep.constraints.{key}: unknown measure; task {self.task} measures: {measures}")
            if self.sweep.objectives == "accuracy_and_latency" and "latency_ms" not in task.measures:
                raise ValueError(f"sweep.objectives: accuracy_and_latency needs latency_ms, which task {self.task} "
                                 f"does not measure (it measures: {measures})")
        return self


def metric_of(cfg: Config) -> tuple[str, str]:
    """The sweep's metric and its mode: `sweep.metric`, else the task's first."""
    task = cfg.task_def
    metric = cfg.sweep.metric or task.metric
    return metric, task.mode(metric)


# The second objective of each `sweep.objectives`, as a key of the trial's results (minimised). A single-objective
# sweep's report still shows the front over parameters.
SECOND_OBJECTIVE = {"accuracy": "params", "accuracy_and_size": "params", "accuracy_and_latency": "latency_ms"}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings -> {dotted key: YAML-parsed value}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value, e.g. train.epochs=3")
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = yaml_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def set_dotted(raw: dict, key: str, value: Any) -> None:
    try:
        _set_dotted(raw, key, value)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: expected UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: malformed YAML ({problem})") from None


def format_validation_error(origin: str, err: ValidationError) -> str:
    loc, msg = validation_problem(err)
    return f"{origin}: {'.'.join(loc)}: {msg}" if loc else f"{origin}: {msg}"  # a whole-config check names its key


def validate(raw: dict, origin: str) -> Config:
    """The whole config, with its task's section and checks (trainable.tasks.validate_config), or one line."""
    try:
        return validate_config(raw, Config)
    except ValidationError as e:
        raise ConfigError(format_validation_error(origin, e)) from None
    except ValueError as e:  # the task (TaskError) or its checks across sections: the message names the key
        raise ConfigError(f"{origin}: {e}") from None


def load_raw(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The config file as a dict with overrides applied. A bare search-space file (top-level `parameters`) is
    taken as `sweep.space` of an otherwise default config. Relative `sweep.space` paths are made absolute."""
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level, got {type(raw).__name__}")
    if "parameters" in raw or "fixed" in raw:
        raw = {"sweep": {"space": str(path.resolve())}}
    raw = copy.deepcopy(raw)
    space = (raw.get("sweep") or {}).get("space") if isinstance(raw.get("sweep"), dict) else None
    if isinstance(space, str) and not Path(space).is_absolute():
        raw["sweep"]["space"] = str((path.parent / space).resolve())
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(raw, key, value)
    task = raw.get("task")
    if isinstance(task, str) and task.endswith(".py") and not Path(task).is_absolute():
        # A task module beside the config, like a search-space file. (--set task=x.py: relative to the cwd.)
        base = Path.cwd() if "task" in parse_overrides(overrides or []) else path.parent
        raw["task"] = str((base / task).resolve())
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, dict]:
    """The validated config. A search space's `fixed` values hold for every trial, so they are folded into the
    config itself: preparation (data.*), ASHA's max_t (train.epochs) and the planner see what the trials run.
    A --set of a key the space fixes to another value is refused (it would be silently overridden)."""
    raw = load_raw(path, overrides)
    cfg = validate(raw, str(path))
    space = load_space_for(cfg)
    if space is not None and space.fixed:
        for key, value in parse_overrides(overrides or []).items():
            if key in space.fixed and space.fixed[key] != value:
                raise ConfigError(f"--set {key}: the search space {space.origin} fixes it to {space.fixed[key]!r}; "
                                  f"change it in the space's fixed: section")
        cfg = apply_overrides(cfg, space.fixed)
    return cfg, raw


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A new config with {dotted key: value} applied and validated (raises ConfigError naming the key)."""
    raw = cfg.model_dump()
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return validate(raw, "trial")


def load_space_for(cfg: Config):
    """The sweep's search space, every bound and choice checked against the config's rules; None if no space."""
    if cfg.sweep.space is None:
        return None

    def check(overrides: dict[str, Any]) -> Optional[str]:
        try:
            apply_overrides(cfg, overrides)
        except ConfigError as e:
            return str(e).removeprefix("trial: ")
        return None

    space = load_space(cfg.sweep.space, check)
    if cfg.sweep.searcher == "grid" and not space.is_grid:
        bad = next(n for n, p in space.params.items() if p.type != "categorical" or p.when is not None)
        raise ConfigError(f"{space.origin}: parameter {bad}: a grid search needs unconditional categorical "
                          f"parameters only (sweep.searcher is 'grid')")
    return space
