"""Export the best student of a sweep, and label new text with an exported student.

An export folder holds `student.pt` (a plain state dict, loadable with torch.load(weights_only=True)),
`student.ts` (TorchScript, for serving without this package; one-layer students), `tokenizer.json` and
`config.json` (architecture, max length, where it came from and its accuracies).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch

from trainable.config import config_from_trial
from trainable.io import atomic_dir, write_json
from trainable.loop import CheckpointError, load_checkpoint
from trainable.student import BiLSTMClassifier, PortableBiLSTM

from .config import ConfigError
from .report import _ranked, collect_trials, load_sweep_config


def _latest_valid_checkpoint(trial_dir: Path, log: Callable[[str], None]) -> dict:
    for ckpt in sorted(trial_dir.glob("checkpoint_*"), reverse=True):
        try:
            return load_checkpoint(ckpt)
        except CheckpointError as e:
            log(f"warning: skipping {e}")
    raise ConfigError(f"{trial_dir}: no readable checkpoint")


def export_best(folder: Path, out: Path, force: bool = False, log: Callable[[str], None] = print) -> Path:
    cfg = load_sweep_config(folder)
    ranked = _ranked(collect_trials(folder, cfg))
    if not ranked:
        raise ConfigError(f"{folder}: no successful trial to export")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: exists; pass --force to replace it")
    best = ranked[0]
    trial_dir = folder / best["trial_dir"]
    params = json.loads((trial_dir / "params.json").read_text())
    tcfg = config_from_trial(cfg.model_dump(exclude={"sweep"}), params)
    state = _latest_valid_checkpoint(trial_dir, log)
    weights = state["best_model"]
    vocab = tcfg.tokenizer.vocab_size
    tok_src = folder / "tokenizers" / f"vocab{vocab}.json"
    model = BiLSTMClassifier(weights["embedding.weight"].shape[0], tcfg.student.embedding_dim, tcfg.student.hidden_dim,
                             cfg.data.num_classes, tcfg.student.num_layers, tcfg.student.dropout)
    model.load_state_dict(weights)
    model.eval()
    meta = {
        "architecture": "BiLSTMClassifier", "vocab_size": model.embedding.num_embeddings,
        "embedding_dim": tcfg.student.embedding_dim, "hidden_dim": tcfg.student.hidden_dim,
        "num_layers": tcfg.student.num_layers, "dropout": tcfg.student.dropout, "num_classes": cfg.data.num_classes,
        "max_length": tcfg.tokenizer.max_length, "sweep": cfg.name, "trial_id": best["trial_id"],
        "val_acc": best["best_val_acc"], "test_acc": best["test_acc"], "best_epoch": best["best_epoch"],
        "params": best["params"], "hyperparameters": params,
    }
    with atomic_dir(out) as tmp:
        torch.save(weights, tmp / "student.pt")
        shutil.copyfile(tok_src, tmp / "tokenizer.json")
        if tcfg.student.num_layers == 1:
            tokens, lengths = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]]), torch.tensor([3, 4])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(PortableBiLSTM(model).eval(), (tokens, lengths))
            traced.save(str(tmp / "student.ts"))
        write_json(tmp / "config.json", meta)
    return out


def load_exported(model_dir: Path) -> tuple[BiLSTMClassifier, object, dict]:
    from tokenizers import Tokenizer

    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{model_dir}: not an exported student (no config.json); make one with `sweep export`")
    meta = json.loads(cfg_path.read_text())
    model = BiLSTMClassifier(meta["vocab_size"], meta["embedding_dim"], meta["hidden_dim"], meta["num_classes"],
                             meta["num_layers"], meta["dropout"])
    try:
        model.load_state_dict(torch.load(model_dir / "student.pt", map_location="cpu", weights_only=True))
    except Exception as e:  # weights_only refuses pickles that would run code
        raise ConfigError(f"{model_dir / 'student.pt'}: not a plain state dict ({type(e).__name__})") from None
    model.eval()
    return model, Tokenizer.from_file(str(model_dir / "tokenizer.json")), meta


@torch.no_grad()
def predict(model_dir: Path, texts: list[str]) -> list[tuple[str, int, list[float]]]:
    from trainable.data import encode_texts

    model, tok, meta = load_exported(model_dir)
    tokens, offsets = encode_texts(tok, texts, meta["max_length"])
    lengths = torch.from_numpy(offsets[1:] - offsets[:-1])
    batch = torch.zeros(len(texts), int(lengths.max()), dtype=torch.long)
    for i in range(len(texts)):
        batch[i, : lengths[i]] = torch.from_numpy(tokens[offsets[i]:offsets[i + 1]].astype("int64"))
    probs = torch.softmax(model(batch, lengths), dim=1)
    return [(t, int(p.argmax()), [round(float(x), 4) for x in p]) for t, p in zip(texts, probs)]
