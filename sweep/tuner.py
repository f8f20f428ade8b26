"""The sweep: prepare once on the driver, then Ray Tune (Optuna searcher, ASHA, fractional resources) over the
thin trainable adapter, then the report.

Local by default: Ray starts in-process on 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, dashboard off).
`--address` / RAY_ADDRESS connects to an existing cluster instead.
"""
from __future__ import annotations

import functools
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from trainable.config import yaml_load
from trainable.io import atomic_local_filesystem, remove_dead_temps_below
from trainable.tasks import DEFAULT_TASK

from .config import SECOND_OBJECTIVE, Config, ConfigError, check_writable, load_config, load_space_for, metric_of
from .counts import finalist_count, is_feasible, num_samples, twin_base
from .report import build_report, find_sweep, load_sweep_config
from .resources import auto_gpu
from .runs import Claim, StorageError, in_launch_dir, stamp
from .tb import HPARAMS_RUN, KD_GAIN, TB_DIR, legacy_layout, run_path

Log = Callable[[str], None]
STUDY_FILE = "optuna.db"


# ----------------------------------------------------------------------------- Ray


def init_ray(address: str | None, dashboard: bool, log: Log) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Without this, local Ray takes the interface address and listens on every interface
        # (../shared/RAY_NOTES.md). Ray reads it when first imported, so it is set before the import...
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return
    if address:
        log(f"ray: connecting to {address}")
        try:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        except ConnectionError as e:  # nothing there, or it refused us (a token it does not accept)
            said = [ln.strip() for ln in str(e.__cause__ or "").splitlines() if ln.strip()]
            cause = f" ({said[-1]})" if said else ""  # the cause's last line: why (a traceback's text before it)
            raise ConfigError(f"sweep.address: cannot connect to the Ray cluster at {address}: {e}{cause}; is it "
                              f"running, and is this machine's Ray token the cluster's? (`ray status` on its head)"
                              ) from None
        return
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # ...and here in case something imported Ray earlier
    ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=False, logging_level="WARNING")
    log(f"ray: local, 127.0.0.1 only, {int(ray.cluster_resources().get('CPU', 0))} CPUs, "
        f"{ray.cluster_resources().get('GPU', 0):g} GPUs")


def check_resources(cfg: Config, log: Log, folder: Path | None = None) -> dict:
    """Per-trial resources that some node can actually give; refused up front, never left pending forever.
    `gpu: auto` is sized here from the largest trial's memory estimate (sweep/resources.py; written to `folder`)."""
    import ray

    res = cfg.sweep.resources
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    max_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
    max_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
    gpu = res.gpu
    if gpu == "auto":
        gpu = auto_gpu(cfg, load_space_for(cfg), log, folder, cluster_has_gpu=max_gpu > 0)
    if gpu > 0 and max_gpu == 0:
        if not res.gpu_fallback:
            raise ConfigError(f"sweep.resources.gpu: {gpu} GPU per trial asked, but the Ray cluster has no GPU "
                              f"(set sweep.resources.gpu=0, or sweep.resources.gpu_fallback=true to run on CPU)")
        log("resources: no GPU in the cluster; running on CPU (gpu_fallback)")
        gpu = 0.0
    if gpu > max_gpu:
        raise ConfigError(f"sweep.resources.gpu: {gpu} GPUs per trial asked, but the largest node has {max_gpu:g}")
    if res.cpu > max_cpu:
        raise ConfigError(f"sweep.resources.cpu: {res.cpu:g} CPUs per trial asked, but the largest node has "
                          f"{max_cpu:g}")
    return {"cpu": res.cpu, "gpu": gpu}


