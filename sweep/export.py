"""Export the best student of a sweep, and label new text with an exported student.

An export folder holds `student.pt` (a plain state dict, loadable with torch.load(weights_only=True)),
`student.ts` (TorchScript, for serving without this package; one-layer students), `student.onnx` (the same
graph for ONNX runtimes, when the `onnx` package is installed), with `--int8` `student.int8.ts` (LSTM and Linear
weights dynamically quantised to int8), `tokenizer.json` and `config.json` (architecture, max length, where it
came from and its accuracies; with `--int8` also the int8 copy's accuracy change on the sweep's validation split).

Labelling goes through `label_texts`: reviews are encoded once, sorted by length and run in batches, so a batch
pads to the longest of similar-length reviews instead of the longest in the file.
"""
from __future__ import annotations

import inspect
import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from trainable.cost import example_batch, quantize_int8
from trainable.tasks import config_from_trial
from trainable.io import atomic_dir, write_json
from trainable.loop import CheckpointError, kept_epoch, load_checkpoint, trial_checkpoints
from trainable.student import BiLSTMClassifier, PortableBiLSTM

from .config import SECOND_OBJECTIVE, ConfigError, metric_of
from .report import _ranked, collect_trials, load_sweep_config


def _latest_valid_checkpoint(trial_dir: Path, log: Callable[[str], None]) -> dict:
    for ckpt in trial_checkpoints(trial_dir):
        try:
            return load_checkpoint(ckpt)
        except CheckpointError as e:
            log(f"warning: skipping {e}")
    raise ConfigError(f"{trial_dir}: no readable checkpoint")


# Runtimes `sweep predict/evaluate --runtime` can use, and the export file each one loads (eager: student.pt).
RUNTIMES = ("eager", "torchscript", "int8", "onnx")
RUNTIME_FILES = {"torchscript": "student.ts", "int8": "student.int8.ts", "onnx": "student.onnx"}


_example_batch = example_batch  # (the name before trainable/cost.py)


def _export_onnx(portable: PortableBiLSTM, path: Path, log: Callable[[str], None]) -> bool:
    """student.onnx with dynamic batch and time axes; False (and a warning) when `onnx` is not installed."""
    try:
        import onnx
    except ImportError:
        log("warning: onnx is not installed, so no student.onnx was written (pip install 'kd-sweep[tools]')")
        return False
    # The TorchScript-based exporter: the torch.export-based one (the default since torch 2.9) needs onnxscript
    # and gains nothing for two plain LSTMs. Older torch has no `dynamo` argument and only this exporter.
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and its LSTM batch-size caution
        torch.onnx.export(portable, _example_batch(), str(path), input_names=["tokens", "lengths"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"tokens": {0: "batch", 1: "time"}, "lengths": {0: "batch"},
                                        "logits": {0: "batch"}}, **kwargs)
    onnx.checker.check_model(str(path))
    return True


def _int8_val_change(data_cfg, tok_path: Path, max_length: int, fp32, int8,
                     log: Callable[[str], None]) -> dict | None:
    """Validation accuracy of the fp32 student and of its int8 copy on the sweep's own validation split (re-read
    from the corpus with the sweep's data settings); None, with a warning, when the corpus is not reachable here."""
    from tokenizers import Tokenizer

    from trainable.data import DataError, load_corpus

    try:
        val = load_corpus(data_cfg, lambda msg: None, download=False, transfer_rows=0).val
    except (DataError, OSError) as e:
        log(f"warning: the int8 copy's accuracy change was not measured (corpus not readable here: {e})")
        return None
    tok = Tokenizer.from_file(str(tok_path))
    acc = {name: float((label_texts(fn, tok, val.texts, max_length).argmax(1) == val.labels).mean())
           for name, fn in (("fp32", fp32), ("int8", int8))}
    log(f"int8 copy: validation accuracy {acc['int8']:.4f} vs {acc['fp32']:.4f} fp32 on {len(val)} reviews")
    return {"val_rows": len(val), "val_acc_fp32": acc["fp32"], "val_acc_int8": acc["int8"],
            "val_acc_change": acc["int8"] - acc["fp32"]}


def _is_sweep_folder(path: Path) -> bool:
    return ((path / "config.yaml").is_file() and (path / "optuna.db").exists()) or (path / "tuner.pkl").exists()


