"""The ``memtrain`` command as a user runs it (subprocesses, real files)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memtrain.planner.plan import Plan

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def memtrain(*args, cwd=ROOT, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "memtrain.runtime.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout,
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_plan_every_example(example, tmp_path):
    out = {k: tmp_path / f"plan.{k}" for k in ("json", "html", "trace")}
    r = memtrain("plan", example, "--json", out["json"], "--html", out["html"], "--trace", out["trace"],
                 "--set", f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "step time" in r.stdout and "fits" in r.stdout
    data = json.loads(out["json"].read_text())
    assert data["version"] == 1 and data["fits"] is True
    assert data["model"]["num_params"] == sum(b["num_params"] for b in data["model"]["blocks"])
    assert {"name", "num_params", "param_bytes", "activation_bytes", "fwd_flops"} <= set(data["model"]["blocks"][0])
    assert data["prediction"]["step_time_s"] > 0 and data["prediction"]["tokens_per_s"] > 0
    peaks = data["prediction"]["devices"][0]["peak_bytes"]
    budgets = data["prediction"]["devices"][0]["budget_bytes"]
    assert set(peaks) >= {"device", "host"}
    assert all(peaks[t] <= budgets[t] for t in peaks if budgets.get(t))
    plan = Plan.load(out["json"])
    assert plan.fits and plan.name == example.stem
    assert out["html"].read_text().lstrip().lower().startswith("<!doctype html")
    assert json.loads(out["trace"].read_text())["traceEvents"]


def test_plan_that_cannot_fit_exits_2_naming_the_shortfall(tmp_path):
    r = memtrain("plan", ROOT / "examples" / "gpt-1b-on-4090.yaml", "--set", "cluster.nodes[0]=x", "--set", f"run_dir={tmp_path}")
    assert r.returncode == 2  # a node that is not a mapping is a user error, reported cleanly
    assert "cluster.nodes[0]" in r.stderr and "Traceback" not in r.stderr
    r = memtrain("plan", ROOT / "examples" / "gpt-175b.yaml", "--set", "model.preset=175b",
                 "--set", f"run_dir={tmp_path}", "--set", "memory.host=64GiB", "--set", "memory.nvme=100GiB")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "does not fit" in r.stderr and "GiB" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_tiny_trains_and_writes_metrics(tmp_path):
    r = memtrain("run", ROOT / "examples" / "tiny-cpu.yaml", "--set", "train.steps=12", "--set", f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert lines[-1]["loss"] < lines[0]["loss"]  # the synthetic data is learnable
    assert Plan.load(tmp_path / "plan.json").fits
    assert "step time: measured" in r.stdout


def test_profile_then_plan_uses_it(tmp_path):
    r = memtrain("profile", ROOT / "examples" / "tiny-cpu.yaml", "--set", f"run_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "profile.parquet").is_file()
    r = memtrain("plan", ROOT / "examples" / "tiny-cpu.yaml", "--set", f"run_dir={tmp_path}", "--json", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    assert Plan.load(tmp_path / "p.json").source == f"profile:{tmp_path / 'profile.parquet'}"
    # another model does not match this profile: catalog/auto figures are used and said so
    r = memtrain("plan", ROOT / "examples" / "tiny-cpu.yaml", "--set", f"run_dir={tmp_path}",
                 "--set", "train.seq_len=32", "--json", tmp_path / "q.json")
    assert r.returncode == 0, r.stderr
    assert not Plan.load(tmp_path / "q.json").source.startswith("profile:")


def test_resume_of_something_not_a_run_directory_is_a_clear_message():
    r = memtrain("resume", ROOT / "examples" / "tiny-cpu.yaml")
    assert r.returncode == 2 and "is not a directory; give the run directory" in r.stderr
    assert "Traceback" not in r.stderr


# --- bad input (issue 16, section 3): exit 2 and one line naming the field or file -------------

TINY = ROOT / "examples" / "tiny-cpu.yaml"


def cli(capsys, *args):
    """``memtrain ARGS`` in this process: (exit status, stdout, stderr). An exception that is not
    a user error propagates, so a traceback fails the test."""
    from memtrain.runtime.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc, err, *names):
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("memtrain: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], lines[0]


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("override,field", [
    ("train.steps=5GiB", "train.steps"), ("train.steps=1.5", "train.steps"), ("train.seq_len=2.9", "train.seq_len"),
    ("snapshot.k=3.7", "snapshot.k"), ("train.steps=2.0", "train.steps"),
])
def test_integer_fields_are_not_sizes_and_not_truncated(capsys, tmp_path, override, field):
    rc, _, err = cli(capsys, "plan", TINY, "--quiet", "--set", f"run_dir={tmp_path}", "--set", override)
    assert_one_error(rc, err, f"{field}: expected a whole number")
    assert listing(tmp_path) == []


def test_scientific_notation_lr_is_accepted(capsys, tmp_path):
    config = tmp_path / "lr.yaml"
    config.write_text(TINY.read_text().replace("lr: 3.0e-3", "lr: 1e-4"))
    assert "lr: 1e-4" in config.read_text()
    out = tmp_path / "plan.json"
    rc, _, err = cli(capsys, "plan", config, "--quiet", "--set", f"run_dir={tmp_path}", "--json", out)
    assert rc == 0, err
    rc, _, err = cli(capsys, "plan", TINY, "--quiet", "--set", f"run_dir={tmp_path}", "--set", "train.optimizer.lr=1e-3")
    assert rc == 0, err


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize("override,field", [
    ("train.optimizer.lr=.inf", "train.optimizer.lr"), ("train.optimizer.weight_decay=.nan", "train.optimizer.weight_decay"),
    ("train.optimizer.eps=-1", "train.optimizer.eps"), ("train.optimizer.momentum=1.5", "train.optimizer.momentum"),
    ("train.optimizer.betas=[0.9, .inf]", "train.optimizer.betas[1]"),
    ("train.max_grad_norm=-1", "train.max_grad_norm"),
])
def test_plan_and_run_refuse_the_same_hyper_parameters_before_any_work(capsys, tmp_path, command, override, field):
    run_dir = tmp_path / "run"
    rc, out, err = cli(capsys, command, TINY, "--set", f"run_dir={run_dir}", "--set", override)
    assert_one_error(rc, err, f"{field}: must be")
    assert out == "" and not run_dir.exists()  # nothing trained, nothing written


def test_huge_global_batch_is_refused_at_once(capsys, tmp_path):
    import time

    t0 = time.perf_counter()
    for value in ("1e12", "1000000000000"):
        rc, _, err = cli(capsys, "plan", TINY, "--quiet", "--set", f"run_dir={tmp_path}", "--set", f"train.global_batch_size={value}")
        assert_one_error(rc, err, "train.global_batch_size")
    assert time.perf_counter() - t0 < 5


def test_divisors_are_found_in_square_root_time():
    import time

    from memtrain.config import MAX_GLOBAL_BATCH_SIZE
    from memtrain.planner.candidates import divisors_desc as _divisors_desc

    for n in range(1, 500):
        assert _divisors_desc(n) == sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True)
    t0 = time.perf_counter()
    assert _divisors_desc(10**12)[:3] == [10**12, 5 * 10**11, 25 * 10**10]
    assert time.perf_counter() - t0 < 2  # 10**6 trial divisions, not 10**12
    assert len(_divisors_desc(720720)) == 240 and 720720 <= MAX_GLOBAL_BATCH_SIZE


@pytest.mark.parametrize("override,field", [
    ("memory.device=.inf", "memory.device"), ("memory.device=.nan", "memory.device"),
    ('model.overrides={num_layers: "2"}', "model.overrides.num_layers"),
    ("model.overrides={hidden_size: abc}", "model.overrides.hidden_size"),
    ("model.overrides={hidden_size: 65}", "model.overrides.hidden_size"),
    ("model.overrides={num_layers: 100000}", "model.overrides.num_layers"),
    ("model.overrides={tie_embeddings: 1}", "model.overrides.tie_embeddings"),
    ("model.overrides={nope: 1}", "model.overrides.nope"),
    ("model.preset=nope", "model.preset"),
])
def test_errors_that_were_tracebacks_exit_2_naming_the_field(capsys, tmp_path, override, field):
    rc, _, err = cli(capsys, "plan", TINY, "--quiet", "--set", f"run_dir={tmp_path}", "--set", override)
    assert_one_error(rc, err, field)


def test_output_paths_that_cannot_be_written_exit_2_before_planning(capsys, tmp_path, monkeypatch):
    import memtrain.runtime.planning as planning

    monkeypatch.setattr(planning, "plan_from_config", lambda *a, **k: pytest.fail("planned before checking outputs"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    before = listing(tmp_path)
    rc, _, err = cli(capsys, "plan", TINY, "--html", tmp_path / "dir")
    assert_one_error(rc, err, "--html", str(tmp_path / "dir"), "is a directory")
    rc, _, err = cli(capsys, "plan", TINY, "--json", tmp_path / "file" / "plan.json")
    assert_one_error(rc, err, "--json", str(tmp_path / "file"), "is a file, not a directory")
    rc, _, err = cli(capsys, "plan", TINY, "--trace", tmp_path / "file" / "a" / "t.json")
    assert_one_error(rc, err, "--trace", "is a file, not a directory")
    rc, _, err = cli(capsys, "profile", TINY, "--out", tmp_path / "dir")
    assert_one_error(rc, err, "--out", "is a directory")
    rc, _, err = cli(capsys, "plan", TINY, "--profile", tmp_path / "dir")
    assert_one_error(rc, err, "--profile", "is a directory")
    assert listing(tmp_path) == before


def test_read_only_filesystem_exits_2_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    target = tmp_path / "new" / "deeper" / "plan.json"
    rc, _, err = cli(capsys, "plan", TINY, "--quiet", "--set", f"run_dir={tmp_path / 'run'}", "--json", target)
    assert_one_error(rc, err, "--json", str(target), "read-only")
    assert listing(tmp_path) == []  # the folders made for the file are removed again


def test_budget_exceeded_is_a_user_error(capsys, tmp_path, monkeypatch):
    import memtrain.runtime.train as train_module
    from memtrain.offload.ledger import BudgetExceeded

    def over_budget(cfg, **kwargs):
        raise BudgetExceeded("device: 2.0 GiB would exceed the budget of 1.0 GiB; raise memory.device")

    monkeypatch.setattr(train_module, "train", over_budget)
    rc, _, err = cli(capsys, "run", TINY, "--set", f"run_dir={tmp_path}")
    assert_one_error(rc, err, "memory.device")


def test_only_user_errors_are_caught(capsys, tmp_path, monkeypatch):
    import memtrain.runtime.planning as planning
    from memtrain.runtime.cli import main
    from memtrain.config import ConfigError

    def ours(*args, **kwargs):
        raise ValueError("a bug of ours")

    monkeypatch.setattr(planning, "plan_from_config", ours)
    with pytest.raises(ValueError, match="a bug of ours"):  # keeps its traceback
        main(["plan", str(TINY), "--set", f"run_dir={tmp_path}"])
    monkeypatch.setenv("MEMTRAIN_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.steps"):
        main(["plan", str(TINY), "--set", "train.steps=0"])


def test_alias_bomb_as_name_exits_2_fast(tmp_path):
    import time

    levels = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(levels) + "\nname: *l8\n")
    t0 = time.perf_counter()
    r = memtrain("plan", config, timeout=60)
    assert time.perf_counter() - t0 < 30
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "bomb.yaml" in r.stderr and "aliases" in r.stderr
    assert len(r.stderr) < 400


def test_repeated_keys_exit_2_naming_the_key(capsys, tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("train:\n  steps: 3\nmodel:\n  preset: tiny\ntrain:\n  seq_len: 32\n")
    rc, _, err = cli(capsys, "plan", config)
    assert_one_error(rc, err, "dup.yaml", "line 5", "'train' is given twice")
    config.write_text("train:\n  steps: 3\n  steps: 4\n")
    rc, _, err = cli(capsys, "plan", config)
    assert_one_error(rc, err, "dup.yaml", "line 3", "'steps' is given twice")


def test_messages_name_the_right_thing(capsys, tmp_path):
    rc, _, err = cli(capsys, "plan", tmp_path)
    assert_one_error(rc, err, str(tmp_path), "is a directory")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    rc, _, err = cli(capsys, "plan", latin)
    assert_one_error(rc, err, str(latin), "not UTF-8")
    rc, _, err = cli(capsys, "plan", TINY, "--set", "memory.device=.nan")
    assert_one_error(rc, err, "memory.device")
    rc, _, err = cli(capsys, "plan", tmp_path / "missing.yaml")
    assert_one_error(rc, err, "missing.yaml", "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    rc, _, err = cli(capsys, "plan", bad)
    assert_one_error(rc, err, "bad.yaml", "not valid YAML", "line 2")


def test_run_dir_under_a_file_exits_2_before_training(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    rc, out, err = cli(capsys, "run", TINY, "--set", f"run_dir={tmp_path / 'file' / 'run'}")
    assert_one_error(rc, err, "run_dir", "is a file, not a directory")
    assert out == "" and listing(tmp_path) == ["file"]


def test_run_with_max_grad_norm_clips_without_early_updates_and_logs_the_norm(capsys, tmp_path):
    rc, _, err = cli(capsys, "run", TINY, "--set", "train.steps=3", "--set", "train.max_grad_norm=0.5",
                     "--set", f"run_dir={tmp_path}")
    assert rc == 0, err
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(x["grad_norm"] > 0 for x in lines)
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.train.clip_grad_norm
    assert not any(a.op.value == "OPTIM" and a.microbatch is not None for a in plan.schedule[0])