def check_shared_storage(folder: Path, log: Log) -> None:
    """On a cluster, every node must see the sweep folder: trials write their checkpoints and TensorBoard events
    there, and a retry on another node reads them back. Checked on every live node before any trial starts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    marker = folder / f".storage-check-{secrets.token_hex(6)}"
    marker.write_text("")

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    try:
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker)) for n in nodes]
        seen = ray.get(refs, timeout=120)
    finally:
        marker.unlink(missing_ok=True)
    missing = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if missing:
        raise ConfigError(f"results_dir: {folder.parent} cannot be seen from node(s) {', '.join(missing)}; on a "
                          f"cluster it must be a shared filesystem every node mounts (cluster/README.md)")
    log(f"storage: {folder.parent} is shared by all {len(nodes)} nodes")


# ----------------------------------------------------------------------------- searcher and scheduler


def make_searcher(cfg: Config, space, study_file: Path, max_epochs: int):
    """Optuna (through Ray) over the study in `study_file` (the sweep folder's optuna.db, pickled by name: a moved
    or copied folder resumes from its own, see ray_search.SweepStudy), in a search generator that a resume
    re-points at the folder resumed and which writes the finalists' decisions (ray_search.FolderSearchGenerator)."""
    from ray.tune.search import ConcurrencyLimiter

    from .ray_search import FolderSearchGenerator, KDOptunaSearch, SweepStudy
    from .samplers import make_sampler

    sampler = make_sampler(cfg.sweep.searcher, cfg.sweep.seed, num_samples=num_samples(cfg, space),
                           grid=space.grid() if cfg.sweep.searcher == "grid" else None)
    metric, mode = objectives(cfg)
    storage = SweepStudy(study_file)
    searcher = KDOptunaSearch(space=space.define_by_run(), metric=metric, mode=mode, sampler=sampler,
                              study_name=cfg.name, storage=storage, max_epochs=max_epochs,
                              constraints=cfg.sweep.constraints)
    limited = ConcurrencyLimiter(searcher, max_concurrent=cfg.sweep.max_concurrent)
    if finalist_count(cfg) == 0:
        return FolderSearchGenerator(limited)
    from .ray_search import FinalistSearch

    return FolderSearchGenerator(FinalistSearch(
        limited, num_search=num_samples(cfg, space), twins=cfg.sweep.twins, seeds=cfg.sweep.finalist_seeds,
        twin=cfg.task_def.twin, base=twin_base(cfg), base_seed=cfg.train.seed, max_epochs=max_epochs,
        max_concurrent=cfg.sweep.max_concurrent, constraints=cfg.sweep.constraints))


def objectives(cfg: Config) -> tuple[str | list[str], str | list[str]]:
    metric, mode = metric_of(cfg)
    if cfg.sweep.objectives != "accuracy":
        return [metric, SECOND_OBJECTIVE[cfg.sweep.objectives]], [mode, "min"]
    return metric, mode


def make_scheduler(cfg: Config, folder: Path):
    from ray.tune.schedulers import FIFOScheduler

    from .ray_scheduler import ResumableASHA

    if cfg.sweep.scheduler.kind == "none":
        return FIFOScheduler()
    s = cfg.sweep.scheduler
    metric, mode = metric_of(cfg)
    return ResumableASHA(time_attr="epoch", metric=metric, mode=mode, max_t=cfg.train.epochs,
                         grace_period=min(s.grace_period, cfg.train.epochs), reduction_factor=s.reduction_factor,
                         experiment_dir=str(folder.resolve()), constraints=cfg.sweep.constraints)


# ----------------------------------------------------------------------------- progress


# ----------------------------------------------------------------------------- the sweep


def _trainable(cfg: Config, prep, resources: dict, space, folder: Path):
    from ray import tune

    from trainable.adapter import task_trainable

    base = cfg.model_dump(exclude={"sweep"})
    metric, mode = metric_of(cfg)  # the trial keeps the weights of its best epoch by the sweep's own metric
    # Each trial's TensorBoard run, named for what it is (sweep/tb.py); a sweep resumed from before named runs
    # goes on writing where its trials began.
    tb_run = None if legacy_layout(folder) else functools.partial(run_path, searched=tuple(space.searched_keys()))
    fn = tune.with_parameters(task_trainable, base=base, inputs=cfg.task_def.trial_inputs(prep),
                              keep_checkpoints=cfg.sweep.keep_checkpoints, metric=metric, mode=mode, tb_run=tb_run)
    return tune.with_resources(fn, resources)


