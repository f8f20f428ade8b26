"""What each trial asks of the cluster: `sweep.resources.gpu: auto` sized from the largest trial's memory estimate
(the task's `gpu_memory`, e.g. trainable/memory.py for the BiLSTM students) and the cluster's smallest GPU.

Ray, torch, trainable.io and .plan (they load pyarrow) are imported inside the functions that use them, so sizing a
config does not load them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trainable.memory import MemoryEstimate, fmt_bytes, trials_per_gpu

from .config import Config, ConfigError
from .counts import trial_values

Log = Callable[[str], None]
GPU_SIZING_FILE = "gpu_sizing.json"


@dataclass(frozen=True)
class GpuSizing:
    largest: dict[str, int]  # the largest trial's sizes, and its pool_rows
    estimate: MemoryEstimate
    gpu_bytes: int | None  # None: no GPU in the cluster
    per_gpu: int  # trials sharing one GPU (0: CPU)
    fraction: float  # GPU per trial asked of Ray (0: CPU)
    margin: float

    @property
    def pool_rows(self) -> int:
        return self.largest.get("pool_rows", 0)

    def line(self) -> str:
        s = self.largest
        trial = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in s.items())
        if self.gpu_bytes is None:
            return f"resources: gpu auto: no GPU in the cluster; running on CPU (largest trial {trial}: " \
                   f"~{fmt_bytes(self.estimate.total)} if it had one)"
        return (f"resources: gpu auto: largest trial ({trial}) needs ~{fmt_bytes(self.estimate.total)} "
                f"(estimate); {self.per_gpu} per {fmt_bytes(self.gpu_bytes)} GPU keeping {self.margin:.0%} free: "
                f"{self.fraction:g} GPU per trial")

    def to_json(self) -> dict:
        return {"largest_trial": self.largest, "pool_rows": self.pool_rows, "estimate_bytes": self.estimate.total,
                "breakdown_bytes": self.estimate.breakdown, "params": self.estimate.params,
                "gpu_bytes": self.gpu_bytes, "trials_per_gpu": self.per_gpu, "gpu_per_trial": self.fraction,
                "margin": self.margin,
                "note": "an estimate; check it on a GPU with torch.cuda.max_memory_allocated plus the CUDA context"}


def size_gpu(cfg: Config, space, gpu_bytes: int | None, rows=None, margin: float = 0.2) -> GpuSizing:
    """The GPU fraction per trial for `sweep.resources.gpu: auto`: the largest trial's memory estimate packed into
    a GPU of `gpu_bytes` (None: no GPU, run on CPU). `rows`: the corpus counts (None: counted from the files).
    Raises ConfigError when the task cannot estimate its memory or one trial does not fit."""
    from .plan import count_rows

    rows = rows if rows is not None else count_rows(cfg, space, with_lengths=False)
    sized = cfg.task_def.gpu_memory(cfg, lambda key: trial_values(cfg, space, key), rows)
    if sized is None:
        raise ConfigError(f"sweep.resources.gpu: auto: task {cfg.task_def.name} gives no memory estimate; give the "
                          f"GPU fraction per trial as a number")
    largest, est = sized
    if gpu_bytes is None:
        return GpuSizing(largest, est, None, 0, 0.0, margin)
    try:
        n, fraction = trials_per_gpu(est.total, gpu_bytes, margin)
    except ValueError as e:
        raise ConfigError(f"sweep.resources.gpu: auto: {e}") from None
    return GpuSizing(largest, est, gpu_bytes, n, fraction, margin)


def cluster_gpu_bytes() -> int | None:
    """The memory of the smallest GPU in the Ray cluster (a trial may land on any), asked of each GPU node by a
    one-GPU task; None when the cluster has no GPU. Ray reports GPU counts, not their memory."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
    if not nodes:
        return None

    @ray.remote(num_gpus=1, num_cpus=0, max_retries=0)
    def gpu_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0

    refs = [gpu_memory.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    try:
        sizes = [s for s in ray.get(refs, timeout=180) if s]
    except ray.exceptions.GetTimeoutError:
        raise ConfigError("sweep.resources.gpu: auto: no GPU answered within 180 s (all busy?); set "
                          "sweep.resources.gpu to a number") from None
    return min(sizes) if sizes else None


def auto_gpu(cfg: Config, space, log: Log, folder: Path | None = None, cluster_has_gpu: bool = True) -> float:
    """`sweep.resources.gpu: auto`: the fraction of a GPU per trial (0.0: the cluster has no GPU, run on CPU),
    logged in one line and written to `folder/gpu_sizing.json` for the report."""
    from trainable.io import write_json

    try:
        sizing = size_gpu(cfg, space, cluster_gpu_bytes() if cluster_has_gpu else None)
    except ConfigError:
        if cluster_has_gpu:
            raise
        log("resources: gpu auto: no GPU in the cluster; running on CPU")  # no estimate needed after all
        return 0.0
    log(sizing.line())
    if folder is not None:
        write_json(Path(folder) / GPU_SIZING_FILE, sizing.to_json())
    return sizing.fraction
