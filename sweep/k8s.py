"""`sweep k8s CONFIG`: a KubeRay `RayJob` manifest (YAML) that runs this sweep on a Kubernetes cluster.

KubeRay starts a Ray cluster for the job (one CPU head, a fixed group of workers), submits `sweep run` to it, and
deletes the cluster when the job ends; the results stay on a PersistentVolumeClaim mounted at `results_dir` on
every pod. Nothing is started or contacted here: the manifest is written for `kubectl apply`.

How the pieces reach the pods, and why:
- The sweep config travels in a ConfigMap of the same manifest, mounted read-only at /etc/kd-sweep on every pod:
  the config as loaded here (the user's --set applied), with the search-space file and a task .py file it names
  shipped beside it, so the pods read what was validated here. Not runtimeEnv's `working_dir`: in a RayJob that
  must be a remote URI (a zip in a bucket or on a web server) that someone uploads first, while a ConfigMap goes
  with the same `kubectl apply`. Data, teachers and other files the config names are read in the pods: on the
  claim, in the image, or downloaded (NSMC, hub models).
- The code: Ray's image (`rayproject/ray:<the Ray installed here>-py311[-gpu]`) plus a pip install of this
  project at a pinned commit and of the torch installed here (runtimeEnv `pip`, installed once per node), or an
  image of the user's own (`--image`) that holds both.
- Ray's token: `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN` from the Secret `kd-sweep-ray-token` (key `auth_token`)
  on the head and the workers, and `authOptions` naming the same Secret, so that KubeRay gives it to the job
  submitter and uses it for its own calls to the dashboard (KubeRay >= 1.5.1).
- GPUs: `sweep.resources.gpu: auto` is sized here as `sweep run` sizes it (`sweep.resources.size_gpu`), for a GPU of
  `--gpu-memory` GiB instead of a probe of a running cluster; the fraction goes into the job's command as
  `--set sweep.resources.gpu=F`, and each worker asks Kubernetes for whole GPUs (`nvidia.com/gpu`).
- Nothing is exposed beyond the cluster: the head's Service is ClusterIP, no Ingress, no NodePort or
  LoadBalancer; the dashboard is reached with `kubectl port-forward`, which listens on 127.0.0.1.

trainable.io (it loads pyarrow) is imported inside the function that writes the manifest, so `sweep k8s` refuses bad
input before loading it.
"""
from __future__ import annotations

import math
import re
import shlex
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

from search_spaces import HERE
from trainable.memory import RAY_RESOURCE_UNIT
from trainable.tasks import has_hook

from .config import ConfigError, load_config, load_raw, load_space_for
from .resources import size_gpu

Log = Callable[[str], None]

CONFIG_MOUNT = "/etc/kd-sweep"  # the ConfigMap, read-only, on every pod
RESULTS_ROOT = "/mnt/kd"  # a relative results_dir is mounted under it (a mount path must be absolute)
DEFAULT_RESULTS = "pvc:kd-sweep-results"
TOKEN_SECRET = "kd-sweep-ray-token"
TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName reads
IMAGE_PYTHON = "py311"  # the Python the project is tested with
IMAGE = "rayproject/ray:{ray}-" + IMAGE_PYTHON  # + "-gpu" for GPU workers (CUDA libraries)
HEAD_CPU, HEAD_MEMORY_GIB = 4, 16  # the driver prepares data, tokenizer and teacher logits on the head
WORKER_BASE_GIB, TRIAL_GIB = 2, 2  # a worker pod's memory: Ray's own processes + each trial running at once
CONFIGMAP_LIMIT = 1 << 20  # Kubernetes refuses larger ConfigMaps
MAX_JOB_NAME = 47  # KubeRay: a RayJob name is a DNS-1035 label of at most 47 characters (validation.go)
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def add_arguments(sp) -> None:
    """The `sweep k8s` options (CONFIG and --set come from the CLI's common ones)."""
    sp.add_argument("--results", default=DEFAULT_RESULTS, metavar="pvc:CLAIM[/SUBPATH]",
                    help=f"a ReadWriteMany PersistentVolumeClaim mounted at results_dir on every pod "
                         f"(default {DEFAULT_RESULTS})")
    sp.add_argument("--image", help="an image holding this project, torch and the same Ray (default: Ray's image "
                                    "plus a pip install of this project at its commit)")
    sp.add_argument("--package", metavar="REQUIREMENT",
                    help="the pinned pip requirement the pods install this project from, e.g. "
                         "'kd-sweep @ git+https://github.com/ORG/kd-sweep@COMMIT' (default: this checkout's origin "
                         "remote at its commit)")
    sp.add_argument("--gpu-memory", type=float, metavar="GIB",
                    help="memory of one of the workers' GPUs, for sweep.resources.gpu: auto (e.g. 24 for an A10G "
                         "or L4, 80 for an H100)")
    sp.add_argument("--gpus-per-worker", type=int, metavar="N",
                    help="GPUs each worker pod asks for (default: 1 when trials use GPUs, else 0)")
    sp.add_argument("--workers", type=int, metavar="N",
                    help="worker pods (default: enough for sweep.max_concurrent trials at once)")
    sp.add_argument("--out", help="write the manifest here (default: stdout)")
    sp.add_argument("--force", action="store_true", help="replace an existing --out file")


