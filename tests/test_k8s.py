"""`sweep k8s`: the KubeRay RayJob manifest validates against KubeRay's own RayJob CRD schema (vendored in
tests/kuberay/, v1.7.0) and the checks KubeRay's operator adds to it; its command is a `sweep run` our CLI parses,
reading the same config the user validated; GPUs per trial as `gpu: auto` sizes them; the token from a Secret on
every Ray pod; nothing exposed beyond the cluster. Bad input: one line, exit 2, nothing written."""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import ROOT, run_cli

CRD = Path(__file__).resolve().parent / "kuberay" / "ray.io_rayjobs.yaml"
PACKAGE = "kd-sweep @ git+https://git.example.org/kd-sweep@0123456789abcdef0123456789abcdef01234567"
SPACE = {"parameters": {"student.hidden_dim": {"type": "int", "low": 16, "high": 64},
                        "train.alpha": {"type": "float", "low": 0.0, "high": 0.9}}}


@functools.cache
def rayjob_validator() -> jsonschema.Draft7Validator:
    """The CRD's v1 openAPIV3Schema, strict about unknown fields as `kubectl apply` is (server-side field
    validation, Strict by default since Kubernetes 1.27): an object schema with properties and no
    additionalProperties / x-kubernetes-preserve-unknown-fields takes no other keys."""
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(job: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in rayjob_validator().iter_errors(job)]


def kuberay_problems(job: dict) -> list[str]:
    """The operator's own checks of a RayJob that the schema cannot express, as KubeRay v1.7.0 writes them
    (ray-operator/controllers/ray/utils/validation.go: ValidateRayJobMetadata, ValidateRayJobSpec,
    ValidateRayClusterSpec), for the fields this manifest sets. The CRD's CEL rules are on fields it leaves out."""
    problems = []
    name = job["metadata"]["name"]
    if len(name) > 47 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"name {name!r}: a DNS-1035 label of at most 47 characters")
    spec = job["spec"]
    assert not {"deletionStrategy", "managedBy"} & set(spec), "CEL-validated fields: check them by hand"
    rc = spec["rayClusterSpec"]
    if not rc["headGroupSpec"]["template"]["spec"].get("containers"):
        problems.append("headGroupSpec has no container")
    auth = rc.get("authOptions") or {}
    if auth.get("mode") == "token":
        version = tuple(int(x) for x in rc.get("rayVersion", "0").split(".")[:3])
        if version < (2, 52, 0):
            problems.append(f"authOptions.mode token needs rayVersion >= 2.52.0, got {rc.get('rayVersion')}")
        if auth.get("enableK8sTokenAuth"):
            problems.append("K8s token auth is not supported for RayJob")
    groups = [("Head", rc["headGroupSpec"])] + [(g["groupName"], g) for g in rc.get("workerGroupSpecs", [])]
    for group, g in groups:
        params = g.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            problems.append(f"{group}: resources in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{group}: rayStartParams['labels'] is not supported")
    for group, g in groups[1:]:
        if not g["template"]["spec"].get("containers"):
            problems.append(f"{group}: no container")
        if not rc.get("enableInTreeAutoscaling") and (g.get("minReplicas") is None or g.get("maxReplicas") is None):
            problems.append(f"{group}: minReplicas and maxReplicas must be set when autoscaling is off")
        if g.get("minReplicas", 0) > g.get("maxReplicas", 1 << 30):
            problems.append(f"{group}: minReplicas > maxReplicas")
    if spec.get("ttlSecondsAfterFinished", 0) < 0 or spec.get("backoffLimit", 0) < 0:
        problems.append("negative ttlSecondsAfterFinished or backoffLimit")
    yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")  # the operator refuses runtimeEnvYAML that is not YAML
    return problems


