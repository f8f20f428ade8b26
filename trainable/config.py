"""The typed configuration of one distillation experiment: data, tokenizer, teacher, student, training.

Every section is a pydantic model that rejects unknown keys and wrong types, so a config is validated completely
before any work starts. Constructing a config has no side effects (no folders made, no files opened).
`sweep/config.py` adds the sweep section and the YAML/CLI loading on top of `ExperimentConfig`.

yaml is imported inside the function that reads YAML, so the schema loads with pydantic alone.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Literal, Optional

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError,
                      model_validator)

NSMC_URL = "https://raw.githubusercontent.com/e9t/nsmc/master/"


class Section(BaseModel):
    # strict: "3" is not an int and 1 is not a bool; floats accept ints (1 -> 1.0) because YAML users write `lr: 1`.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class AugmentConfig(Section):
    """A transfer set made from the labelled training reviews when no unlabeled text exists (Tang et al. 2019,
    "Distilling Task-Specific Knowledge from BERT into Simple Neural Networks"): each augmented copy masks every
    word with probability `mask_prob` and, with probability `ngram_prob`, is cut down to a random n-gram of
    1..`max_ngram` words. The teacher labels the copies; the student learns from those soft labels only."""

    samples: NonNegativeInt = 0  # augmented copies per labelled training review (0: off)
    mask_prob: float = Field(0.1, ge=0.0, le=1.0)
    ngram_prob: float = Field(0.25, ge=0.0, le=1.0)
    max_ngram: PositiveInt = 5
    seed: int = 0


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
    # Transfer set: unlabeled text the teacher labels once and the student learns from (soft labels only).
    # TSV/CSV/Parquet with `text_column`, or plain text with one review per line. A relative path is looked up in
    # `mirrors` and `dir` (beside the corpus) before the working directory.
    transfer_file: Optional[str] = None
    transfer_rows: Optional[NonNegativeInt] = None  # a seeded subset (nested: 20K rows lie inside 50K); None: all
    augment: AugmentConfig = AugmentConfig()


class TokenizerConfig(Section):
    """The student's WordPiece tokenizer, trained on the training split."""

    vocab_size: int = Field(3000, ge=100)
    max_length: PositiveInt = 128  # longer reviews are truncated
    min_frequency: PositiveInt = 2
    limit_alphabet: PositiveInt = 1500  # keeps the Korean alphabet inside the vocab size
    train_on_transfer: bool = False  # also train the tokenizer on the transfer set's text
    # A tokenizer.json to use instead of training one, e.g. an exported language model's (student.init_from needs
    # the LM's own tokenizer, so that token ids mean the same words). `vocab_size` is then ignored.
    file: Optional[str] = None


class PretrainConfig(Section):
    """Masked-LM pre-training of a scratch transformer teacher on unlabeled text, before it is fine-tuned
    (transformers' own MaskedLM model and DataCollatorForLanguageModeling). Cached by a hash of its inputs."""

    steps: NonNegativeInt = 0  # optimizer steps; 0: no pre-training
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 5e-4
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0)
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    rows: Optional[PositiveInt] = None  # texts to draw from (seeded subset of transfer + training text); None: all


class NgramConfig(Section):
    """An n-gram teacher: TF-IDF features and logistic regression (scikit-learn). Strong and cheap on a CPU."""

    analyzer: Literal["chars_words", "morphemes"] = "chars_words"  # morphemes: Korean morphemes (kiwipiepy)
    max_features: PositiveInt = 400_000  # per vectorizer
    C: PositiveFloat = 4.0  # inverse regularisation strength


class BiLSTMTeacherConfig(Section):
    """A wide BiLSTM teacher trained here with the student loop (no distillation), saved like an exported student."""

    embedding_dim: PositiveInt = 128
    hidden_dim: PositiveInt = 256
    dropout: float = Field(0.3, ge=0.0, lt=1.0)


TEACHER_KINDS = ("scratch", "ngram", "bilstm")  # built here; any other source is a hub id or a local folder


