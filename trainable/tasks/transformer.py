"""The transformer task (the seed's "small transformer, pre-trained then fine-tuned" study, and our teacher search):
a small BERT or ELECTRA, optionally pre-trained with masked-LM on unlabeled reviews, fine-tuned as a sentiment
classifier on the labelled corpus.

Data: the labelled corpus of the `data` section (train/validation/test, `data.train_rows`/`test_rows` subsets) and,
for pre-training, `transformer.pretrain_rows` reviews of `data.transfer_file` (a seeded subset: the same order the
classify task takes its transfer rows in, so fewer rows lie inside more). One WordPiece tokenizer per vocab size the
space can draw, trained on the training split and shared with a scratch teacher through the tokenizer cache
(trainable/data.py); each split encoded once as [CLS] w1 .. wn [SEP] (the teacher's own format), cached by a hash of
the corpus, the tokenizer and the longest `max_length` a trial can ask for (a shorter trial cuts its copy).

Model: transformers' own BertForSequenceClassification / ElectraForSequenceClassification of the trial's shape:
`n_layer` layers of `n_head` heads of `d_head` dims (hidden = n_head * d_head, intermediate = 4 * hidden; ELECTRA's
embedding size = hidden). With `pretrain_steps` > 0 its encoder is first trained as a *ForMaskedLM on the unlabeled
reviews by trainable/pretrain.py (`pretrain_encoder`: BERT's 80/10/10 masking, AdamW, warm-up; cached under
`cache_dir/pretrained/` by a hash of the shape, tokenizer, texts, settings and seed, so trials that differ only in
fine-tuning share one pre-trained encoder), then fine-tuned with `trainable.loop.fit`: length-bucketed batches,
cross-entropy, the `train` section's Adam and StepLR/CyclicLR, gradient clipping.

Metric: validation accuracy (`val_acc`, max), `val_loss` beside it; `test_acc` of the best-validation weights.
The budget step ASHA counts is one fine-tuning epoch over the labelled training rows. Pre-training happens once,
before epoch 1, and is not part of any epoch: a trial resumed from a checkpoint (epoch >= 1) holds the fine-tuned
weights and never pre-trains again; one killed during pre-training starts over (or hits the pre-training cache
if the encoder was saved). Its final MLM loss and time are reported as `pretrain_loss` and `pretrain_time_s`.

Export: a `save_pretrained` folder (model and a PreTrainedTokenizerFast) that a classify config loads as its
teacher (`teacher.source: <folder>`, `teacher.epochs: 0`), plus `export.json` (where it came from, its
accuracies); `sweep predict` labels texts with it.

transformers, tokenizers and trainable.data/io/cache/loop/pretrain/teacher (they load pyarrow or transformers) are
imported inside the functions that use them, so loading this task with a config does not load them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from ..config import PretrainConfig, Section, TokenizerConfig
from ..student import count_params, state_dict_kb
from . import EXTRA_MANIFEST, Task, write_manifest

CLS, SEP = 2, 3  # in trainable.data.SPECIAL_TOKENS: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4
MIN_POSITIONS = 512  # position embeddings, at least (as a scratch teacher): a teacher config may ask for longer input


class TransformerConfig(Section):
    """The transformer's shape, its masked-LM pre-training and its sequence length."""

    arch: Literal["bert", "electra"] = "bert"
    n_layer: PositiveInt = 2
    n_head: PositiveInt = 4
    d_head: PositiveInt = 32  # hidden = n_head * d_head; intermediate = 4 * hidden
    vocab_size: int = Field(8000, ge=100)  # the WordPiece vocabulary, trained on the training split
    max_length: int = Field(64, ge=4)  # tokens per review with [CLS] and [SEP] (longer reviews are cut)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # hidden and attention dropout, pre-training and fine-tuning
    clip: PositiveFloat = 1.0  # gradient norm clipping while fine-tuning
    pretrain_steps: NonNegativeInt = 1000  # masked-LM optimizer steps before fine-tuning; 0: none
    pretrain_lr: PositiveFloat = 5e-4
    pretrain_batch_size: PositiveInt = 64
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    pretrain_rows: Optional[PositiveInt] = 50_000  # unlabeled reviews drawn from data.transfer_file; None: all

    @property
    def hidden(self) -> int:
        return self.n_head * self.d_head