def write_config(tmp_path, name: str = "k8s.yaml", **sweep) -> Path:
    cfg = {"name": "k8s_Demo.1", "data": {"dir": str(ROOT.parent / "shared" / "data" / "nsmc"), "download": False,
                                          "train_rows": 2000, "test_rows": 500},
           "tokenizer": {"vocab_size": 2000, "max_length": 48}, "teacher": {"source": "ngram"},
           "train": {"epochs": 2}, "results_dir": "results",
           "sweep": {"space": SPACE, "max_concurrent": 4, **sweep}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def k8s(*args: str, package: str | None = PACKAGE) -> subprocess.CompletedProcess:
    """`sweep k8s ARGS` through the CLI's own entry point, in this process (a fresh process per call costs ~10 s
    of imports here; test_out_refuses_to_overwrite_unless_forced runs it as a user would)."""
    from sweep.cli import main

    argv = ["k8s", *args, *(["--package", package] if package else [])]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def manifest(*args: str) -> tuple[dict, dict, str]:
    """(ConfigMap, RayJob, text) of `sweep k8s ARGS` printed on stdout."""
    r = k8s(*args)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    return docs[0], docs[1], r.stdout


def ray_containers(job: dict) -> list[dict]:
    rc = job["spec"]["rayClusterSpec"]
    pods = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    return [c for p in pods for c in p["spec"]["containers"]]


def test_the_manifest_validates_against_kuberay_rayjob_crd(tmp_path):
    cpu = write_config(tmp_path, "cpu.yaml")
    gpu = write_config(tmp_path, "gpu.yaml", resources={"cpu": 1, "gpu": "auto"})
    for args in ([str(cpu)], [str(gpu), "--gpu-memory", "24", "--results", "pvc:team-share/sweeps/kd"],
                 [str(cpu), "--image", "registry.example.org/kd-sweep:0.1.0", "--workers", "2"]):
        _, job, _ = manifest(*args)
        assert schema_errors(job) == [], args
        assert kuberay_problems(job) == [], args


@pytest.mark.parametrize("path,value,expected", [
    (["spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"], "1", "is not of type 'integer'"),
    (["spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"], 0, "is not of type 'string'"),
    (["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits",
      "memory"], "lots", "does not match"),
    (["spec", "rayClusterSpec", "headGroupSpec", "serviceTyp"], "ClusterIP", "Additional properties"),
])
def test_a_broken_manifest_fails_the_schema(tmp_path, path, value, expected):
    _, job, _ = manifest(str(write_config(tmp_path)))
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = schema_errors(job)
    assert errors and any(expected in e for e in errors), errors


def test_the_job_runs_sweep_run_on_the_config_validated_here(tmp_path):
    from sweep.cli import build_parser
    from sweep.config import load_config

    path = write_config(tmp_path, resources={"cpu": 1, "gpu": "auto"})
    configmap, job, _ = manifest(str(path), "--set", "train.epochs=3", "--gpu-memory", "24")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "sweep"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.address, args.resume) == ("run", "auto", True)
    # The ConfigMap's files, where the pods mount them (/etc/kd-sweep), moved into tmp_path.
    mounted = tmp_path / "etc-kd-sweep"
    mounted.mkdir()
    for name, text in configmap["data"].items():
        (mounted / name).write_text(text.replace("/etc/kd-sweep", str(mounted)))
    config = args.config.replace("/etc/kd-sweep", str(mounted))
    there, _ = load_config(config, args.set)
    here, _ = load_config(path, ["train.epochs=3"])
    assert there.results_dir == "/mnt/kd/results" and there.sweep.resources.gpu > 0
    assert there.train.epochs == 3  # the user's --set travelled in the shipped config
    assert there.model_dump(exclude={"results_dir", "sweep"}) == here.model_dump(exclude={"results_dir", "sweep"})
    assert there.sweep.model_dump(exclude={"resources"}) == here.sweep.model_dump(exclude={"resources"})
    for container in ray_containers(job):
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/etc/kd-sweep"]["readOnly"] and mounts["/mnt/kd/results"]["name"] == "results"


