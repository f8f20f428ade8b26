"""The cluster YAMLs: valid for Ray's own cluster-config schema, and safe by default (no Ray port open to the
world, dashboard on 127.0.0.1, token authentication on, pinned versions, no committed secrets)."""
import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
FILES = sorted(CLUSTER.glob("*.yaml"))
WORLD = {"0.0.0.0/0", "::/0"}


def safety_problems(cfg: dict) -> list[str]:
    """Every way a cluster config exposes Ray or runs unpinned code; empty when safe."""
    problems = []
    sg = cfg.get("provider", {}).get("security_group", {})
    for perm in sg.get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in perm.get("IpRanges", [])] + [r.get("CidrIpv6") for r in perm.get("Ipv6Ranges", [])]
        if WORLD & set(ranges):
            problems.append(f"ports {perm.get('FromPort')}-{perm.get('ToPort')} open to the world")
        elif ranges and (perm.get("FromPort"), perm.get("ToPort")) != (22, 22):
            problems.append(f"ports {perm.get('FromPort')}-{perm.get('ToPort')} reachable from outside the cluster")
    if cfg.get("provider", {}).get("type") == "aws":
        for name, node in cfg.get("available_node_types", {}).items():
            nc = node.get("node_config", {})
            if not nc.get("SecurityGroupIds"):
                problems.append(f"{name}: no pre-made SecurityGroupIds (Ray would create one with SSH open to the world)")
            if not nc.get("IamInstanceProfile"):
                problems.append(f"{name}: no IamInstanceProfile (Ray's default grants EC2 and S3 full access)")
    if cfg.get("provider", {}).get("type") == "gcp":
        for name, node in cfg.get("available_node_types", {}).items():
            if not node.get("node_config", {}).get("serviceAccounts"):
                problems.append(f"{name}: no service account (the default one has broad project rights)")
    starts = cfg.get("head_start_ray_commands", []) + cfg.get("worker_start_ray_commands", [])
    for cmd in starts:
        if "ray start" in cmd and "RAY_AUTH_MODE=token" not in cmd:
            problems.append(f"ray start without token authentication: {cmd.strip()}")
        if "0.0.0.0" in cmd:
            problems.append(f"a Ray service bound to 0.0.0.0: {cmd.strip()}")
    head = " ".join(cfg.get("head_start_ray_commands", []))
    if "--head" in head and "--include-dashboard=false" not in head and "--dashboard-host=127.0.0.1" not in head:
        problems.append("the dashboard is not bound to 127.0.0.1")
    for cmd in cfg.get("setup_commands", []):
        for req in pip_installed(cmd):
            if req.name in ("ray", "torch", "kd-sweep") and not (req.url or any(
                    s.operator in ("==", "===") and "*" not in s.version for s in req.specifier)):
                problems.append(f"{req} is not pinned: {cmd}")
            if req.name == "ray" and "default" not in req.extras:
                problems.append(f"{req} lacks the [default] extra (the dashboard and `ray job submit` need it)")
    for src, dst in cfg.get("file_mounts", {}).items():
        if "auth_token" in src and not str(dst).startswith("~"):
            problems.append("the auth token must be mounted from the user's machine")
    return problems


# pip options that take a value (the value is not a requirement); -e/--editable's value is one.
_PIP_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                      "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--src", "--python-version",
                      "--platform", "--implementation", "--abi", "--progress-bar", "--cache-dir", "--log"}


