"""The operator path on real `ray start` processes: a token-auth head, a joined worker, drivers by address.

Everything runs on 127.0.0.1 with free ports and its own temp dirs; every Ray process started here
is killed by process group at the end, even when a test fails.  Drivers run in subprocesses with
an explicit environment, so the session's own Ray (tests/conftest.py) is not disturbed.
The commands are the ones README's "A real cluster" section gives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "operator_driver.py"
RAY = Path(sys.executable).parent / "ray"
TOKEN = "6d6573682d7261792d6f70657261746f"  # the cluster's token: head, worker and drivers get it via env
WRONG = "0" * 32
NODE_ARGS = ["--num-cpus=2", "--num-gpus=0", "--object-store-memory=150000000", "--disable-usage-stats"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(home: Path, tmp: Path, **extra: str) -> dict:
    """This process's environment without any RAY_* (conftest sets its own token), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_TMPDIR=str(tmp), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO),
               PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


class OperatorCluster:
    """A head and a worker started with `ray start`, each in its own process group."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="mr-op-", dir="/tmp"))  # short: Ray's socket paths must fit
        self.pgids: list[int] = []
        gcs, client, dash, agent_h, agent_w = free_ports(5)
        self.port, self.client_port = gcs, client
        self.address = f"127.0.0.1:{gcs}"
        self.node_env = clean_env(self.base / "home-node", self.base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
        self.ports = (dash, agent_h, agent_w)

    def start_head(self) -> None:
        """The head: ``RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... ray start --head --port=P`` (README's commands)."""
        dash, agent_h, _ = self.ports
        self.start(["--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                    f"--ray-client-server-port={self.client_port}", "--include-dashboard=false", f"--dashboard-port={dash}",
                    f"--dashboard-agent-listen-port={agent_h}", f"--temp-dir={self.base / 'ray'}", *NODE_ARGS], "head")

    def start_worker(self) -> None:
        """A worker: ``RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... ray start --address=HEAD:P``."""
        self.start([f"--address={self.address}", f"--dashboard-agent-listen-port={self.ports[2]}",
                    f"--temp-dir={self.base / 'worker'}", *NODE_ARGS], "worker")

    def start(self, args: list[str], name: str) -> None:
        log = self.base / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([str(RAY), "start", *args], env=self.node_env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.pgids.append(proc.pid)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            tail = log.read_text()[-1500:]
            raise RuntimeError(f"`ray start` ({name}) exited with {rc}: {tail}")

    def driver(self, *args: str, home: str = "driver", timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
        """Run ``python *args`` as a driver on this machine with only the given RAY_* variables."""
        (self.base / home).mkdir(exist_ok=True)
        return subprocess.run([sys.executable, *args], env=clean_env(self.base / home, self.base, **env),
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def status_cli(self, address: str, **env: str) -> subprocess.CompletedProcess:
        return self.driver("-m", "mesh_ray.cli", "status", "--address", address, "--json", **env)

    def stop(self) -> None:
        """Kill every process group started here (TERM, then KILL); Ray's workers exit with their raylet."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pgid in self.pgids:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_group_alive(p) for p in self.pgids):
                time.sleep(0.2)
        shutil.rmtree(self.base, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The CLI's `error: ...` line; asserts exit code 1 and that the message is one line."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-1000:], proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def cluster():
    if not RAY.exists():
        pytest.skip(f"no `ray` executable next to {sys.executable}")
    c = OperatorCluster()
    try:
        try:
            c.start_head()
        except (OSError, RuntimeError) as e:
            pytest.skip(f"`ray start --head` is not allowed or failed on this machine: {' '.join(str(e).split())[-300:]}")
        c.start_worker()
        deadline = time.monotonic() + 60
        while True:  # the worker's raylet registers a moment after `ray start` returns
            seen = c.driver(str(DRIVER), "connect", c.address, RAY_AUTH_TOKEN=TOKEN)
            if seen.returncode == 0 and last_json(seen)["nodes"] == 2 or time.monotonic() > deadline:
                break
            time.sleep(2)
        yield c
    finally:
        c.stop()


def test_explicit_address_with_token_in_env_and_no_auth_mode(cluster):
    # Ray itself leaves auth off for an explicit address unless RAY_AUTH_MODE=token: connect() presents the token.
    out = last_json(cluster.driver(str(DRIVER), "connect", cluster.address, RAY_AUTH_TOKEN=TOKEN))
    assert out == {"mode": cluster.address, "nodes": 2, "cpus": 4.0}


def test_explicit_address_with_the_heads_token_file_copied(cluster):
    home = cluster.base / "copied"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(TOKEN)
    out = last_json(cluster.driver(str(DRIVER), "connect", cluster.address, home="copied"))
    assert out["nodes"] == 2


def test_auto_address_finds_the_local_head(cluster):
    out = last_json(cluster.driver(str(DRIVER), "connect", "auto", RAY_AUTH_TOKEN=TOKEN))
    assert out == {"mode": "auto", "nodes": 2, "cpus": 4.0}


def test_wrong_token_gets_one_line_with_the_fix(cluster):
    line = one_line_error(cluster.status_cli(cluster.address, RAY_AUTH_TOKEN=WRONG))
    assert f"Ray at {cluster.address} rejected this machine's auth token (from RAY_AUTH_TOKEN)" in line
    assert "copy the head's ~/.ray/auth_token" in line and "ray start" not in line


def test_no_token_gets_one_line_with_the_fix(cluster):
    line = one_line_error(cluster.status_cli(cluster.address, home="empty"))
    assert f"Ray at {cluster.address} requires an auth token and this machine has none" in line
    assert "set RAY_AUTH_TOKEN" in line and "ray start" not in line
    line = one_line_error(cluster.status_cli(cluster.address, RAY_AUTH_TOKEN=TOKEN, RAY_AUTH_MODE="disabled"))
    assert "requires an auth token but RAY_AUTH_MODE=disabled here: unset RAY_AUTH_MODE" in line


def test_nothing_listening_gets_its_own_error(cluster):
    closed = f"127.0.0.1:{free_ports(1)[0]}"
    line = one_line_error(cluster.status_cli(closed, RAY_AUTH_TOKEN=TOKEN))
    assert f"cannot reach a Ray cluster at {closed}" in line and "nothing listens there" in line


def test_version_mismatch_names_both_versions(cluster):
    # A head of another Python publishes other metadata; rewrite what this head published, then restore it.
    old = last_json(cluster.driver(str(DRIVER), "metadata", cluster.address, RAY_AUTH_TOKEN=TOKEN))["metadata"]
    other = {**old, "python_version": "3.10.99"}
    last_json(cluster.driver(str(DRIVER), "metadata", cluster.address, json.dumps(other), RAY_AUTH_TOKEN=TOKEN))
    try:
        line = one_line_error(cluster.status_cli(cluster.address, RAY_AUTH_TOKEN=TOKEN))
    finally:
        last_json(cluster.driver(str(DRIVER), "metadata", cluster.address, json.dumps(old), RAY_AUTH_TOKEN=TOKEN))
    assert f"version mismatch with the Ray cluster at {cluster.address}: it runs Ray {old['ray_version']} on " \
           f"Python 3.10.99, this machine has Ray {old['ray_version']} on Python {old['python_version']}" in line
    assert "install Python 3.10.99" in line


def test_split_spread_over_both_nodes_is_bit_exact_and_status_shows_where(cluster, tiny_ckpts):
    out = last_json(cluster.driver(str(DRIVER), "split", cluster.address, str(tiny_ckpts["flux1"]),
                                   RAY_AUTH_TOKEN=TOKEN))
    assert out["latent_equal"] and out["image_equal"]
    assert len(set(out["stage_nodes"])) == 2 and out["modes"] == ["raw"] * 3
    # `mesh-ray status --json`, run while the split was alive, from another driver process
    assert out["status_rc"] == 0, out["status_stderr"]
    status = out["status"]
    assert sorted(n["head"] for n in status["nodes"]) == [False, True]
    assert all(n["resources"]["CPU"] == 2 for n in status["nodes"])
    stages = {a["name"]: a["node_id"] for a in status["actors"] if a["name"].startswith(f"mesh-ray/{out['split_id']}/")}
    assert sorted(stages.values()) == sorted(out["stage_nodes"])
    for n in status["nodes"]:
        assert [a for a in n["actors"] if a in stages] == [a for a, node in stages.items() if node == n["node_id"]]
    assert status["driver"]["in_cluster"] and status["driver"]["node_id"] in {n["node_id"] for n in status["nodes"]}
    assert out["table_rc"] == 0 and "inside the cluster" in out["table"]
    assert "head" in out["table"] and "worker" in out["table"]


def test_ray_client_driver_is_shown_outside_the_cluster(cluster):
    # A driver on a machine without a Ray node connects through the head's Ray Client server (ray://).
    status = last_json(cluster.status_cli(f"ray://127.0.0.1:{cluster.client_port}", RAY_AUTH_TOKEN=TOKEN))
    assert status["driver"]["in_cluster"] is False and status["driver"]["via"] == "ray client"
    assert len(status["nodes"]) == 2


def test_ray_client_without_token_gets_one_line_with_the_fix(cluster):
    address = f"ray://127.0.0.1:{cluster.client_port}"
    line = one_line_error(cluster.status_cli(address, home="empty"))
    assert f"the Ray Client server at {address} did not let this driver in: this machine has no auth token" in line
    assert "copy the head's ~/.ray/auth_token" in line


def test_ray_get_auth_token_generate_prints_the_token_it_keeps(tmp_path):
    # README: on the head, `ray get-auth-token --generate` prints a new token and keeps it in ~/.ray/auth_token.
    if not RAY.exists():
        pytest.skip(f"no `ray` executable next to {sys.executable}")
    out = subprocess.run([str(RAY), "get-auth-token", "--generate"], env=clean_env(tmp_path, tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout and out.stdout == (tmp_path / ".ray" / "auth_token").read_text()