def _run_config(cfg: Config, folder: Path, total: int, log: Log):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from .ray_callbacks import Progress, StorageGuard

    return tune.RunConfig(
        name=folder.name,
        storage_path=str(folder.parent.resolve()),
        storage_filesystem=atomic_local_filesystem(),  # a full disk never leaves Ray's state half-written
        failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
        # Ray deletes no checkpoint: the adapter prunes them to stubs, so one Ray's saved state names always exists.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        callbacks=[JsonLoggerCallback(), CSVLoggerCallback(),
                   Progress(total, cfg.train.epochs, extra=finalist_count(cfg), metric=metric_of(cfg),
                            constraints=cfg.sweep.constraints),
                   StorageGuard()],
        verbose=0,
    )


def _prepare_for_sweep(cfg: Config, space, log: Log):
    """The task's shared inputs, made once on the driver (cached by hash: a resumed sweep only reads files)."""
    return cfg.task_def.prepare(cfg, log, space)


def _quiet_ray_env() -> None:
    # Our loop writes each trial's TensorBoard events itself (curves + HParams); Ray's TBX logger would add a
    # second, differently named copy. JSON and CSV loggers are added explicitly.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def run_sweep(config_path: str, overrides: list[str], force: bool = False, resume: bool = False,
              address: str | None = None, log: Log = print) -> int:
    cfg, _ = load_config(config_path, overrides)
    space = load_space_for(cfg)
    if space is None:
        raise ConfigError(f"{config_path}: sweep.space: required key is missing (a search-space file or mapping)")
    folder = Path(cfg.results_dir) / cfg.name
    if not (resume and (folder / "tuner.pkl").exists()):
        check_writable(cfg)  # before the teacher trains, not when it is saved
    if resume and (folder / "tuner.pkl").exists():
        # The config the user runs names the task: a task module the stamped config names is theirs if it is the same.
        return resume_sweep(str(folder), address=address, log=log,
                            allow_task_code=_stamped_task(folder) == cfg.task)
    total = num_samples(cfg, space)
    # With --force the old sweep is set aside, not deleted, until this one has passed every check and its Tuner is
    # built; any failure or Ctrl-C before that puts it back and leaves nothing of the new one.
    with Claim(folder, force=force, what="sweep", log=log) as claim:
        from .plan import log_plan_summary

        log_plan_summary(cfg, space, log)  # trials, trial-epochs and the expected wall time, before anything runs
        _quiet_ray_env()
        init_ray(address or cfg.sweep.address, cfg.sweep.dashboard, log)
        resources = check_resources(cfg, log, folder)
        check_shared_storage(folder, log)
        prep = _prepare_for_sweep(cfg, space, log)
        stamp(folder, cfg)
        cfg.task_def.save_artifacts(folder, prep)
        write_hparams_experiment(folder, cfg, space)
        from ray import tune

        from .ray_callbacks import trial_dirname

        extra = finalist_count(cfg)
        log(f"sweep {cfg.name}: {total} search trials, searcher {cfg.sweep.searcher}, "
            f"scheduler {cfg.sweep.scheduler.kind}, {cfg.sweep.max_concurrent} at a time, "
            f"{resources['cpu']:g} CPU + {resources['gpu']:g} GPU per trial"
            + (f"; then up to {extra} finalist trials (the {cfg.sweep.twins} best: {cfg.sweep.finalist_seeds - 1} "
               f"rerun(s) and {cfg.sweep.finalist_seeds} no-teacher twin(s) each)" if extra else ""))
        tuner = tune.Tuner(
            _trainable(cfg, prep, resources, space, folder),
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(cfg, space, folder / STUDY_FILE, cfg.train.epochs),
                scheduler=make_scheduler(cfg, folder), num_samples=total + extra,
                reuse_actors=cfg.sweep.reuse_actors, trial_dirname_creator=trial_dirname),
            run_config=_run_config(cfg, folder, total, log),
        )
        claim.commit()  # the sweep starts now: the one it replaces goes
    return _fit_and_report(tuner, folder, cfg, total, log)