def main(args, log: Log) -> int:
    out = Path(args.out) if args.out is not None else None
    if out is not None and out.exists() and not args.force:
        raise ConfigError(f"{out}: exists; pass --force to replace it")
    text, name = build_manifest(args.config, args.set, results=args.results, image=args.image, package=args.package,
                                gpu_memory_gib=args.gpu_memory, gpus_per_worker=args.gpus_per_worker,
                                workers=args.workers, log=log)
    if out is None:
        print(text, end="")
        return 0
    from trainable.io import write_text

    write_text(out, text)
    log(f"wrote {out}: kubectl apply -f {out}, then kubectl get rayjob {name} -w (cluster/README.md)")
    return 0


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Results:
    claim: str
    sub_path: str | None  # inside the claim; None: its root


def parse_results(value: str) -> Results:
    """`pvc:CLAIM[/SUBPATH]`. A bucket is refused: trials write into a running sweep's folder from every pod, and
    the sweep relies on atomic renames and on SQLite, which object stores (or their FUSE mounts) do not give."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", value):
        raise ConfigError(f"--results {value}: a bucket cannot hold a running sweep (trials on every pod write "
                          f"checkpoints and the SQLite study into results_dir, which needs a shared file system "
                          f"with atomic renames); give pvc:CLAIM, a ReadWriteMany claim (EFS, Filestore, NFS)")
    if not value.startswith("pvc:"):
        raise ConfigError(f"--results {value}: expected pvc:CLAIM or pvc:CLAIM/SUBPATH (a PersistentVolumeClaim)")
    claim, _, sub = value[len("pvc:"):].partition("/")
    if len(claim) > 253 or not DNS1123_SUBDOMAIN.match(claim):
        raise ConfigError(f"--results {value}: {claim!r} is not a claim name (lower-case letters, digits, '-' and "
                          f"'.', starting and ending with a letter or digit)")
    if not sub:
        return Results(claim, None)
    parts = PurePosixPath(sub).parts
    if ".." in parts or sub.startswith("/") or "//" in sub:
        raise ConfigError(f"--results {value}: the path inside the claim must be relative, without '..'")
    return Results(claim, str(PurePosixPath(*parts)))


def check_image(image: str) -> str:
    """A pinned image reference: a tag other than `latest`, or a digest."""
    last = image.rsplit("/", 1)[-1]
    if not image or any(c.isspace() for c in image):
        raise ConfigError(f"--image {image!r}: expected an image reference such as registry/name:1.2.3")
    if "@sha256:" not in last and (":" not in last or last.rsplit(":", 1)[1] in ("", "latest")):
        raise ConfigError(f"--image {image}: pin a tag other than 'latest' or a digest (name:1.2.3, "
                          f"name@sha256:...), so that every pod runs the same code")
    return image


def installed_version(dist: str) -> str:
    """The release of an installed distribution, without a local suffix ('2.13.0+cpu' -> '2.13.0')."""
    return Version(version(dist)).public


def project_requirement(package: str | None) -> str:
    """The pinned pip requirement for this project: `package`, else this checkout's origin remote at HEAD."""
    if package is None:
        package = _origin_requirement()
    try:
        req = Requirement(package)
    except InvalidRequirement as e:
        raise ConfigError(f"--package {package}: not a pip requirement ({e})") from None
    if req.name.lower().replace("_", "-") != "kd-sweep":
        raise ConfigError(f"--package {package}: expected a requirement for kd-sweep, got {req.name}")
    pinned = (req.url and re.search(r"@[0-9a-f]{7,40}$", req.url)) or any(
        s.operator in ("==", "===") and "*" not in s.version for s in req.specifier)
    if not pinned:
        raise ConfigError(f"--package {package}: pin it (kd-sweep @ git+https://...@COMMIT, or kd-sweep==VERSION) "
                          f"so that every pod installs the same code")
    return package