def _refuse_out(folder: Path, out: Path, results_dir: Path) -> None:
    """`--out` is replaced whole (with --force): refuse one that is a file, a sweep folder or a part of one, a results
    folder (the sweep's own, or one holding sweeps), or a folder above any of them."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; give a folder to write the export into")
    target, sweep = out.resolve(), folder.resolve()
    kept = ((sweep, "the sweep folder"), (results_dir.resolve(), "the results folder"),
            (sweep.parent, "the results folder"))
    for how, hit in (("is", lambda path: target == path), ("holds", lambda path: target in path.parents)):
        for path, what in kept:
            if hit(path):
                raise ConfigError(f"--out {out}: {how} {what} {path}; exporting there would replace it (give a "
                                  f"new folder)")
    if sweep in target.parents and out.exists():
        raise ConfigError(f"--out {out}: is a part of the sweep folder {sweep}; give a folder outside it")
    if out.is_dir() and (_is_sweep_folder(out) or any(_is_sweep_folder(c) for c in out.iterdir() if c.is_dir())):
        raise ConfigError(f"--out {out}: is a sweep folder or holds sweeps; give a new folder")


def _trial_row(folder: Path, rows: list[dict], ranked: list[dict], trial: str | None, cfg=None,
               log: Callable[[str], None] = print) -> dict:
    """The row to export: the best (`trial` None; with `sweep.constraints`, the best feasible), else the trial of
    that Ray id or, failing that, of that Optuna trial number (an infeasible one with a warning: asked for by
    name). One line naming what is wrong otherwise."""
    from .report import STATUS_FAILED, _candidates, constraint_misses

    limits = cfg.sweep.constraints if cfg is not None else {}
    if trial is None:
        if not ranked:
            ran = _candidates(rows, metric_of(cfg)[0]) if limits else []
            if ran:
                wanted = ", ".join(f"{k} <= {v:g}" for k, v in limits.items())
                raise ConfigError(f"sweep.constraints: no trial of {folder} meets {wanted} ({len(ran)} ran); export "
                                  f"one anyway with --trial ID (report.md names the best infeasible)")
            raise ConfigError(f"{folder}: no successful trial to export")
        return ranked[0]
    row = next((r for r in rows if r["trial_id"] == trial), None)
    if row is None and trial.isdigit():
        row = next((r for r in rows if r.get("optuna_number") == int(trial)), None)
    if row is None:
        known = ", ".join(r["trial_id"] + (f" (#{r['optuna_number']})" if r.get("optuna_number") is not None else "")
                          for r in rows[:8]) + (" ..." if len(rows) > 8 else "")
        raise ConfigError(f"--trial {trial}: no such trial in {folder} (a Ray trial id or an Optuna trial number; "
                          f"it has: {known or 'none'})")
    if row["status"] == STATUS_FAILED:
        raise ConfigError(f"--trial {trial}: trial {row['trial_id']} failed ({row['error']}); nothing to export")
    if row.get("feasible") is False:
        log(f"warning: trial {row['trial_id']} does not meet sweep.constraints ({constraint_misses(cfg, row)}); "
            f"exporting it as asked")
    return row


def _sweep_trials(folder: Path, out: Path, allow_task_code: bool):
    cfg = load_sweep_config(folder, allow_task_code)  # a task module the folder names runs only when allowed
    _refuse_out(folder, out, Path(cfg.results_dir))
    metric, mode = metric_of(cfg)
    rows = collect_trials(folder, cfg)
    return cfg, metric, mode, rows, _ranked(rows, metric, mode)


def _check_replace(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: exists; pass --force to replace it")


def export_best(folder: Path, out: Path, force: bool = False, log: Callable[[str], None] = print, *,
                int8: bool = False, allow_task_code: bool = False, trial: str | None = None) -> Path:
    """The best search trial's student (or, with `trial`, that trial's: a Ray trial id or an Optuna trial number)
    into the folder `out`, replaced whole."""
    cfg, metric, _, rows, ranked = _sweep_trials(folder, out, allow_task_code)
    row = _trial_row(folder, rows, ranked, trial, cfg, log)
    _check_replace(out, force)
    with atomic_dir(out) as tmp:
        _write_export(folder, cfg, metric, row, tmp, log, int8=int8)
    return out


def export_pareto(folder: Path, out: Path, force: bool = False, log: Callable[[str], None] = print, *,
                  int8: bool = False, allow_task_code: bool = False) -> tuple[Path, list[dict]]:
    """Every trial on the sweep's Pareto front (the report's: `report.front_members`), each exported into its own
    sub-folder of `out` (named by its trial id), with `index.json` listing trial, folder and objective values,
    smallest first. `out` is replaced whole, only once every member is written."""
    from .report import front_members

    cfg, metric, mode, _, ranked = _sweep_trials(folder, out, allow_task_code)
    second = SECOND_OBJECTIVE[cfg.sweep.objectives]
    front = front_members(ranked, metric, mode, second)
    if not front:
        feasible = " that meets sweep.constraints" if cfg.sweep.constraints else ""
        raise ConfigError(f"{folder}: no Pareto front to export (no successful trial{feasible} with {metric} and "
                          f"{second})")
    _check_replace(out, force)
    index = []
    with atomic_dir(out) as tmp:
        for row in front:
            sub = tmp / row["trial_id"]
            sub.mkdir()
            _write_export(folder, cfg, metric, row, sub, log, int8=int8)
            index.append({"trial": row["trial_id"], "optuna_number": row.get("optuna_number"), "folder": sub.name,
                          "values": {f"best_{metric}": row[f"best_{metric}"], second: row[second]},
                          **({cfg.task_def.test_key: row.get(cfg.task_def.test_key)} if cfg.task_def.test_key
                             else {})})
        write_json(tmp / "index.json", {"sweep": cfg.name, "objectives": [f"best_{metric} ({mode})",
                                                                          f"{second} (min)"], "members": index})
    return out, index


def _write_export(folder: Path, cfg, metric: str, best: dict, tmp: Path, log: Callable[[str], None], *,
                  int8: bool) -> None:
    """One trial's export into the (empty, temporary) folder `tmp`."""
    trial_dir = folder / best["trial_dir"]
    params = json.loads((trial_dir / "params.json").read_text())
    tcfg = config_from_trial(cfg.model_dump(exclude={"sweep"}), params)
    state = _latest_valid_checkpoint(trial_dir, log)
    kept_by = state.get("metric") or "val_acc"  # (checkpoints before the task seam: val_acc only)
    if kept_by != metric:  # a sweep run before its metric reached the training loop
        log(f"warning: trial {best['trial_id']} kept its best weights by {kept_by}, not the sweep's {metric}: the "
            f"export holds its best-{kept_by} epoch ({state.get('best_epoch')})")
    if cfg.task != "classify":  # the task's own export format
        cfg.task_def.export(trial_dir, tcfg, best, tmp, log, state=state, int8=int8)
        return
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
        "optuna_number": best.get("optuna_number"),
        "metric": kept_by, f"best_{kept_by}": state.get("best", state.get("best_val_acc")),
        "best_epoch": state.get("best_epoch"), "val_acc": kept_epoch(state).get("val_acc"),
        "test_acc": best["test_acc"],
        "params": best["params"], "hyperparameters": params,
    }
    torch.save(weights, tmp / "student.pt")
    shutil.copyfile(tok_src, tmp / "tokenizer.json")
    if tcfg.student.num_layers == 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(PortableBiLSTM(model).eval(), _example_batch())
        traced.save(str(tmp / "student.ts"))
        _export_onnx(PortableBiLSTM(model).eval(), tmp / "student.onnx", log)
        if int8:
            quantized = quantize_int8(PortableBiLSTM(model).eval())
            quantized.save(str(tmp / "student.int8.ts"))
            meta["int8"] = _int8_val_change(tcfg.data, tok_src, tcfg.tokenizer.max_length, model, quantized, log)
    else:
        log("warning: TorchScript, ONNX and int8 copies are made for one-layer students only; "
            "wrote student.pt alone")
    write_json(tmp / "config.json", meta)


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


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # tokens (B, T) int64, lengths (B,) int64 -> (B, C)