class TeacherConfig(Section):
    """The teacher, or an ensemble of teachers.

    `source` is one teacher or a list of members. A member is built here (`scratch`: a BERT/ELECTRA from a preset;
    `ngram`: TF-IDF + logistic regression; `bilstm`: a wide BiLSTM) or loaded (a hub id, a `save_pretrained`
    folder, or a student folder made by `sweep export`). A list entry is a source string or a mapping of this
    section's keys, which override the section's own values for that member, e.g.
    `source: [ngram, {source: bilstm, epochs: 3, vocab_size: 3000}]`.
    An ensemble's logits are the weighted mean of its members' log-probabilities (`weights`, or chosen on the
    validation split when not given).
    """

    source: str | list[str | dict[str, Any]] = "scratch"
    weights: Optional[list[float]] = None  # ensemble weights, one per member; None: chosen on validation
    preset: Literal["tiny", "small", "base"] = "small"  # scratch only
    arch: Literal["bert", "electra"] = "electra"  # scratch only
    vocab_size: int = Field(8000, ge=100)  # scratch and bilstm: the teacher's own WordPiece vocabulary
    epochs: NonNegativeInt = 1  # 0: use a loaded model as it is
    lr: Optional[PositiveFloat] = None  # None: 2e-4 scratch, 1e-3 bilstm, 5e-5 pretrained
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 128
    max_length: PositiveInt = 128
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    trust_remote_code: bool = False  # never run code shipped with a model unless asked
    threads: Optional[PositiveInt] = None  # torch threads while building; None: torch's default
    pretrain: PretrainConfig = PretrainConfig()
    ngram: NgramConfig = NgramConfig()
    bilstm: BiLSTMTeacherConfig = BiLSTMTeacherConfig()

    @model_validator(mode="after")
    def _check(self) -> "TeacherConfig":
        if isinstance(self.source, list):
            if not self.source:
                raise ValueError("source: an empty list; give one teacher or several")
            for i, entry in enumerate(self.source):
                if isinstance(entry, dict) and "source" not in entry:
                    raise ValueError(f"source[{i}]: a member mapping needs its own 'source'")
                if isinstance(entry, dict) and isinstance(entry["source"], list):
                    raise ValueError(f"source[{i}]: a member cannot itself be an ensemble")
                if isinstance(entry, dict) and "weights" in entry:
                    raise ValueError(f"source[{i}]: weights belong to the ensemble, not to a member")
            self.members()  # every member validates on its own (errors name the member)
        if self.weights is not None:
            n = len(self.source) if isinstance(self.source, list) else 1
            if len(self.weights) != n:
                raise ValueError(f"weights: {len(self.weights)} given for {n} teacher(s)")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights: expected non-negative numbers with a positive sum")
        return self

    def members(self) -> list["TeacherConfig"]:
        """One config per teacher: the section's values with the member's own on top."""
        if not isinstance(self.source, list):
            return [self]
        base = self.model_dump(exclude={"source", "weights"})
        out = []
        for i, entry in enumerate(self.source):
            raw = dict(entry) if isinstance(entry, dict) else {"source": entry}
            merged = {**base, **{k: v for k, v in raw.items() if not isinstance(v, dict)}}
            for k, v in raw.items():  # nested sections merge key by key
                if isinstance(v, dict):
                    merged[k] = {**base.get(k, {}), **v}
            try:
                out.append(TeacherConfig.model_validate(merged))
            except ValidationError as e:  # re-raised naming the member
                loc, msg = validation_problem(e)
                raise ValueError(f"source[{i}]: {'.'.join(loc)}: {msg}") from None
        return out

    @property
    def is_ensemble(self) -> bool:
        return isinstance(self.source, list) and len(self.source) > 1

    @property
    def is_scratch(self) -> bool:
        return self.source == "scratch"

    @property
    def kind(self) -> str:
        """scratch / ngram / bilstm (built here), or pretrained (a hub id or a folder)."""
        return self.source if self.source in TEACHER_KINDS else "pretrained"

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return {"scratch": 2e-4, "bilstm": 1e-3}.get(self.kind, 5e-5)


class StudentConfig(Section):
    """BiLSTM student: embedding -> bidirectional LSTM -> dropout -> linear."""

    embedding_dim: PositiveInt = 64
    hidden_dim: PositiveInt = 128
    num_layers: PositiveInt = 1
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    # An exported LSTM language model (task lm, `sweep export`) whose embedding, and LSTM when the hidden size
    # matches, initialise the student's embedding and forward LSTM; with tokenizer.file its tokenizer.json.
    init_from: Optional[str] = None


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
    """Everything one run needs. `sweep/config.py` extends it with the sweep section.

    `task` names the study (trainable/tasks/): `classify` (distillation into a BiLSTM classifier, the default) or
    another task, whose own options live in a top-level section named after it (e.g. `lm:`). A task reads the
    shared sections it needs (`data`, `train`, ...) and ignores the others. `trainable.tasks.validate_config`
    validates a whole config, its task's section and checks included."""

    task: str = "classify"  # the default task, one place: trainable.tasks.DEFAULT_TASK reads it from here
    name: str = Field("kd", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    cache_dir: str = ".cache/kd"  # tokenizers, encoded data, teachers, logits (content-addressed)
    results_dir: str = "results"

    # The task's own section is a field of the task's config class, which the task loader derives from this one
    # (trainable.tasks.validate_config): this schema knows no task, and validated alone it has no task_def.
    task_def: ClassVar[Any] = None


def validation_problem(err, with_input: bool = True) -> tuple[list[str], str]:
    """The first error of a pydantic ValidationError in our one-line wording: (its location, the message). The one
    formatter of config, search-space and trial errors (callers add the file or key they were reading)."""
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    if e["type"] == "extra_forbidden":
        return loc, "unknown key"
    if e["type"] == "missing":
        return loc, "required key is missing"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    if with_input and loc and not isinstance(got, dict):
        msg += f" (got {got!r})"
    return loc, msg


def yaml_load(text: str):
    """yaml.safe_load, except that `1e-3` is a float (YAML 1.1 wants `1.0e-3` and would return a string)."""
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