def _origin_requirement() -> str:
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str | None:
        try:
            r = subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    url, commit = git("remote", "get-url", "origin"), git("rev-parse", "HEAD")
    scp = re.match(r"^[\w.-]+@([\w.-]+):(.+)$", url or "")  # git@github.com:org/repo.git: pods have no SSH key
    if scp:
        url = f"https://{scp.group(1)}/{scp.group(2)}"
    if not (url and commit and url.startswith("https://")):
        raise ConfigError("sweep k8s: the pods need this project: give --image IMAGE (an image that holds it) or "
                          "--package 'kd-sweep @ git+https://.../kd-sweep@COMMIT' (this checkout has no https "
                          "origin remote to install it from)")
    return f"kd-sweep @ git+{url}@{commit}"


# ----------------------------------------------------------------------------- sizing


@dataclass(frozen=True)
class Workers:
    replicas: int
    gpus: int  # per pod (nvidia.com/gpu)
    cpus: int  # per pod
    memory_gib: int  # per pod
    trials_at_once: int  # per pod
    gpu_per_trial: float  # what the trials ask Ray for
    sizing: str  # how, in one line


def size_workers(cfg, space, gpu_memory_gib: float | None, gpus_per_worker: int | None,
                 workers: int | None) -> Workers:
    """Worker pods for the sweep: GPUs per trial as `sweep run` would size them (gpu: auto, for a GPU of
    `gpu_memory_gib`), whole GPUs per pod, and the CPUs and memory of the trials each pod runs at once."""
    res, at_once = cfg.sweep.resources, cfg.sweep.max_concurrent
    wants_gpu = res.gpu == "auto" or res.gpu > 0
    if gpus_per_worker is None:
        gpus_per_worker = (max(1, math.ceil(res.gpu)) if res.gpu != "auto" else 1) if wants_gpu else 0
    if gpus_per_worker < 0 or (workers is not None and workers < 1):
        raise ConfigError("--gpus-per-worker must be 0 or more and --workers 1 or more")
    if res.gpu == "auto":
        fraction, per_gpu, line = _auto_gpu(cfg, space, gpu_memory_gib, gpus_per_worker)
    else:
        fraction = float(res.gpu)
        # in Ray's units of 1e-4, as Ray packs them (1 // 0.1 is 9 in floating point)
        per_gpu = RAY_RESOURCE_UNIT // round(fraction * RAY_RESOURCE_UNIT) if 0 < fraction <= 1 else 0
        line = (f"resources: gpu {fraction:g} per trial (sweep.resources.gpu)" if fraction else
                "resources: CPU only (sweep.resources.gpu: 0)")
    if fraction > 0 and gpus_per_worker == 0:
        raise ConfigError(f"sweep.resources.gpu: {res.gpu}: the trials ask for GPUs, but --gpus-per-worker is 0")
    if fraction > gpus_per_worker:
        raise ConfigError(f"sweep.resources.gpu: a trial asks for {fraction:g} GPUs, more than --gpus-per-worker "
                          f"{gpus_per_worker}")
    if fraction > 0:
        per_pod = per_gpu * gpus_per_worker if fraction <= 1 else int(gpus_per_worker // fraction)
        replicas = workers or math.ceil(at_once / per_pod)
        trials = min(per_pod, math.ceil(at_once / replicas))
    else:
        gpus_per_worker = 0  # the trials use no GPU: a GPU in the pod would sit idle
        replicas = workers or 1
        trials = math.ceil(at_once / replicas)
    cpus = max(1, math.ceil(trials * res.cpu))
    return Workers(replicas, gpus_per_worker, cpus, WORKER_BASE_GIB + TRIAL_GIB * trials, trials, fraction, line)


def _auto_gpu(cfg, space, gpu_memory_gib: float | None, gpus_per_worker: int) -> tuple[float, int, str]:
    if gpus_per_worker == 0:
        return 0.0, 0, "resources: gpu auto: no GPU per worker (--gpus-per-worker 0); running on CPU"
    if not has_hook(cfg.task_def, "gpu_memory"):  # as sweep run says (resources.size_gpu), before asking for memory
        raise ConfigError(f"sweep.resources.gpu: auto: task {cfg.task_def.name} gives no memory estimate; give the "
                          f"GPU fraction per trial as a number")
    if gpu_memory_gib is None or not gpu_memory_gib > 0:
        raise ConfigError("sweep.resources.gpu: auto: give --gpu-memory GIB, the memory of one of the workers' "
                          "GPUs (e.g. 24 for an A10G or L4, 80 for an H100), or --set sweep.resources.gpu=F")
    sizing = size_gpu(cfg, space, int(gpu_memory_gib * (1 << 30)))
    return sizing.fraction, sizing.per_gpu, sizing.line()


# ----------------------------------------------------------------------------- the manifest


def job_name(sweep_name: str) -> str:
    """A DNS-1035 label of at most 47 characters, from the sweep's name."""
    slug = re.sub(r"[^a-z0-9]+", "-", sweep_name.lower()).strip("-")
    return f"kd-sweep-{slug}"[:MAX_JOB_NAME].rstrip("-") if slug else "kd-sweep"


def shipped_config(raw: dict) -> dict[str, str]:
    """The ConfigMap's files: config.yaml (the config as loaded here, --set applied), the search-space file it
    names (as it is, comments and all) and a task .py file, each renamed to its place under /etc/kd-sweep."""
    raw = {**raw, "sweep": dict(raw.get("sweep") or {})}
    files: dict[str, str] = {}
    space = raw["sweep"].get("space")
    if isinstance(space, str):  # found as search_spaces.load_space finds it: the path, else a name in search_spaces/
        path = Path(space) if Path(space).is_file() or not (HERE / space).is_file() else HERE / space
        files["space.yaml"] = path.read_text(encoding="utf-8")
        raw["sweep"]["space"] = f"{CONFIG_MOUNT}/space.yaml"
    task = raw.get("task")
    if isinstance(task, str) and task.endswith(".py"):
        name = Path(task).name
        if not re.match(r"^[-._a-zA-Z0-9]+$", name) or name in ("config.yaml", "space.yaml"):
            raise ConfigError(f"task: {task}: a file name of letters, digits, '-', '_' and '.' is needed to ship it")
        files[name] = Path(task).read_text(encoding="utf-8")
        raw["task"] = f"{CONFIG_MOUNT}/{name}"
    files["config.yaml"] = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    size = sum(len(k) + len(v.encode()) for k, v in files.items())
    if size > CONFIGMAP_LIMIT:
        raise ConfigError(f"sweep k8s: the config, space and task files take {size} bytes, more than a "
                          f"ConfigMap's 1 MiB")
    return files


def results_mount(results_dir: str) -> str:
    """Where the claim is mounted: results_dir itself when absolute, else under /mnt/kd."""
    path = PurePosixPath(results_dir)
    if ".." in path.parts:
        raise ConfigError(f"results_dir: {results_dir}: a path without '..' is needed to mount it on the pods")
    return str(path) if path.is_absolute() else str(PurePosixPath(RESULTS_ROOT, path))


def build_manifest(config_path: str, overrides: list[str], *, results: str = DEFAULT_RESULTS,
                   image: str | None = None, package: str | None = None, gpu_memory_gib: float | None = None,
                   gpus_per_worker: int | None = None, workers: int | None = None,
                   log: Log = lambda m: None) -> tuple[str, str]:
    """(the manifest's text, the RayJob's name): a ConfigMap with the config and the RayJob, every input checked
    before anything is returned."""
    cfg, _ = load_config(config_path, overrides)
    space = load_space_for(cfg)
    if space is None:
        raise ConfigError(f"{config_path}: sweep.space: required key is missing (a search-space file or mapping)")
    store = parse_results(results)
    mount = results_mount(cfg.results_dir)
    shape = size_workers(cfg, space, gpu_memory_gib, gpus_per_worker, workers)
    ray_version = installed_version("ray")
    if image is not None:
        check_image(image)
        runtime_env = None
    else:
        image = IMAGE.format(ray=ray_version) + ("-gpu" if shape.gpus else "")
        requirement = project_requirement(package)
        runtime_env = {"pip": {"packages": [f"torch=={installed_version('torch')}", requirement], "pip_check": False}}
    files = shipped_config(load_raw(config_path, overrides))
    name = job_name(cfg.name)
    command = ["sweep", "run", f"{CONFIG_MOUNT}/config.yaml", "--address", "auto", "--resume",
               "--set", f"results_dir={mount}"]
    if cfg.sweep.resources.gpu == "auto":
        command += ["--set", f"sweep.resources.gpu={shape.gpu_per_trial:g}"]
    labels = {"app.kubernetes.io/name": "kd-sweep", "app.kubernetes.io/instance": name}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config", "labels": labels},
                 "data": files}
    volumes = [
        {"name": "results", "persistentVolumeClaim": {"claimName": store.claim}},
        {"name": "sweep-config", "configMap": {"name": f"{name}-config"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # Ray's object store; a pod's own /dev/shm is 64 MiB
    ]
    mounts = [
        {"name": "results", "mountPath": mount, **({"subPath": store.sub_path} if store.sub_path else {})},
        {"name": "sweep-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    token_env = [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": TOKEN_KEY}}},
    ]

    def pod(container: str, cpu: int, memory_gib: int, gpus: int) -> dict:
        amounts = {"cpu": str(cpu), "memory": f"{memory_gib}Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
        spec = {
            "automountServiceAccountToken": False,  # Ray needs no Kubernetes API (the autoscaler is off)
            "containers": [{
                "name": container, "image": image, "env": token_env, "volumeMounts": mounts,
                "resources": {"requests": dict(amounts), "limits": dict(amounts)},  # equal: Guaranteed QoS
                "securityContext": {"allowPrivilegeEscalation": False},
            }],
            "volumes": volumes,
        }
        if gpus:
            spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        return {"metadata": {"labels": labels}, "spec": spec}

    rayjob = {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name, "labels": labels},
        "spec": {
            "entrypoint": shlex.join(command),
            **({"runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False)} if runtime_env else {}),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,  # the Ray cluster goes when the sweep ends; the results stay
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 2,  # a retry gets a new Ray cluster; --resume continues the sweep from its state
            "rayClusterSpec": {
                "rayVersion": ray_version,
                "enableInTreeAutoscaling": False,
                "authOptions": {"mode": "token", "secretName": TOKEN_SECRET},
                "headGroupSpec": {
                    "serviceType": "ClusterIP",
                    "enableIngress": False,
                    "rayStartParams": {"num-cpus": "0"},  # no trial on the head: it runs the driver
                    "template": pod("ray-head", HEAD_CPU, HEAD_MEMORY_GIB, 0),
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu" if shape.gpus else "cpu",
                    "replicas": shape.replicas, "minReplicas": shape.replicas, "maxReplicas": shape.replicas,
                    "rayStartParams": {},
                    "template": pod("ray-worker", shape.cpus, shape.memory_gib, shape.gpus),
                }],
            },
        },
    }
    header = [
        f"# kd-sweep: sweep {cfg.name} on Kubernetes (KubeRay >= 1.5.1), written by `sweep k8s`; cluster/README.md",
        f"# Ray {ray_version}, image {image}" + (" + pip: " + ", ".join(runtime_env["pip"]["packages"])
                                                 if runtime_env else ""),
        f"# results: PersistentVolumeClaim {store.claim}" + (f" (at {store.sub_path})" if store.sub_path else "")
        + f" mounted at {mount} on every pod (ReadWriteMany)",
        f"# token: Secret {TOKEN_SECRET}, key {TOKEN_KEY}",
        f"# {shape.sizing}",
        f"# workers: {shape.replicas} x ({shape.gpus} GPU, {shape.cpus} CPU, {shape.memory_gib}Gi): "
        f"{shape.trials_at_once} trial(s) at once each, sweep.max_concurrent {cfg.sweep.max_concurrent}",
    ]
    log(shape.sizing)
    log(header[-1].removeprefix("# "))
    if runtime_env and package is None:
        log(f"the pods install {requirement}: push that commit first (uncommitted changes are not in it)")
    docs = [yaml.dump(d, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120) for d in (configmap, rayjob)]
    return "\n".join(header) + "\n---\n" + "---\n".join(docs), name


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the shipped config, the runtime env) as literal blocks, readable in the manifest; a
    repeated part (the pods' shared env and volumes) written out again, not as a YAML alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)
