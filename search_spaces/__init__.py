"""Search spaces are data: YAML files in this folder, turned by this loader into an Optuna define-by-run function
(which only samples) or, for a grid search, into the grid.

    parameters:                       # sampled in this order
      student.hidden_dim: {type: int, low: 16, high: 256, log: true}
      train.alpha:        {type: float, low: 0.0, high: 1.0}
      train.temperature:  {type: float, low: 1.0, high: 10.0, log: true, when: {train.alpha: {lt: 1.0}}}
      train.scheduler:    {type: categorical, choices: [step, cyclic]}
      train.base_lr:      {type: float, low: 1.0e-5, high: 1.0e-3, log: true, when: {train.scheduler: cyclic}}
      dims:                             # a bundle: each choice sets several keys at once
        type: categorical
        choices: {h256_e128: {student.hidden_dim: 256, student.embedding_dim: 128}, ...}
    fixed:
      tokenizer.vocab_size: 3000

Parameter names are dotted config keys (names without a dot are bundles). `when` makes a parameter conditional on
an earlier one: a value, a list of values, or a comparison {lt, le, gt, ge, ne: x}. Inactive parameters keep the
config's value. Every bound and choice is checked against the config's own rules, so a negative dim, a
temperature <= 0 or a loss rate outside [0, 1] is refused with the parameter and the file named.

yaml is imported inside the function that reads a space file, so importing this module (every command does) does not
load it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from trainable.config import validation_problem, yaml_load

HERE = Path(__file__).parent
Scalar = Union[bool, int, float, str]


class SpaceError(ValueError):
    """A bad search space: one line naming the file and the parameter."""


class Param(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    type: Literal["int", "float", "categorical"]
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[Union[list[Scalar], dict[str, dict[str, Any]]]] = None
    when: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _check(self) -> "Param":
        if self.type == "categorical":
            if self.choices is None or len(self.choices) == 0:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes 'choices', not low/high")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"an {self.type} parameter needs 'low' and 'high'")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) > high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError(f"a log-scaled parameter needs low > 0, got {self.low}")
            if self.log and self.step is not None:
                raise ValueError("'log' and 'step' cannot be combined")
            if self.step is not None and self.step <= 0:
                raise ValueError(f"step must be > 0, got {self.step}")
            if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
                raise ValueError("an int parameter needs whole-number bounds")
            if self.choices is not None:
                raise ValueError(f"an {self.type} parameter takes low/high, not 'choices'")
        return self

    def extremes(self) -> list[Any]:
        if self.type == "categorical":
            return list(self.choices.values()) if isinstance(self.choices, dict) else list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


class SpaceFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    description: Optional[str] = None
    parameters: dict[str, Param] = {}
    fixed: dict[str, Any] = {}


def _active(cond: dict[str, Any], values: dict[str, Any]) -> bool:
    for key, want in cond.items():
        if key not in values:
            return False
        got = values[key]
        if isinstance(want, dict):
            ops = {"lt": got.__lt__, "le": got.__le__, "gt": got.__gt__, "ge": got.__ge__, "ne": got.__ne__}
            if not all(ops[op](x) for op, x in want.items()):
                return False
        elif isinstance(want, list):
            if got not in want:
                return False
        elif got != want:
            return False
    return True


@dataclass(frozen=True)
class Space:
    origin: str
    params: dict[str, Param]
    fixed: dict[str, Any]

    @property
    def is_grid(self) -> bool:
        return all(p.type == "categorical" and p.when is None for p in self.params.values())

    def grid(self) -> dict[str, list]:
        """For Optuna's GridSampler: {name: choice labels}."""
        return {n: (list(p.choices) if isinstance(p.choices, dict) else list(p.choices)) for n, p in self.params.items()}

    def grid_size(self) -> int:
        return math.prod(len(p.choices) for p in self.params.values())

    def expand(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Sampled values (bundle labels included) -> {dotted config key: value}, fixed values included."""
        out = dict(self.fixed)
        for name, value in sampled.items():
            p = self.params.get(name)
            if p is not None and isinstance(p.choices, dict):
                out.update(p.choices[value])
            elif "." in name:
                out[name] = value
        return out

    def searched_keys(self) -> list[str]:
        """The config keys the space samples, in its order (a choice of bundles: each bundle's keys); not `fixed`."""
        keys: list[str] = []
        for name, p in self.params.items():
            for key in ([k for c in p.choices.values() for k in c] if isinstance(p.choices, dict) else [name]):
                if key not in keys:
                    keys.append(key)
        return keys

    def define_by_run(self) -> "DefineByRun":
        """An Optuna define-by-run function: samples (conditionally), does no work, returns the config overrides."""
        return DefineByRun(self)

    def values_of(self, key: str, numeric_ok: bool = False) -> list[Any]:
        """Every value `key` can take in this space (for preparing one encoding per student vocab size); with
        `numeric_ok`, an int/float parameter gives its bounds."""
        vals = []
        if key in self.fixed:
            vals.append(self.fixed[key])
        for name, p in self.params.items():
            if name == key and p.type == "categorical":
                vals += list(p.choices)
            elif name == key and numeric_ok:
                vals += p.extremes()
            elif name == key:
                raise SpaceError(f"{self.origin}: {key}: must be categorical (each value needs its own tokenizer)")
            elif isinstance(p.choices, dict):
                vals += [c[key] for c in p.choices.values() if key in c]
        return vals

    def on_edge(self, overrides: dict[str, Any], tol: float = 0.05) -> list[str]:
        """Names of numeric parameters whose value lies within `tol` (fraction of the range, log-aware) of a bound."""
        edges = []
        for name, p in self.params.items():
            if p.type == "categorical" or name not in overrides or p.high == p.low:
                continue
            v, lo, hi = overrides[name], p.low, p.high
            if p.log:
                v, lo, hi = math.log(v), math.log(lo), math.log(hi)
            frac = (v - lo) / (hi - lo)
            if frac <= tol:
                edges.append(f"{name} at its lower bound {p.low:g}")
            elif frac >= 1 - tol:
                edges.append(f"{name} at its upper bound {p.high:g}")
        return edges


@dataclass(frozen=True)
class DefineByRun:
    """A picklable define-by-run function (Ray saves the searcher, and with it this, in the sweep's state)."""

    space: Space

    def __call__(self, trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, p in self.space.params.items():
            if p.when is not None and not _active(p.when, {**values, **self.space.expand(values)}):
                continue
            if p.type == "int":
                values[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            elif p.type == "float":
                values[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
            else:
                choices = list(p.choices) if isinstance(p.choices, dict) else p.choices
                values[name] = trial.suggest_categorical(name, choices)
        return self.space.expand(values)


def load_space(source: str | Path | dict, check: Callable[[dict[str, Any]], Optional[str]] | None = None,
               origin: str | None = None) -> Space:
    """Load and validate a space from a YAML path, a name in this folder, or an inline mapping.

    `check(overrides)` validates one assignment against the config and returns an error message or None.
    """
    import yaml


    if isinstance(source, dict):
        raw, origin = source, origin or "sweep.space"
    else:
        path = Path(source)
        if not path.is_file() and (HERE / path).is_file():
            path = HERE / path
        origin = origin or str(path)
        if not path.is_file():
            raise SpaceError(f"{origin}: search-space file not found")
        try:
            raw = yaml_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise SpaceError(f"{origin}{':' + str(mark.line + 1) if mark else ''}: malformed YAML") from None
        if isinstance(raw, dict) and "sweep" in raw and isinstance(raw["sweep"], dict):
            raw = raw["sweep"].get("space") or {}  # a full sweep config with an inline space
    if not isinstance(raw, dict):
        raise SpaceError(f"{origin}: expected a mapping with 'parameters' and 'fixed'")
    try:
        spec = SpaceFile.model_validate(raw)
    except ValidationError as e:
        loc, msg = validation_problem(e, with_input=False)
        name = loc[1] if len(loc) > 1 and loc[0] == "parameters" else ".".join(loc)
        if msg == "unknown key":
            msg = f"unknown key '{loc[-1]}'"
        raise SpaceError(f"{origin}: parameter {name}: {msg}") from None
    seen: set[str] = set(spec.fixed)
    for name, p in spec.parameters.items():
        for dep in (p.when or {}):
            if dep not in seen:
                raise SpaceError(f"{origin}: parameter {name}: 'when' refers to {dep}, which is not an earlier parameter")
        seen.add(name)
        if isinstance(p.choices, dict):
            seen.update(k for c in p.choices.values() for k in c)
    space = Space(origin, dict(spec.parameters), dict(spec.fixed))
    if check is not None:
        err = check(space.fixed)
        if err:
            raise SpaceError(f"{origin}: fixed: {err}")
        for name, p in spec.parameters.items():
            for value in p.extremes():
                overrides = value if isinstance(value, dict) else {name: value}
                if "." not in name and not isinstance(value, dict):
                    raise SpaceError(f"{origin}: parameter {name}: not a config key (use a dotted name like train.lr)")
                err = check({**space.fixed, **overrides})
                if err:
                    raise SpaceError(f"{origin}: parameter {name}: {err}")
    return space
