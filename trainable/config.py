"""The typed configuration of one distillation experiment: data, tokenizer, teacher, student, training.

Every section is a pydantic model that rejects unknown keys and wrong types, so a config is validated completely
before any work starts. Constructing a config has no side effects (no folders made, no files opened).
`sweep/config.py` adds the sweep section and the YAML/CLI loading on top of `ExperimentConfig`.
"""
from __future__ import annotations

import copy
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

NSMC_URL = "https://raw.githubusercontent.com/e9t/nsmc/master/"


class Section(BaseModel):
    # strict: "3" is not an int and 1 is not a bool; floats accept ints (1 -> 1.0) because YAML users write `lr: 1`.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataConfig(Section):
    """Where the corpus is and how it is split. NSMC-format TSV by default; any CSV/TSV/Parquet with named columns."""

    dir: str = "data/nsmc"
    # Local copies looked at (in order) before `dir`, e.g. a shared read-only folder; read in place, never copied.
    mirrors: list[str] = []
    train_file: str = "ratings_train.txt"
    test_file: str = "ratings_test.txt"
    download: bool = True  # fetch the published NSMC files into `dir` when no copy is found
    url: str = NSMC_URL
    text_column: str = "document"
    label_column: str = "label"
    id_column: Optional[str] = "id"  # None: the row number is the id
    num_classes: int = Field(2, ge=2)
    train_rows: Optional[PositiveInt] = None  # a seeded random subset of train (before the validation split)
    test_rows: Optional[PositiveInt] = None
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = 0


class TokenizerConfig(Section):
    """The student's WordPiece tokenizer, trained on the training split."""

    vocab_size: int = Field(3000, ge=100)
    max_length: PositiveInt = 128  # longer reviews are truncated
    min_frequency: PositiveInt = 2
    limit_alphabet: PositiveInt = 1500  # keeps the Korean alphabet inside the vocab size


class TeacherConfig(Section):
    """A Hugging Face sequence classifier: `scratch` (built from a preset and trained here), a hub id or a local path."""

    source: str = "scratch"
    preset: Literal["tiny", "small", "base"] = "small"  # scratch only
    arch: Literal["bert", "electra"] = "electra"  # scratch only
    vocab_size: int = Field(8000, ge=100)  # scratch only: the teacher's own WordPiece vocabulary
    epochs: PositiveInt = 1
    lr: Optional[PositiveFloat] = None  # None: 5e-4 for scratch, 5e-5 for a pretrained model
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 128
    max_length: PositiveInt = 128
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    trust_remote_code: bool = False  # never run code shipped with a model unless asked

    @property
    def is_scratch(self) -> bool:
        return self.source == "scratch"

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (5e-4 if self.is_scratch else 5e-5)


class StudentConfig(Section):
    """BiLSTM student: embedding -> bidirectional LSTM -> dropout -> linear."""

    embedding_dim: PositiveInt = 64
    hidden_dim: PositiveInt = 128
    num_layers: PositiveInt = 1
    dropout: float = Field(0.3, ge=0.0, lt=1.0)


class TrainConfig(Section):
    """The student's training: Adam, StepLR or CyclicLR, the distillation loss."""

    epochs: PositiveInt = 5
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    betas: tuple[float, float] = Field((0.9, 0.999), strict=False)  # YAML gives a list
    eps: PositiveFloat = 1e-8
    scheduler: Literal["step", "cyclic"] = "step"
    step_size: PositiveInt = 5  # StepLR: epochs between decays
    gamma: PositiveFloat = 0.9
    base_lr: PositiveFloat = 1e-4  # CyclicLR lower bound; the upper bound is `lr`
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # "loss rate": weight of the hard-label CE
    temperature: PositiveFloat = 2.0
    kd_kind: Literal["kl", "mse"] = "kl"
    seed: int = 0
    threads: Optional[PositiveInt] = None  # torch intra-op threads; None: leave torch's default
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU Ray gave the trial, else the CPU
    eval_batch_size: PositiveInt = 512

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError("betas must both lie in [0, 1)")
        if self.scheduler == "cyclic" and self.base_lr > self.lr:
            raise ValueError(f"base_lr ({self.base_lr}) must not exceed lr ({self.lr}) for the cyclic scheduler")
        return self


class ExperimentConfig(Section):
    """Everything one distillation run needs. `sweep/config.py` extends it with the sweep section."""

    name: str = Field("kd", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    cache_dir: str = ".cache/kd"  # tokenizers, encoded data, teachers, logits (content-addressed)
    results_dir: str = "results"


def yaml_load(text: str):
    """yaml.safe_load, except that `1e-3` is a float (YAML 1.1 wants `1.0e-3` and would return a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"),
        list("-+0123456789."),
    )
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def set_dotted(raw: dict, key: str, value) -> None:
    """raw["a"]["b"] = value for key "a.b", making sections as needed."""
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def config_from_trial(base: dict, trial: dict[str, Any]) -> ExperimentConfig:
    """The base config with the trial's dotted keys applied; keys without a dot (bundle labels) are ignored."""
    raw = copy.deepcopy(base)
    for key, value in trial.items():
        if "." in key:
            set_dotted(raw, key, value)
    return ExperimentConfig.model_validate(raw)