def pip_installed(cmd: str) -> list:
    """The requirements every `pip install` in a shell command line asks for, read as the shell and pip read them
    (shlex: quoted or not, `&&`/`;`/`|` between commands), so `pip install ray[tune] torch` is seen as well as
    `pip install "ray[tune]" "torch"`."""
    from packaging.requirements import InvalidRequirement, Requirement

    lexer = shlex.shlex(cmd, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    words, segments = list(lexer), [[]]
    for w in words:
        if w and set(w) <= set(";&|"):
            segments.append([])
        else:
            segments[-1].append(w)
    reqs = []
    for seg in segments:
        pip = next((i for i, w in enumerate(seg) if re.fullmatch(r"(.*/)?pip3?(\.\d+)?", w)), None)
        if pip is None or pip + 1 >= len(seg) or seg[pip + 1] != "install":
            continue
        args, i = seg[pip + 2:], 0
        while i < len(args):
            w = args[i]
            if w in _PIP_VALUE_OPTIONS:
                i += 2
                continue
            if w in ("-e", "--editable"):
                i += 1
                continue
            if w.startswith("-"):
                i += 1
                continue
            if i + 2 < len(args) and args[i + 1] == "@":  # `name @ url`, unquoted: three words
                w, i = f"{w} @ {args[i + 2]}", i + 2
            try:
                reqs.append(Requirement(w))
            except InvalidRequirement:  # a local path or a bare URL: names no package this check pins
                pass
            i += 1
    return reqs


def test_pip_installed_reads_specs_quoted_or_not():
    names = lambda cmd: [(r.name, sorted(r.extras), str(r.specifier), r.url) for r in pip_installed(cmd)]
    assert names('python3 -m pip install --quiet "ray[default,tune]==2.60.0" "torch==2.13.0"') == [
        ("ray", ["default", "tune"], "==2.60.0", None), ("torch", [], "==2.13.0", None)]
    cmd = "cd /x && pip install ray[tune] torch; pip3 install -i https://idx kd-sweep @ git+https://h/r@SHA"
    assert names(cmd) == [
        ("ray", ["tune"], "", None), ("torch", [], "", None), ("kd-sweep", [], "", "git+https://h/r@SHA")]
    assert names("ray start --head") == [] and names("pip install -e . -r requirements.txt") == []


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_valid_for_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_safe_by_default(path):
    cfg = yaml.safe_load(path.read_text())
    assert safety_problems(cfg) == []
    assert "auth_token" in " ".join(cfg.get("file_mounts", {}))
    assert not list(CLUSTER.glob("*auth_token*"))


def test_every_field_is_commented():
    """Each key carries a comment on its line or on the line above."""
    for path in FILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not re.match(r'^\s*(- )?[A-Za-z_"~][A-Za-z0-9_"~./-]*:(\s|$)', line):
                continue
            prev = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
            assert "#" in line or prev.startswith("#"), f"{path.name}:{i + 1}: {line.strip()} has no comment"


@pytest.mark.parametrize("mutate,expected", [
    (lambda c: c["provider"].setdefault("security_group", {}).setdefault("IpPermissions", []).append(
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}), "open to the world"),
    (lambda c: c["provider"].setdefault("security_group", {}).setdefault("IpPermissions", []).append(
        {"FromPort": 6379, "ToPort": 6379, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}),
     "reachable from outside"),
    (lambda c: c.__setitem__("head_start_ray_commands", ["ray stop", "RAY_AUTH_MODE=token ray start --head --dashboard-host=0.0.0.0"]),
     "0.0.0.0"),
    (lambda c: c.__setitem__("worker_start_ray_commands", ["ray start --address=$RAY_HEAD_IP:6379"]), "token"),
    (lambda c: c["available_node_types"]["head"]["node_config"].pop("SecurityGroupIds"), "SecurityGroupIds"),
    (lambda c: c["available_node_types"]["gpu1"]["node_config"].pop("IamInstanceProfile"), "IamInstanceProfile"),
    (lambda c: c.__setitem__("setup_commands", ['python3 -m pip install "ray[default,tune]" "torch==2.13.0"']),
     "not pinned"),
    (lambda c: c.__setitem__("setup_commands", ['python3 -m pip install "ray[tune]==2.60.0" "torch==2.13.0"']),
     "[default] extra"),
    # unquoted specs, as a shell reads them
    (lambda c: c.__setitem__("setup_commands", ["pip install ray[default,tune]==2.60.0 torch"]), "torch is not pinned"),
    (lambda c: c.__setitem__("setup_commands", ["pip install ray[tune] torch==2.13.0"]), "ray[tune] is not pinned"),
    (lambda c: c.__setitem__("setup_commands", ["pip install ray[tune]==2.60.0 torch==2.13.0"]), "[default] extra"),
    (lambda c: c.__setitem__("setup_commands", ["cd /tmp && pip install kd-sweep"]), "kd-sweep is not pinned"),
    (lambda c: c.__setitem__("setup_commands", ['pip install "torch>=2.4" "ray[default]==2.60.0"']), "not pinned"),
])
def test_an_unsafe_config_fails_the_check(mutate, expected):
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    mutate(cfg)
    problems = safety_problems(cfg)
    assert any(expected in p for p in problems), problems