def load_runtime(model_dir: Path, runtime: str = "eager", threads: int | None = None) -> tuple[Forward, object, dict]:
    """(forward, tokenizer, meta) for one of RUNTIMES over an export folder. `threads` sets ONNX Runtime's intra-op
    threads (torch's are process-wide: torch.set_num_threads); None: the runtime's default."""
    model, tok, meta = load_exported(model_dir)
    if runtime == "eager":
        return model, tok, meta
    if runtime not in RUNTIME_FILES:
        raise ConfigError(f"--runtime {runtime}: expected one of {list(RUNTIMES)}")
    path = model_dir / RUNTIME_FILES[runtime]
    if not path.is_file():
        how = "sweep export --int8" if runtime == "int8" else "sweep export with onnx installed"
        raise ConfigError(f"{path}: not found; the {runtime} runtime needs it (made by `{how}`)")
    if runtime == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("onnxruntime is not installed (pip install 'kd-sweep[tools]')") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def forward(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            (logits,) = session.run(["logits"], {"tokens": tokens.numpy(), "lengths": lengths.numpy()})
            return torch.from_numpy(logits)

        return forward, tok, meta
    return torch.jit.load(str(path), map_location="cpu"), tok, meta


@torch.no_grad()
def label_texts(forward: Forward, tok, texts: list[str], max_length: int, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (N, C) float32 in input order. Reviews are sorted by length and run `batch_size` at a
    time, so each batch pads only to the longest of similar-length reviews."""
    from trainable.data import EncodedSplit, encode_texts

    tokens, offsets = encode_texts(tok, texts, max_length)
    n = len(texts)
    encoded = EncodedSplit(np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64), tokens, offsets)
    order = np.argsort(encoded.lengths, kind="stable")
    probs = None
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        part = encoded.take(idx)
        logits = forward(torch.from_numpy(part.padded()), torch.from_numpy(part.lengths))  # (B, C)
        if probs is None:
            probs = np.empty((n, logits.shape[1]), dtype=np.float32)
        probs[idx] = torch.softmax(logits.float(), dim=1).numpy()
    return probs if probs is not None else np.empty((0, 0), dtype=np.float32)


def predict(model_dir: Path, texts: list[str], *, batch_size: int = 512,
            runtime: str = "eager") -> list[tuple[str, int, list[float]]]:
    forward, tok, meta = load_runtime(model_dir, runtime)
    probs = label_texts(forward, tok, texts, meta["max_length"], batch_size)
    return [(t, int(p.argmax()), [round(float(x), 4) for x in p]) for t, p in zip(texts, probs)]