@dataclass(frozen=True)
class TransformerData:
    """The labelled splits of one vocabulary, encoded as [CLS] ids [SEP] (labels in `EncodedSplit.labels`)."""

    train: object  # trainable.data.EncodedSplit
    val: object
    test: object
    vocab_size: int  # the tokenizer's real size (it can exceed the asked size: the alphabet is kept whole)
    tokenizer_json: str  # tokenizers.Tokenizer.to_str(), with the [CLS] $A [SEP] post-processor
    max_length: int  # what the splits were encoded with: the longest any trial asks for


# ----------------------------------------------------------------------------- building blocks


def hf_tokenizer(tokenizer_json: str, max_length: int):
    """A PreTrainedTokenizerFast over a WordPiece tokenizer.json (as a scratch teacher's, trainable/teacher.py)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tokenizer_json)
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


def build_classifier(c: TransformerConfig, vocab_size: int, num_classes: int, seed: int):
    """A randomly initialised BERT/ELECTRA sequence classifier of the config's shape."""
    from transformers import BertConfig, BertForSequenceClassification, ElectraConfig, ElectraForSequenceClassification

    common = dict(vocab_size=vocab_size, hidden_size=c.hidden, num_hidden_layers=c.n_layer,
                  num_attention_heads=c.n_head, intermediate_size=4 * c.hidden, hidden_dropout_prob=c.dropout,
                  attention_probs_dropout_prob=c.dropout, max_position_embeddings=max(MIN_POSITIONS, c.max_length),
                  num_labels=num_classes, pad_token_id=0)
    torch.manual_seed(seed)
    if c.arch == "electra":
        return ElectraForSequenceClassification(ElectraConfig(embedding_size=c.hidden, **common))
    return BertForSequenceClassification(BertConfig(**common))


def cut(split, max_length: int):
    """The split with every row longer than `max_length` cut to its first max_length - 1 tokens and [SEP] (what
    the tokenizer's own truncation gives)."""
    from ..data import EncodedSplit

    lengths = split.lengths
    if int(lengths.max(initial=0)) <= max_length:
        return split
    new = np.minimum(lengths, max_length)
    offsets = np.zeros(len(new) + 1, dtype=np.int64)
    np.cumsum(new, out=offsets[1:])
    flat = np.repeat(split.offsets[:-1] - offsets[:-1], new) + np.arange(offsets[-1])
    tokens = split.tokens[flat]
    tokens[offsets[1:][lengths > max_length] - 1] = SEP
    return EncodedSplit(split.ids, split.labels, tokens, offsets)


