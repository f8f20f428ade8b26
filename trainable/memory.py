"""How much GPU memory one BiLSTM student trial needs at its peak, and how many such trials share one GPU.

`estimate_trial_memory` counts, from the trial's shape and batch alone (no GPU, no torch), what `train_student`
keeps on the device: the weights, their gradients and Adam's two moments; one more copy of the weights; the teacher
logits and labels of the whole training pool (the loop moves them to the device once, so that a batch is gathered by
index); the activations of one training batch of the longest length; one evaluation batch; and the fixed cost of a
CUDA process. `trials_per_gpu` turns that into the fraction of a GPU to ask Ray for (`sweep.resources.gpu: auto`).

It is an estimate, to be checked on a GPU: train the largest trial once and compare with
`torch.cuda.max_memory_allocated()` (which counts tensors only) plus `CUDA_CONTEXT_BYTES` (which it does not).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30
FP32, INT64 = 4, 8

# Per process, before the first tensor: the CUDA context (kernels of torch, cuDNN and cuBLAS loaded; ~300 MiB on
# recent drivers and GPUs) plus cuDNN's RNN workspace and cuBLAS's workspace. 300-500 MiB depending on the driver,
# the GPU and the torch build; not counted by torch.cuda.max_memory_allocated (nvidia-smi shows it per process).
CUDA_CONTEXT_BYTES = 400 * MiB
MAX_TRIALS_PER_GPU = 16  # beyond this, trials on one GPU wait on each other's kernels more than they gain
RAY_RESOURCE_UNIT = 10_000  # Ray counts fractional resources in units of 1e-4


@dataclass(frozen=True)
class MemoryEstimate:
    total: int  # bytes
    params: int
    breakdown: dict[str, int]  # bytes per item, summing to total (the report shows it)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.breakdown.items() if v)
        return f"{fmt_bytes(self.total)} ({parts})"


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def student_params(vocab_size: int, embedding_dim: int, hidden_dim: int, num_layers: int = 1,
                   num_classes: int = 2) -> int:
    """Parameters of `trainable.student.BiLSTMClassifier`, by hand: embedding V*E; per layer and direction the
    input-to-hidden (4H x in), hidden-to-hidden (4H x H) matrices and two bias vectors (2 x 4H), where `in` is E for
    the first layer and 2H (both directions of the layer below) for the others; the classifier 2H*C + C."""
    lstm = 0
    for layer in range(num_layers):
        inp = embedding_dim if layer == 0 else 2 * hidden_dim
        lstm += 2 * (4 * hidden_dim * inp + 4 * hidden_dim * hidden_dim + 2 * 4 * hidden_dim)
    return vocab_size * embedding_dim + lstm + 2 * hidden_dim * num_classes + num_classes


def estimate_trial_memory(*, vocab_size: int, embedding_dim: int, hidden_dim: int, num_layers: int = 1,
                          num_classes: int = 2, batch_size: int, max_length: int, eval_batch_size: int = 512,
                          pool_rows: int = 0) -> MemoryEstimate:
    """Peak device memory of one student trial, in bytes, with its parts.

    `pool_rows`: the training rows of one epoch (labelled + transfer). Every batch is taken at `max_length` tokens
    (batches are of almost equal length, so the longest batch is all max-length reviews).

    - weights, grads, adam_state (m and v): 4 copies of the fp32 parameters in all.
    - best_weights: one more copy. Today's loop keeps its best-weights copy on the host (`.to("cpu", copy=True)`);
      the term stays, because Adam's multi-tensor step allocates temporaries of about the parameters' size on the
      device, and a loop that keeps the copy on the device needs exactly it.
    - pool: teacher logits (N, C) float32 and labels (N,) int64, moved to the device for the whole run.
    - train_activations, B sequences of T tokens: the token ids and their reversed copy (B, T) int64 (the one-layer
      path reverses each review), the two embedded copies (B, T, E), per layer and direction the LSTM output
      (B, T, H) and cuDNN's training reserve, which keeps the 4 gate activations per step (B, T, 4H); during the
      backward pass, gradients of the largest of these (the embeddings and one layer's outputs) exist at once.
    - eval_activations: one evaluation batch (eval_batch_size, T), forward only: embeddings and outputs of both
      directions. Counted on top of training: the caching allocator keeps training's blocks reserved.
    - cuda_context: `CUDA_CONTEXT_BYTES`.
    """
    V, E, H, L, C = vocab_size, embedding_dim, hidden_dim, num_layers, num_classes
    B, T, Be = batch_size, max_length, eval_batch_size
    P = student_params(V, E, H, L, C)
    tokens = 2 * B * T * INT64 + B * INT64  # ids, reversed ids (B, T); lengths (B,)
    embedded = 2 * B * T * E * FP32  # (B, T, E) per direction (1 layer) or embedded + packed copy (deeper)
    outputs = L * 2 * B * T * H * FP32  # (B, T, H) per layer and direction
    reserve = L * 2 * B * T * 4 * H * FP32  # cuDNN's reserve space: the gates, (B, T, 4H) per layer and direction
    grads = embedded + 2 * B * T * H * FP32  # backward: d(embeddings) and d(one layer's outputs) at once
    breakdown = {
        "weights": P * FP32,
        "grads": P * FP32,
        "adam_state": 2 * P * FP32,
        "best_weights": P * FP32,
        "pool": pool_rows * (C * FP32 + INT64),
        "train_activations": tokens + embedded + outputs + reserve + grads,
        "eval_activations": 2 * Be * T * INT64 + 2 * Be * T * (E + H) * FP32,
        "cuda_context": CUDA_CONTEXT_BYTES,
    }
    return MemoryEstimate(sum(breakdown.values()), P, breakdown)


def trials_per_gpu(estimate_bytes: int, gpu_bytes: int, margin: float = 0.2,
                   max_trials: int = MAX_TRIALS_PER_GPU) -> tuple[int, float]:
    """(n, fraction): how many trials of `estimate_bytes` fit in `gpu_bytes` keeping `margin` of it free
    (allocator rounding and fragmentation, a longer batch than estimated), capped at `max_trials`, and the GPU
    fraction to ask Ray for per trial: 1/n, rounded down to Ray's resource unit of 1e-4 so that n of them fit
    (1/6 rounded to nearest, 0.1667, would let only 5 share a GPU). Raises ValueError if not even one fits."""
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must lie in [0, 1), got {margin}")
    usable = gpu_bytes * (1.0 - margin)
    if estimate_bytes > usable:
        raise ValueError(f"one trial needs about {fmt_bytes(estimate_bytes)} of GPU memory, more than the "
                         f"{fmt_bytes(usable)} usable on a {fmt_bytes(gpu_bytes)} GPU ({margin:.0%} kept free); "
                         f"lower train.batch_size, student.hidden_dim or tokenizer.max_length, or set "
                         f"sweep.resources.gpu to a number")
    n = max(1, min(int(usable // estimate_bytes), max_trials))
    return n, math.floor(RAY_RESOURCE_UNIT / n) / RAY_RESOURCE_UNIT