def test_a_space_file_and_a_task_file_travel_in_the_configmap(tmp_path):
    from sweep.config import load_config

    space = tmp_path / "space.yaml"
    space.write_text("# the toy's space\nparameters:\n  toy.width: {type: int, low: 2, high: 8}\n")
    task = ROOT / "tests" / "test_tasks.py"  # a task module in one file (the toy of tests/test_tasks.py)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"task": str(task), "name": "toy", "sweep": {"space": "space.yaml"}}))
    configmap, _, _ = manifest(str(path))
    assert configmap["data"]["space.yaml"] == space.read_text()  # as it is, comments and all
    assert configmap["data"]["test_tasks.py"] == task.read_text()
    shipped = yaml.safe_load(configmap["data"]["config.yaml"])
    assert (shipped["task"], shipped["sweep"]["space"]) == ("/etc/kd-sweep/test_tasks.py", "/etc/kd-sweep/space.yaml")
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    for name, text in configmap["data"].items():
        (mounted / name).write_text(text.replace("/etc/kd-sweep", str(mounted)))
    assert load_config(mounted / "config.yaml")[0].task == str(mounted / "test_tasks.py")


def test_gpu_auto_is_sized_as_sweep_run_sizes_it_and_workers_ask_for_whole_gpus(tmp_path):
    from sweep.config import load_config, load_space_for
    from sweep.resources import size_gpu

    path = write_config(tmp_path, resources={"cpu": 1, "gpu": "auto"})
    _, job, text = manifest(str(path), "--gpu-memory", "24")
    cfg, _ = load_config(path)
    sizing = size_gpu(cfg, load_space_for(cfg), 24 << 30)
    assert 0 < sizing.fraction < 1
    assert f"--set sweep.resources.gpu={sizing.fraction:g}" in job["spec"]["entrypoint"]
    assert sizing.line() in text  # the decision, in the manifest's header
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and limits["cpu"] == "4"  # max_concurrent 4 trials share the GPU
    assert group["replicas"] == 1 and ray_containers(job)[0]["image"].endswith("-gpu")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]

    # A smaller GPU packs fewer trials: more worker pods for the same max_concurrent.
    _, small, _ = manifest(str(path), "--gpu-memory", "0.9")  # ~1.5 trials fit in 0.72 GiB: one per GPU
    (group,) = small["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert "sweep.resources.gpu=1" in small["spec"]["entrypoint"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (4, 4, 4)

    # A fixed fraction is the config's; whole GPUs per trial get as many per pod.
    _, fixed, _ = manifest(str(write_config(tmp_path, "two.yaml", resources={"cpu": 2, "gpu": 2})))
    (group,) = fixed["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert "sweep.resources.gpu" not in fixed["spec"]["entrypoint"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (limits["nvidia.com/gpu"], limits["cpu"], group["replicas"]) == ("2", "2", 4)


def test_token_from_a_secret_on_every_ray_pod_and_nothing_exposed(tmp_path):
    from importlib.metadata import version

    _, job, text = manifest(str(write_config(tmp_path)))
    rc = job["spec"]["rayClusterSpec"]
    assert rc["authOptions"] == {"mode": "token", "secretName": "kd-sweep-ray-token"}
    containers = ray_containers(job)
    assert len(containers) == 2
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "kd-sweep-ray-token",
                                                                        "key": "auth_token"}}
        assert "value" not in env["RAY_AUTH_TOKEN"]  # never the token itself
        assert not any("hostPort" in p for p in c.get("ports", []))
        assert c["image"] == f"rayproject/ray:{rc['rayVersion']}-py311"
    assert rc["rayVersion"] == version("ray")
    head = rc["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    assert "dashboard-host" not in head["rayStartParams"]
    assert not any(p["spec"].get("hostNetwork") for p in [head["template"]] + [
        g["template"] for g in rc["workerGroupSpecs"]])
    assert "LoadBalancer" not in text and "NodePort" not in text and "0.0.0.0" not in text


def test_the_runtime_env_pins_torch_and_the_project_and_ray_parses_it(tmp_path):
    from importlib.metadata import version

    from ray.runtime_env import RuntimeEnv

    from packaging.version import Version

    path = str(write_config(tmp_path))
    _, job, _ = manifest(path)
    env = RuntimeEnv(**yaml.safe_load(job["spec"]["runtimeEnvYAML"]))  # Ray's own check of the runtime env
    assert env["pip"]["packages"] == [f"torch=={Version(version('torch')).public}", PACKAGE]
    _, own, _ = manifest(path, "--image", "registry.example.org/kd-sweep@sha256:" + "ab" * 32)
    assert "runtimeEnvYAML" not in own["spec"]  # the user's image holds the project
    assert {c["image"] for c in ray_containers(own)} == {"registry.example.org/kd-sweep@sha256:" + "ab" * 32}


@pytest.mark.parametrize("args,expected", [
    (["--set", "train.unknown=1"], "train.unknown: unknown key"),
    (["--results", "s3://bucket/sweeps"], "--results s3://bucket/sweeps: a bucket cannot hold a running sweep"),
    (["--results", "pvc:Team_Share"], "'Team_Share' is not a claim name"),
    (["--results", "/mnt/kd"], "expected pvc:CLAIM"),
    (["--results", "pvc:share/../other"], "must be relative, without '..'"),
    (["--image", "rayproject/ray:latest"], "pin a tag other than 'latest'"),
    (["--image", "rayproject/ray"], "pin a tag other than 'latest'"),
    (["--set", "sweep.resources.gpu=auto"], "give --gpu-memory GIB"),
    (["--set", "sweep.resources.gpu=0.5", "--gpus-per-worker", "0"], "--gpus-per-worker is 0"),
    (["--package", "kd-sweep>=0.1"], "--package kd-sweep>=0.1: pin it"),
    (["--package", "torch==2.13.0"], "expected a requirement for kd-sweep"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args, expected):
    out = tmp_path / "job.yaml"
    r = k8s(str(write_config(tmp_path)), "--out", str(out), *args,
            package=None if "--package" in args else PACKAGE)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr
    assert not out.exists() and r.stdout == ""


def test_without_image_or_package_the_pods_install_this_checkouts_origin_or_it_is_refused(tmp_path):
    """Without --image or --package the pods install this checkout's https origin at HEAD; a checkout without
    one (no remote, or a local path or SSH-only remote as in a CI clone) is refused in one line."""
    import re

    def git(*argv):
        r = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    url = git("remote", "get-url", "origin")
    out = tmp_path / "job.yaml"
    r = k8s(str(write_config(tmp_path)), "--out", str(out), package=None)
    if url.startswith("https://") or re.match(r"^[\w.-]+@([\w.-]+):(.+)$", url):
        assert r.returncode == 0, r.stderr
        assert f"@{git('rev-parse', 'HEAD')}" in out.read_text()
    else:
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "give --image IMAGE" in r.stderr
        assert "--package" in r.stderr and not out.exists()


def test_out_refuses_to_overwrite_unless_forced(tmp_path):
    path, out = str(write_config(tmp_path)), tmp_path / "job.yaml"
    out.write_text("mine\n")
    r = run_cli("k8s", path, "--package", PACKAGE, "--out", str(out))  # as a user runs it: a process of its own
    assert r.returncode == 2 and r.stderr.strip() == f"error: {out}: exists; pass --force to replace it"
    assert out.read_text() == "mine\n"
    r = run_cli("k8s", path, "--package", PACKAGE, "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert [d["kind"] for d in yaml.safe_load_all(out.read_text()) if d] == ["ConfigMap", "RayJob"]
    assert "kubectl apply -f" in r.stderr and r.stdout == ""