def _padded_batch(padded: np.ndarray, lengths: np.ndarray, idx: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    """input_ids (B, T) and attention_mask (B, T) for the rows `idx`, T the longest of them."""
    lens = lengths[idx]
    width = int(lens.max())
    ids = torch.from_numpy(padded[idx, :width]).long()
    mask = (torch.arange(width)[None, :] < torch.from_numpy(lens)[:, None]).long()
    return ids.to(device), mask.to(device)


@torch.no_grad()
def predict_split(model, split, batch_size: int, padded: np.ndarray | None = None) -> np.ndarray:
    """(N, C) float32 logits in the split's row order; batches sorted by length."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    padded = split.padded(dtype=np.int32) if padded is None else padded
    lengths = split.lengths
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(split), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = _padded_batch(padded, lengths, idx, device)
        out[idx] = model(input_ids=ids, attention_mask=mask).logits.float().cpu().numpy()
    model.train(was_training)
    return out


class TransformerJob:
    """The transformer's part of `fit`: batches, loss, evaluation. The pre-training's metrics (`extra`) travel in
    the checkpoint, so a resumed trial, which does not pre-train again, still reports them."""

    tb_metrics = ("val/acc", "val/loss")

    def __init__(self, model, cfg, splits: dict, device, extra: dict):
        from ..loop import make_optimizer, make_scheduler

        self.model, self.cfg, self.splits, self.device, self.extra = model, cfg, splits, device, extra
        self.padded = {name: s.padded(dtype=np.int32) for name, s in splits.items()}
        self.opt = make_optimizer(model, cfg.train)
        self.sched = make_scheduler(self.opt, cfg.train, math.ceil(len(splits["train"]) / cfg.train.batch_size))

    def train_epoch(self, epoch: int, gen: torch.Generator) -> dict:
        from ..loop import NonFiniteLossError, bucketed_batches

        tcfg, split = self.cfg.train, self.splits["train"]
        labels = torch.from_numpy(split.labels).to(self.device)
        total = 0.0
        for b, idx in enumerate(bucketed_batches(split.lengths, tcfg.batch_size, gen)):
            ids, mask = _padded_batch(self.padded["train"], split.lengths, idx, self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, C)
            loss = F.cross_entropy(logits, labels[torch.from_numpy(idx).to(self.device)])
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"epoch {epoch}, batch {b}: loss is {loss.item()}; lower train.lr")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.transformer.clip)
            self.opt.step()
            if tcfg.scheduler == "cyclic":
                self.sched.step()
            total += loss.item() * len(idx)
        lr = self.opt.param_groups[0]["lr"]
        if tcfg.scheduler == "step":
            self.sched.step()
        return {"loss": total / len(split), "lr": lr, "samples": len(split)}

    def evaluate(self, split: str) -> dict:
        s = self.splits[split]
        logits = torch.from_numpy(predict_split(self.model, s, self.cfg.train.eval_batch_size, self.padded[split]))
        labels = torch.from_numpy(s.labels)
        return {"acc": (logits.argmax(1) == labels).float().mean().item(),
                "loss": F.cross_entropy(logits, labels).item()}

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "pretrain": dict(self.extra)}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.extra = dict(state.get("pretrain") or {})


# ----------------------------------------------------------------------------- preparation


def drawn(cfg, space, key: str, numeric_ok: bool = True) -> list:
    """Every value `key` ("section.field") can take in a trial: the space's values (a numeric parameter's bounds),
    plus the config's own when some trial may leave the key alone (no fixed value, no unconditional parameter or
    bundle that always sets it)."""
    section, field = key.split(".")
    base = getattr(getattr(cfg, section), field)
    if space is None:
        return [base]
    values = space.values_of(key, numeric_ok=numeric_ok)
    always = key in space.fixed or any(
        p.when is None and (name == key or (isinstance(p.choices, dict) and all(key in c for c in p.choices.values())))
        for name, p in space.params.items())
    return values if always else [*values, base]


def _encode(cfg, corpus, vocab: int, max_length: int, log) -> TransformerData:
    from ..data import EncodedSplit, get_tokenizer
    from ..cache import cached
    from ..io import sha256_file, sha256_json
    from ..pretrain import _tokenize

    # The scratch teacher's tokenizer settings, so both share the cached tokenizer of a vocabulary size.
    tok_path = get_tokenizer(corpus, TokenizerConfig(vocab_size=vocab), cfg.cache_dir, log, vocab)
    tok = hf_tokenizer(tok_path.read_text(encoding="utf-8"), max_length)
    # Taken before the tokenizer is used: a call with truncation=True writes its settings into this JSON, and the
    # pre-training cache hashes it.
    tok_json = tok.backend_tokenizer.to_str()
    key = sha256_json({"data": corpus.key, "tokenizer": sha256_file(tok_path), "max_length": max_length})[:16]

    def build(tmp: Path) -> None:
        arrays = {}
        for name in ("train", "val", "test"):
            arrays[f"{name}_tokens"], arrays[f"{name}_offsets"] = _tokenize(tok, corpus.split(name).texts, max_length)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    entry = cached(cfg.cache_dir, "transformer", f"encoded-{key}.npz", build)  # a hit is silent, as it was
    path = entry.path
    if not entry.hit:
        log(f"transformer: encoded {sum(len(corpus.split(n)) for n in ('train', 'val', 'test'))} reviews "
            f"(vocab {vocab}, max length {max_length}) into {path}")
    splits = {}
    with np.load(path) as z:
        for name in ("train", "val", "test"):
            table = corpus.split(name)
            splits[name] = EncodedSplit(table.ids, table.labels, z[f"{name}_tokens"], z[f"{name}_offsets"])
    return TransformerData(splits["train"], splits["val"], splits["test"], tok.backend_tokenizer.get_vocab_size(),
                           tok_json, max_length)


def pretrain_texts(data_cfg, rows: int | None, log) -> list[str]:
    """The first `rows` reviews (None: all) of `data.transfer_file` in a seeded order (the classify task's transfer
    order: fewer rows lie inside more)."""
    from ..data import locate_transfer, read_texts

    path = locate_transfer(data_cfg)
    texts = read_texts(path, data_cfg.text_column)
    order = np.random.default_rng(data_cfg.seed + 2).permutation(len(texts))[:rows]
    log(f"transformer: {len(order)} of {len(texts)} unlabeled reviews from {path} for masked-LM pre-training")
    return [texts[i] for i in order]


# ----------------------------------------------------------------------------- the task


class Transformer(Task):
    name = "transformer"
    section = TransformerConfig
    metrics = {"val_acc": "max", "val_loss": "min"}
    test_key = "test_acc"
    model_label = "Transformer"
    description = "a small BERT/ELECTRA, masked-LM pre-trained on unlabeled reviews, fine-tuned to classify"
    columns = {"arch": "hp:transformer.arch", "layers": "hp:transformer.n_layer", "heads": "hp:transformer.n_head",
               "head dim": "hp:transformer.d_head", "vocab size": "hp:transformer.vocab_size",
               "pretrain steps": "hp:transformer.pretrain_steps", "dropout": "hp:transformer.dropout",
               "lr": "hp:train.lr", "Acc": "test_acc", "Val Acc": "@best", "Step": "@step",
               "Train Time": "@time", "Params": "params", "Size": "@size"}

    def check(self, cfg) -> None:
        if cfg.transformer.pretrain_steps > 0 and cfg.data.transfer_file is None:
            raise ValueError("data.transfer_file: transformer.pretrain_steps > 0 pre-trains on unlabeled text; name a "
                             "file of reviews (e.g. unlabeled.txt) or set transformer.pretrain_steps to 0")

    def prepare(self, cfg, log, space=None):
        from ..data import load_corpus

        corpus = load_corpus(cfg.data, log, transfer_rows=0)
        max_length = max(drawn(cfg, space, "transformer.max_length"))
        vocabs = sorted(set(drawn(cfg, space, "transformer.vocab_size", numeric_ok=False)))
        data = {v: _encode(cfg, corpus, v, max_length, log) for v in vocabs}
        texts = None
        if max(drawn(cfg, space, "transformer.pretrain_steps")) > 0:
            rows = drawn(cfg, space, "transformer.pretrain_rows")
            texts = pretrain_texts(cfg.data, None if None in rows else max(rows), log)
        # Trials run in Ray's per-trial working folders: the pre-training cache is named absolutely.
        return {"data": data, "texts": texts, "cache_dir": str(Path(cfg.cache_dir).resolve())}

    def trial_inputs(self, prepared) -> dict:
        return prepared

    def save_artifacts(self, folder: Path, prepared) -> None:
        """The tokenizers (with their [CLS] $A [SEP] post-processor), which export turns into the model's own."""
        from ..io import write_text

        tok_dir = folder / "tokenizers"
        tok_dir.mkdir(exist_ok=True)
        for vocab, d in prepared["data"].items():
            write_text(tok_dir / f"vocab{vocab}.json", d.tokenizer_json)

    def train(self, cfg, inputs, *, run_dir, tb_dir, resume_from, on_epoch, keep_checkpoints, log, metric=None,
              mode=None):
        from ..loop import _hparams, fit, resolve_device
        from ..pretrain import pretrain_encoder

        c = cfg.transformer
        data = inputs["data"][c.vocab_size]
        splits = {name: cut(getattr(data, name), c.max_length) for name in ("train", "val", "test")}
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device = resolve_device(cfg.train.device)
        model = build_classifier(c, data.vocab_size, cfg.data.num_classes, cfg.train.seed)
        extra = {}
        if resume_from is None and c.pretrain_steps > 0:  # a resumed trial's checkpoint holds fine-tuned weights
            texts = inputs["texts"] if c.pretrain_rows is None else inputs["texts"][:c.pretrain_rows]
            pcfg = PretrainConfig(steps=c.pretrain_steps, batch_size=c.pretrain_batch_size, lr=c.pretrain_lr,
                                  mask_prob=c.mask_prob)
            metrics = pretrain_encoder(model, hf_tokenizer(data.tokenizer_json, c.max_length), texts, pcfg,
                                       max_length=c.max_length, seed=cfg.train.seed, cache_dir=inputs["cache_dir"],
                                       log=log)
            extra = {"pretrain_loss": metrics["loss_final"], "pretrain_time_s": metrics["time_s"]}
        # Fine-tuning's dropout draws start from the same state whether the encoder was trained or read from cache.
        torch.manual_seed(cfg.train.seed + 1)
        params, size_kb = count_params(model), state_dict_kb(model)
        model.to(device)
        job = TransformerJob(model, cfg, splits, device, extra)
        metric, mode = self.objective(metric, mode)
        return fit(job, epochs=cfg.train.epochs, metric=metric, mode=mode, params=params, size_kb=size_kb,
                   run_dir=run_dir, tb_dir=tb_dir, resume_from=resume_from, on_epoch=on_epoch,
                   keep_checkpoints=keep_checkpoints, log=log, seed=cfg.train.seed, weights_name="model.pt",
                   hparams=_hparams(c, cfg.train, vocab_size=data.vocab_size))

    def export(self, trial_dir: Path, cfg, row: dict, out: Path, log, state: dict, **options) -> None:
        from tokenizers import Tokenizer

        from ..loop import kept_epoch

        if options.get("int8"):
            log("warning: --int8 applies to BiLSTM students only; the transformer is exported in float32")
        c = cfg.transformer
        tok_json = (Path(trial_dir).parent / "tokenizers" / f"vocab{c.vocab_size}.json").read_text(encoding="utf-8")
        model = build_classifier(c, Tokenizer.from_str(tok_json).get_vocab_size(), cfg.data.num_classes,
                                 cfg.train.seed)
        model.load_state_dict(state["best_model"])
        model.config.task = self.name  # `sweep predict` reads config.json's task to pick this task's predict
        model.save_pretrained(out)
        hf_tokenizer(tok_json, c.max_length).save_pretrained(out)
        write_manifest(out, self.name, {
            "sweep": cfg.name, "trial_id": row["trial_id"],
            "metric": state.get("metric"), "val_acc": kept_epoch(state).get("val_acc"),
            "test_acc": row.get("test_acc"), "best_epoch": state.get("best_epoch"),
            "params": row.get("params"), "max_length": c.max_length, "num_classes": cfg.data.num_classes,
            "transformer": c.model_dump(),
            "train": cfg.train.model_dump()}, file=EXTRA_MANIFEST)

    def predict(self, folder: Path, texts: list[str]) -> list[dict]:
        """Class probabilities per text, like an exported student's."""
        from ..teacher import load_pretrained, predict_logits

        model, tok = load_pretrained(folder, None)
        seqs = tok(texts, truncation=True, max_length=tok.model_max_length)["input_ids"]
        probs = torch.softmax(torch.from_numpy(predict_logits(model, seqs, tok.pad_token_id or 0, 256)), dim=1)
        return [{"text": t, "label": int(p.argmax()), "probs": [round(float(x), 4) for x in p]}
                for t, p in zip(texts, probs)]


TASK = Transformer()
