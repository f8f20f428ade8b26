"""`ray up cluster/local.yaml` end to end, over real SSH: `ray up`, a tiny sweep through `ray job submit` (the job
API reached through `ray dashboard`'s SSH tunnel, with the cluster token), then `ray down`.

Two hosts made here, each in network namespaces of its own: the user's machine (runs `ray up`, `ray dashboard`,
`ray job submit`, `ray down`) and the head machine (runs only an SSH server; everything Ray does there, `ray up`
starts over SSH). The head also has its own PID and mount namespaces, so `ray stop` in the YAML's start
commands sees only the head's processes, and its home folder and /tmp/ray are its own.

The YAML is cluster/local.yaml with only what must differ here changed: the addresses, the SSH user and key, and
no setup_commands (they pip-install pinned packages from the internet; this machine already has them).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import RAY_GIVES_UP_FAST, ROOT, small_config
from netns_cluster import _sh, remove_hosts, two_hosts

SSHD = "/usr/sbin/sshd"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network, PID and mount namespaces need root"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path(SSHD).exists():
        return "no SSH server (Debian's openssh-server; .ci/run installs it)"
    if importlib.util.find_spec("aiohttp") is None:  # Ray's dashboard and job API: ray[default]
        return "ray[default] is not installed (the job API needs it)"
    return None


pytestmark = pytest.mark.needs(_why_not())


class Hosts:
    """The user's machine (`client`) and the head machine (`head`), joined by a veth pair."""

    def __init__(self, tmp: Path):
        tag = str(os.getpid() % 100000)
        net = 10 + os.getpid() % 200
        self.client_ns, self.head_ns = f"kuc{tag}", f"kuh{tag}"
        self.client_ip, self.head_ip = f"10.78.{net}.2", f"10.78.{net}.1"
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.bin = str(Path(sys.executable).parent)
        # Short paths for what Ray puts unix sockets under (108-byte limit).
        self.head_ray_tmp = Path(f"/tmp/kuh{tag}")
        self.client_ray_tmp = Path(f"/tmp/kuc{tag}")

    def __enter__(self) -> "Hosts":
        try:
            self._network()
            self._keys()
            self._start_sshd()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _network(self) -> None:
        two_hosts(self.client_ns, self.client_ip, self.head_ns, self.head_ip)
        # Ray finds a node's own address through its default route (a UDP connect; nothing is sent).
        _sh("ip", "-n", self.head_ns, "route", "add", "default", "via", self.client_ip)

    def _keys(self) -> None:
        self.key = self.tmp / "id_kd"
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.tmp / "host_key"))
        self.head_home = self.tmp / "head-home"
        (self.head_home / ".ssh").mkdir(parents=True)
        shutil.copy(f"{self.key}.pub", self.head_home / ".ssh" / "authorized_keys")
        # `ray up` runs its commands in login shells: this machine's Python (and `ray`) on their PATH.
        (self.head_home / ".profile").write_text(f'export PATH="{self.bin}:$PATH"\n')
        self.client_home = self.tmp / "client-home"
        (self.client_home / ".ray").mkdir(parents=True)
        token = self.client_home / ".ray" / "auth_token"
        token.write_text(os.urandom(32).hex())
        token.chmod(0o600)
        for d in (self.head_ray_tmp, self.client_ray_tmp):
            d.mkdir()

    def _start_sshd(self) -> None:
        path = f"{self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        conf = self.tmp / "sshd_config"
        conf.write_text("\n".join([
            f"ListenAddress {self.head_ip}", "Port 22", f"HostKey {self.tmp / 'host_key'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", f"AuthorizedKeysFile {self.head_home / '.ssh' / 'authorized_keys'}",
            f"PidFile {self.tmp / 'sshd.pid'}", f"SetEnv PATH={path}", "AllowTcpForwarding local",
            "X11Forwarding no", "Subsystem sftp internal-sftp", ""]))
        Path("/run/sshd").mkdir(exist_ok=True)
        # The head machine: its own network, PIDs, home folder and /tmp/ray. Its home keeps what this machine's
        # Python installation has under /root (pyenv, user site-packages), as a real node would have it installed.
        keep = []
        for d in {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path("/root/.local")}:
            if d.is_relative_to("/root") and d != Path("/root") and d.exists():
                top = d.relative_to("/root").parts[0]
                (self.head_home / top).mkdir(exist_ok=True)
                keep.append(f"mount --bind /root/{top} {self.head_home / top}")
        inner = " && ".join(["mkdir -p /tmp/ray", f"mount --bind {self.head_ray_tmp} /tmp/ray", *keep,
                             f"mount --rbind {self.head_home} /root", f"exec {SSHD} -D -e -f {conf}"])
        self._spawn("sshd", ["ip", "netns", "exec", self.head_ns, "unshare", "--pid", "--fork", "--mount-proc",
                             "--mount", "--propagation", "private", "sh", "-c", inner], {})
        deadline = time.time() + 30
        while time.time() < deadline:
            out = _sh("ip", "netns", "exec", self.head_ns, "ss", "-ltnH")
            if f"{self.head_ip}:22" in out:
                return
            time.sleep(0.2)
        raise TimeoutError("sshd did not start: " + (self.tmp / "sshd.log").read_text()[-2000:])

    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, **env})
        self.procs.append(p)
        return p

    def client(self, args: list[str], name: str, wait: bool = True, timeout: float = 600):
        """A command on the user's machine: its own network, HOME and /tmp/ray; the cluster token in HOME."""
        env = {"HOME": str(self.client_home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        inner = f"mount --bind {self.client_ray_tmp} /tmp/ray && exec \"$@\""
        cmd = ["ip", "netns", "exec", self.client_ns, "unshare", "--mount", "--propagation", "private",
               "sh", "-c", inner, "sh", *args]
        p = self._spawn(name, cmd, env)
        if not wait:
            return p
        p.wait(timeout=timeout)
        return p.returncode, (self.tmp / f"{name}.log").read_text()

    def head_listeners(self, procs: bool = False) -> list[str]:
        if procs:
            return _sh("ip", "netns", "exec", self.head_ns, "ss", "-ltnpH").splitlines()
        return [ln.split()[3] for ln in _sh("ip", "netns", "exec", self.head_ns, "ss", "-ltnH").splitlines()]

    def __exit__(self, *exc) -> None:
        remove_hosts(list(reversed(self.procs)), [self.client_ns, self.head_ns],
                     [self.head_ray_tmp, self.client_ray_tmp])


def test_ray_up_local_yaml_job_submit_and_ray_down(nsmc_dir, cache_dir, tmp_path):
    with Hosts(tmp_path) as hosts:
        cluster = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
        cluster["cluster_name"] = f"kd-test-{hosts.head_ns}"
        cluster["max_workers"] = 0
        cluster["provider"].update(head_ip=hosts.head_ip, worker_ips=[])
        cluster["auth"] = {"ssh_user": "root", "ssh_private_key": str(hosts.key)}
        cluster["setup_commands"] = []
        cluster_yaml = tmp_path / "local.yaml"
        cluster_yaml.write_text(yaml.safe_dump(cluster))

        cfg = small_config(nsmc_dir, cache_dir, tmp_path / "results", train={"epochs": 1, "threads": 1},
                           student={"embedding_dim": 16, "hidden_dim": 16})
        cfg["name"] = "rayup"
        cfg["sweep"] = {"space": {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [8, 16]}}},
                        "searcher": "grid", "scheduler": {"kind": "none"}, "twins": 0}
        sweep_yaml = tmp_path / "sweep.yaml"
        sweep_yaml.write_text(yaml.safe_dump(cfg))

        rc, out = hosts.client(["ray", "up", "-y", "--no-config-cache", str(cluster_yaml)], "ray-up")
        assert rc == 0, out[-4000:]
        # The job API (which runs any command it is sent) listens on the head's loopback only; the ports the
        # nodes use among themselves (GCS, raylets) are for the cluster's own network (the security group or
        # firewall keeps the world out), and they refuse a client without the cluster's token.
        listeners = hosts.head_listeners()
        assert "127.0.0.1:8265" in listeners and not any(a.endswith(":8265") and not a.startswith("127.0.0.1")
                                                         for a in listeners), listeners
        probe = ("import ray; ray.init(address='%s:6379', logging_level='ERROR'); print('JOINED')" % hosts.head_ip)
        r = subprocess.run(["ip", "netns", "exec", hosts.client_ns, sys.executable, "-c", probe], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token",
                                                        "RAY_AUTH_TOKEN": "not-the-cluster-token",
                                                        **RAY_GIVES_UP_FAST})
        assert r.returncode != 0 and "JOINED" not in r.stdout and "token" in (r.stdout + r.stderr).lower(), r

        tunnel = hosts.client(["ray", "dashboard", str(cluster_yaml)], "ray-dashboard", wait=False)
        deadline = time.time() + 60
        while time.time() < deadline:
            ns_listeners = _sh("ip", "netns", "exec", hosts.client_ns, "ss", "-ltnH")
            if "127.0.0.1:8265" in ns_listeners:
                break
            assert tunnel.poll() is None, (tmp_path / "ray-dashboard.log").read_text()[-2000:]
            time.sleep(0.5)
        rc, out = hosts.client(["ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--",
                                "python", "-m", "sweep.cli", "run", str(sweep_yaml), "--address", "auto"],
                               "job-submit")
        assert rc == 0 and "succeeded" in out, out[-4000:]
        rows = pq.read_table(tmp_path / "results" / "rayup" / "trials.parquet").to_pylist()
        assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}, rows
        assert {r["nodes"] for r in rows} == {hosts.head_ip}  # the trials ran on the head machine

        rc, out = hosts.client(["ray", "down", "-y", str(cluster_yaml)], "ray-down")
        assert rc == 0, out[-4000:]
        assert not any(a.endswith((":6379", ":8265")) for a in hosts.head_listeners())