def write_hparams_experiment(folder: Path, cfg: Config, space) -> None:
    """TensorBoard's HParams table for the sweep (`sweep tensorboard`), in the runs' folder (sweep/tb.py): the
    searched parameters as its columns (TensorBoard orders them by name), under the flat names the trials write
    them with (student.hidden_dim -> hidden_dim), then the metrics that matter (validation, test, cost, size, and
    with finalists their KD gain); the whole config, whose other values every trial shares, as a text summary.
    Without it TensorBoard lists every constant, by name, and shows the first five: base_lr, batch_size, betas,
    device before any searched one."""
    from trainable.loop import write_experiment

    task, raw = cfg.task_def, cfg.model_dump()

    def value(key: str):
        node = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node if isinstance(node, (bool, int, float, str)) else 0.0

    hparams = {key.split(".")[-1]: value(key) for key in space.searched_keys() if "." in key}
    metrics = [m.replace("_", "/", 1) for m in task.metrics]
    if task.test_key:
        metrics.append(task.test_key.replace("_", "/", 1))
    metrics += [f"cost/{m}" for m in ("latency_ms", "export_kb") if m in task.measures] + ["model/size_kb"]
    if finalist_count(cfg):
        metrics.append(KD_GAIN)  # the finalists' runs only (sweep/report.py writes it once their twins are done)
    text = (f"Searched: {', '.join(space.searched_keys())}. Every other value below is the same in every search "
            f"trial (a finalist's rerun changes train.seed"
            + "".join(f", its twin {k} to {v}" for k, v in task.twin.items()) + ").\n\n"
            + "\n".join(f"    {ln}" for ln in yaml.safe_dump(raw, sort_keys=False).splitlines()))
    write_experiment(folder / TB_DIR / HPARAMS_RUN, hparams, metrics, text)


def _expected_trials(cfg: Config, num_search: int, results, folder: Path | None = None) -> int:
    """How many trials a complete run of this sweep has: the search trials, plus the finalist trials that
    FinalistSearch decided on (its FINALISTS_FILE in `folder`). Without the file (the search is not over, or a sweep
    saved before the file existed), the finalist trials the search's results (Ray's `Result`s) call for, chosen the
    same way."""
    if finalist_count(cfg) == 0:
        return num_search

    from .ray_search import FINALISTS_FILE, ROLE, finalist_trials

    decisions = folder / FINALISTS_FILE if folder is not None else None
    if decisions is not None and decisions.is_file():
        d = json.loads(decisions.read_text())
        return d["search_trials"] + len(d["extra"])
    metric, mode = metric_of(cfg)
    search = [r for r in results if not r.config.get(ROLE) and r.metrics.get("trial_id")]  # (None: never reported)
    done = {r.metrics["trial_id"]: {"error": r.error is not None, "epoch": r.metrics.get("epoch"),
                                    "best": r.metrics.get(f"best_{metric}"),
                                    "feasible": is_feasible(cfg.sweep.constraints, r.metrics)} for r in search}
    configs = {r.metrics["trial_id"]: dict(r.config) for r in search}
    extra = finalist_trials(done, configs, twins=cfg.sweep.twins, seeds=cfg.sweep.finalist_seeds,
                            twin=cfg.task_def.twin, base=twin_base(cfg), base_seed=cfg.train.seed,
                            max_epochs=cfg.train.epochs,
                            mode=mode)
    return num_search + len(extra)


