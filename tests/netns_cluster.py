"""A real two-node Ray cluster on one machine: each node a host of its own in a Linux network namespace.

Ray turns 127.0.0.1 into the machine's interface address (../shared/RAY_NOTES.md), so `ray.cluster_utils.Cluster`
and loopback `ray start` cannot make a multi-node cluster that stays on loopback. Network namespaces joined by a
veth pair can: the head is 10.77.N.1, the worker 10.77.N.2, and nothing else can reach either.

The worker node also runs in a mount namespace of its own, with empty filesystems mounted over the paths that
only the driver's disk has on a real cluster (the driver's Ray temp dir, the data and cache folders). Only the
shared folder (the sweep's results) is common to both, as NFS would be.

Needs root and iproute2. Every process started here is in a process group of ours and is stopped by PID; the
namespaces are deleted on exit.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

RAY_PORT = 6390
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"


def can_make_namespaces() -> str | None:
    """None when this machine can run the cluster, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "iproute2 (ip) and util-linux (unshare) are needed"
    return None


def _sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def two_hosts(ns_a: str, ip_a: str, ns_b: str, ip_b: str) -> None:
    """Two hosts, each a network namespace of its own, joined by a veth pair on a /24."""
    dev_a, dev_b = f"{ns_a}v", f"{ns_b}v"
    for ns in (ns_a, ns_b):
        _sh("ip", "netns", "add", ns)
    _sh("ip", "link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
    for ns, dev, ip in ((ns_a, dev_a, ip_a), (ns_b, dev_b, ip_b)):
        _sh("ip", "link", "set", dev, "netns", ns)
        _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ns, "link", "set", dev, "up")


def kill_namespace(ns: str) -> None:
    """Every process left in one of our own namespaces, by PID."""
    for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def killpg(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def remove_hosts(procs: list[subprocess.Popen], namespaces: list[str], dirs: list[Path]) -> None:
    for p in procs:
        killpg(p)
    for ns in namespaces:
        kill_namespace(ns)  # daemons that left our process groups
    time.sleep(0.5)
    for ns in namespaces:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


class NetnsCluster:
    def __init__(self, workdir: Path, hidden_from_worker: list[Path]):
        self.tag = f"{os.getpid() % 100000}"
        self.subnet = 10 + os.getpid() % 200
        self.head_ns, self.worker_ns = f"kdh{self.tag}", f"kdw{self.tag}"
        self.head_ip, self.worker_ip = f"10.77.{self.subnet}.1", f"10.77.{self.subnet}.2"
        self.address = f"{self.head_ip}:{RAY_PORT}"
        # Short paths: Ray's unix sockets live under the temp dirs (108-byte limit).
        self.head_tmp = Path(f"/tmp/kdh{self.tag}")
        self.worker_tmp = Path(f"/tmp/kdw{self.tag}")
        self.workdir = workdir
        self.hidden = [p for p in hidden_from_worker]
        self.procs: dict[str, subprocess.Popen] = {}
        token_file = workdir / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
                   # find a dead node in ~3 s rather than ~30 s
                   RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                   RAY_health_check_timeout_ms="1000")
        self.env = env

    # ------------------------------------------------------------------ network
    def __enter__(self) -> "NetnsCluster":
        try:
            self._network()
            self.head_tmp.mkdir()
            self.worker_tmp.mkdir()
            self._start("head", self.head_ns,
                        [RAY, "start", "--head", "--block", f"--node-ip-address={self.head_ip}",
                         f"--port={RAY_PORT}", "--num-cpus=1", "--include-dashboard=false",
                         "--disable-usage-stats", f"--temp-dir={self.head_tmp}"])
            self.wait_nodes(1)
            mounts = " && ".join(f"mount -t tmpfs -o size=1m kd-hidden {p}" for p in [self.head_tmp, *self.hidden])
            worker = (f"{mounts} && exec {RAY} start --block --address={self.address} "
                      f"--node-ip-address={self.worker_ip} --num-cpus=1 --disable-usage-stats "
                      f"--temp-dir={self.worker_tmp}")
            self._start("worker", self.worker_ns,
                        ["unshare", "--mount", "--propagation", "private", "sh", "-c", worker])
            self.wait_nodes(2)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _network(self) -> None:
        two_hosts(self.head_ns, self.head_ip, self.worker_ns, self.worker_ip)

    def _start(self, name: str, ns: str, cmd: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    # ------------------------------------------------------------------ use
    def run_in_head(self, cmd: list[str], **kw) -> subprocess.Popen:
        """A process on the head's host (the driver), in a process group of its own."""
        return subprocess.Popen(["ip", "netns", "exec", self.head_ns, *cmd], env={**self.env, **kw.pop("env", {})},
                                start_new_session=True, **kw)

    def alive_nodes(self) -> list[str]:
        code = ("import ray; ray.init(address='auto', logging_level='ERROR'); "
                "print(' '.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
        out = subprocess.run(["ip", "netns", "exec", self.head_ns, sys.executable, "-c", code],
                             env={**self.env, "RAY_ADDRESS": self.address}, capture_output=True, text=True, timeout=60)
        return out.stdout.split()

    def wait_nodes(self, n: int, timeout: float = 90) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"ray {name} node exited: {(self.workdir / f'{name}.log').read_text()[-2000:]}")
            if len(self.alive_nodes()) >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes not up after {timeout} s")

    def kill_worker(self) -> None:
        """The worker host dies: every process of its node at once (raylet, object store, trial workers)."""
        killpg(self.procs["worker"])
        kill_namespace(self.worker_ns)

    # ------------------------------------------------------------------ teardown
    def __exit__(self, *exc) -> None:
        remove_hosts(list(self.procs.values()), [self.head_ns, self.worker_ns], [self.head_tmp, self.worker_tmp])
