"""What a student costs to serve, measured the way the classify task exports it: the TorchScript copy of the
portable BiLSTM (one-layer students; deeper ones: the eager model, which is what their export holds) and its int8
copy, timed on one CPU thread, plus the exported files' sizes. The loop records these with a trial's results.

Timing is per forward pass on reviews at a fixed length (the longest the trial trains on: the worst case a server
sees), median of several repeats after a warm-up. A dense LSTM's time does not depend on its weights' values, so
the figure measured on the trial's best weights at its first epoch holds for the weights it ends with.
"""
from __future__ import annotations

import copy
import io
import statistics
import time
import warnings

import torch
import torch.nn as nn

from .student import BiLSTMClassifier, PortableBiLSTM


def example_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch of two reviews for tracing: tokens (2, 4) int64, lengths (2,) int64."""
    return torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]]), torch.tensor([3, 4])


def trace_portable(model: BiLSTMClassifier) -> torch.jit.ScriptModule:
    """The TorchScript copy `sweep export` writes as student.ts (one-layer students)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(PortableBiLSTM(model).eval(), example_batch())


def quantize_int8(portable: PortableBiLSTM) -> torch.jit.ScriptModule:
    """A TorchScript copy with the LSTM and Linear weights dynamically quantised to int8 (activations stay float,
    quantised on the fly per batch); the embedding stays float32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao; it still works
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(portable), {nn.LSTM, nn.Linear},
                                                           dtype=torch.qint8)
        return torch.jit.trace(quantized.eval(), example_batch())


def _saved_kb(module) -> float:
    buf = io.BytesIO()
    if isinstance(module, torch.jit.ScriptModule):
        torch.jit.save(module, buf)
    else:
        torch.save(module.state_dict(), buf)
    return buf.tell() / 1024


@torch.no_grad()
def _median_ms(forward, tokens: torch.Tensor, lengths: torch.Tensor, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        forward(tokens, lengths)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(tokens, lengths)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure_cost(weights: dict, model: BiLSTMClassifier, length: int, *, batch: int = 64, repeats: int = 9,
                 warmup: int = 3) -> dict[str, float]:
    """ms per review at batch 1 (`latency_ms`), ms per batch of `batch` (`latency_b64_ms`), the same for the int8
    copy (one-layer students), and the exported files' sizes in KiB (`export_kb`: student.ts, or student.pt for
    a deeper student; `export_int8_kb`), for `weights` loaded into a CPU copy of `model`; one torch thread.
    Leaves the random state as it found it (the portable copy's layers draw initial weights), so a trial that
    measures is the same trial, epoch for epoch, as one resumed past the measurement."""
    with torch.random.fork_rng(devices=[]):
        return _measure_cost(weights, model, length, batch=batch, repeats=repeats, warmup=warmup)


def _measure_cost(weights: dict, model: BiLSTMClassifier, length: int, *, batch: int, repeats: int,
                  warmup: int) -> dict[str, float]:
    cpu = copy.deepcopy(model).to("cpu").eval()
    cpu.load_state_dict(weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        length = max(int(length), 1)
        one = (torch.full((1, length), 5, dtype=torch.long), torch.tensor([length]))
        many = (torch.full((batch, length), 5, dtype=torch.long), torch.full((batch,), length, dtype=torch.long))
        runtimes = {"": trace_portable(cpu) if cpu.lstm.num_layers == 1 else cpu}
        if cpu.lstm.num_layers == 1:
            runtimes["int8_"] = quantize_int8(PortableBiLSTM(cpu).eval())
        out = {}
        for prefix, forward in runtimes.items():
            out[f"latency_{prefix}ms"] = _median_ms(forward, *one, repeats, warmup)
            out[f"latency_{prefix}b{batch}_ms"] = _median_ms(forward, *many, max(3, repeats // 3), 1)
            out[f"export_{prefix}kb"] = _saved_kb(forward)
        return out
    finally:
        torch.set_num_threads(threads)