def _fit_and_report(tuner, folder: Path, cfg: Config, num_search: int, log: Log) -> int:
    from .ray_callbacks import storage_problem

    t0 = time.time()
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        grid = None
    except Exception as e:
        problem = storage_problem(_chain_text(e)) or _probe_storage(folder)
        if problem is None:
            raise
        import ray

        ray.shutdown()  # stops the trials now, so their own reports of the same failure come before our line
        raise StorageError(f"results_dir: {problem} while writing {folder}; the sweep stopped, its saved "
                           f"state and checkpoints are intact: fix the storage, then run: sweep resume {folder}")
    # Ray's public ResultGrid: one Result per trial; a trial is over once it terminated or failed.
    results = list(grid) if grid is not None else []
    total = _expected_trials(cfg, num_search, results, folder)
    done = grid.num_terminated + grid.num_errors if grid is not None else 0
    if grid is None or done < len(results) or len(results) < total:
        # Ray catches Ctrl-C (SIGINT), stops the trials and saves the experiment state before returning.
        build_report(folder, log=log, allow_task_code=True)  # this sweep's own task, already loaded
        log(f"interrupted after {time.time() - t0:.1f} s: {done} of {total} trials done, "
            f"state saved; continue with: sweep resume {folder}")
        return 130
    log(f"sweep finished in {time.time() - t0:.1f} s")
    report = build_report(folder, log=log, allow_task_code=True)
    log(f"report: {report}")
    return 0


def _probe_storage(folder: Path) -> str | None:
    """The storage failure (a full disk, a read-only mount) that a small write into `folder` meets now, in
    `storage_problem`'s words, if any. For errors whose text does not say it: SQLite, for one, can report a
    results folder turned read-only under an open study as "unable to open database file" or "disk I/O error"."""
    from .ray_callbacks import storage_problem

    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return storage_problem(str(e))  # the OS's own words: "[Errno 30] Read-only file system"
    return None


def _chain_text(e: BaseException) -> str:
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _stamped_task(folder: Path):
    """The `task` of a sweep folder's config.yaml, as written (None when unreadable)."""
    try:
        raw = yaml_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw.get("task", DEFAULT_TASK) if isinstance(raw, dict) else None


def resume_sweep(target: str, address: str | None = None, log: Log = print, allow_task_code: bool = False) -> int:
    """Continue the sweep in folder `target`, wherever it lies now and from whatever directory: the stamped
    config's relative paths are read from the directory the sweep was launched in (runs.in_launch_dir), and the
    study and ASHA's replay are those of this folder (ray_search.resuming). `allow_task_code`: run the task module
    its config.yaml names (sweep.report.load_sweep_config). `tuner.pkl` and Ray's saved state are pickles,
    unpickled here: resume only sweeps you trust."""
    from .ray_search import foreign_studies, resuming

    folder = find_sweep(target)
    if not (folder / "tuner.pkl").exists():
        raise ConfigError(f"{folder}: not a resumable sweep (no tuner.pkl); start it with `sweep run`")
    cfg = load_sweep_config(folder, allow_task_code)
    if not (folder / STUDY_FILE).is_file():
        raise ConfigError(f"{folder}: not a resumable sweep ({STUDY_FILE}, its Optuna study, is missing)")
    for saved in [folder / "tuner.pkl", *sorted(folder.glob("searcher-state-*.pkl"))]:
        others = foreign_studies(saved.read_bytes(), folder / STUDY_FILE)
        if others:
            raise ConfigError(f"{saved}: names the Optuna study {others[0].removeprefix('sqlite:///')}, not this "
                              f"folder's {STUDY_FILE} (saved before a sweep folder could be moved or copied); "
                              f"resume it where it was made")
    remove_dead_temps_below(folder)  # e.g. a checkpoint's, left when its storage turned read-only under a write
    with in_launch_dir(folder, log), resuming(folder):
        return _resume(folder, cfg, address, log)


def _resume(folder: Path, cfg: Config, address: str | None, log: Log) -> int:
    from ray import tune

    space = load_space_for(cfg)
    _quiet_ray_env()
    init_ray(address or cfg.sweep.address, cfg.sweep.dashboard, log)
    resources = check_resources(cfg, log, folder)
    check_shared_storage(folder, log)
    prep = _prepare_for_sweep(cfg, space, log)
    log(f"resuming sweep {cfg.name} from {folder}")
    tuner = tune.Tuner.restore(str(folder), trainable=_trainable(cfg, prep, resources, space, folder),
                               storage_filesystem=atomic_local_filesystem(), resume_unfinished=True,
                               resume_errored=False, restart_errored=False)
    return _fit_and_report(tuner, folder, cfg, num_samples(cfg, space), log)
