"""``memtrain run`` as a Ray job: the README's recipe end to end (``ray start --head`` on loopback,
``ray job submit`` with token authentication, the job's metrics), and how ``connect`` joins or
starts a cluster: the embedded Ray on loopback with auth on, a missing token, a wrong address.

Each Ray started here is stopped by its own process id (``ray start --block`` stops what it
started on SIGTERM); ``ray stop`` would stop every Ray of the user on the machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from memtrain.errors import UserError
from memtrain.runtime.ray_cluster import connect

from ray_helpers import TOKEN, free_port, listening_beyond_loopback, listening_ports, process_tree, subprocess_env

ROOT = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)


def _env(home: Path, **extra: str) -> dict[str, str]:
    """No token but what ``extra`` gives: a home of its own, no RAY_AUTH_TOKEN."""
    env = subprocess_env(HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    env.pop("RAY_AUTH_TOKEN")
    return env


def _wait_for_dashboard(port: int, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/version", headers={"Authorization": f"Bearer {TOKEN}"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start exited"
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"the dashboard did not answer on port {port} within {timeout_s} s")


@pytest.fixture
def head(tmp_path):
    """``ray start --head`` on loopback with the dashboard (job submission needs it) and a token file."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    temp_dir = tempfile.mkdtemp(prefix="mt-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    gcs_port, dash_port = free_port(), free_port()
    env = _env(tmp_path, RAY_AUTH_TOKEN_PATH=str(token_file))
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_dashboard(dash_port, proc)
        yield {"proc": proc, "gcs": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash_port}",
               "env": env, "token_file": token_file}
    finally:
        tree = process_tree([proc.pid])
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        deadline = time.monotonic() + 30
        while any(p.is_running() and p.status() != "zombie" for p in tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p.pid for p in tree if p.is_running() and p.status() != "zombie"]
        for pid in left:  # what ray start did not stop: ours, by id
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"ray start left processes running: {left}"


def test_memtrain_run_as_a_ray_job_with_token_auth(head, tmp_path):
    work = tmp_path / "work"
    (work / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "gpt-tiny-pp2.yaml", work / "examples")  # the README example
    run_dir = tmp_path / "run"
    deadline = time.monotonic() + 30  # the head's services open their ports one after another
    while listening_ports(tree := process_tree([head["proc"].pid])) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert listening_ports(tree) >= 3 and listening_beyond_loopback(tree) == []

    submit = ["ray", "job", "submit", "--address", head["dashboard"], "--working-dir", str(work), "--",
              "memtrain", "run", "examples/gpt-tiny-pp2.yaml", "--set", "train.steps=3", "--set", f"run_dir={run_dir}"]
    deadline = time.monotonic() + 90
    while True:  # the dashboard answers before its job agent is up: Ray says to try again
        r = subprocess.run(submit, env=head["env"], capture_output=True, text=True, timeout=240)
        out = r.stdout + r.stderr
        if "No available agent to submit job" not in out or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert r.returncode == 0, out[-3000:]
    assert "succeeded" in out and "step     3/3" in out and "2 workers on 1 node(s): 2 cpu" in out
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and all(m["loss"] > 0 for m in lines)
    assert all(m["rank_core"] == [None, None] for m in lines)  # a joined cluster's workers are not bound
    assert (run_dir / "plan.json").exists()
    assert listening_beyond_loopback(process_tree([head["proc"].pid])) == []  # the job's processes too

    # without the token the cluster refuses a client: ray's own and memtrain's
    no_token = _env(tmp_path / "elsewhere")
    r = subprocess.run(submit, env=no_token, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "token" in (r.stdout + r.stderr).lower(), (r.stdout + r.stderr)[-2000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3  # no second run
    probe = f"from memtrain.runtime.ray_cluster import connect; connect({head['gcs']!r})"
    r = subprocess.run([sys.executable, "-c", probe], env=no_token, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"--address '{head['gcs']}': the Ray cluster needs its authentication token" in r.stderr
    assert "RAY_AUTH_TOKEN_PATH" in r.stderr


def test_the_embedded_ray_is_local_on_loopback_with_token_auth(tmp_path):
    script = textwrap.dedent("""
        import json, os, sys
        sys.path.insert(0, %r)
        from memtrain.runtime.ray_cluster import connected, cluster_inventory
        from ray_helpers import listening_beyond_loopback, listening_ports, process_tree
        import ray
        with connected() as line:
            procs = process_tree([os.getpid()])
            inv = cluster_inventory()
            info = {"line": line, "auth": os.environ.get("RAY_AUTH_MODE"), "ports": listening_ports(procs),
                    "beyond": listening_beyond_loopback(procs), "kinds": [s.kind for s in inv.slots],
                    "addresses": [n.address for n in inv.nodes], "pids": [p.pid for p in procs],
                    "nice": [os.nice(0), ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())]}
        info["after"] = ray.is_initialized()
        print(json.dumps(info))
    """) % str(Path(__file__).parent)
    env = _env(tmp_path)
    env.pop("RAY_AUTH_MODE")  # memtrain turns it on
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # memtrain keeps the embedded Ray on loopback by itself
    env.pop("RAY_worker_niceness", None)  # and its workers at the driver's niceness
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["line"].startswith("started the embedded Ray on 127.0.0.1")
    assert info["auth"] == "token" and (tmp_path / ".ray" / "auth_token").is_file()  # Ray made the token
    assert info["ports"] >= 3 and info["beyond"] == []
    assert info["addresses"] == ["127.0.0.1"] and set(info["kinds"]) == {"cpu"} and len(info["kinds"]) >= 1
    assert info["after"] is False
    assert info["nice"][1] == info["nice"][0]  # the workers at the driver's niceness, not Ray's 15 nicer


def test_an_address_nothing_answers_at_is_a_user_error_within_seconds(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"--address '127.0.0.1:\d+': no Ray cluster answers there .*ray start --head"):
        connect(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - t0 < 10
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(UserError, match="RAY_ADDRESS 'http://127.0.0.1:8265': that is a dashboard's address"):
        connect()
