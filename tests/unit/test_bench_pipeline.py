"""bench/pipeline.py: its arithmetic on made-up costs, and the whole bench at ``--quick`` on a
local Ray (loopback, token authentication on, a test token of its own)."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import secrets
import sys

import pytest

from memtrain.planner.simulate_pipeline import Link

_PATH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "pipeline.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pipeline_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    path = list(sys.path)
    try:
        spec.loader.exec_module(mod)  # puts bench/ on sys.path for its sibling benches
        yield mod
    finally:
        del sys.modules[spec.name]
        sys.path[:] = path


def _costs(bench, n: int, *, last: float = 1.0, w: float = 0.0):
    """``n`` blocks of F = B = 1 (the last one ``last`` times that), nothing else."""
    f = tuple([1.0] * (n - 1) + [last])
    return bench.BlockCosts(fwd_s=f, bwd_s=f, b_s=f, w_s=tuple(w * x for x in f), optim_s=(0.0,) * n, rest_s=0.0,
                            output_bytes=0)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_equal_stages_give_the_textbook_bubble(bench, kind):
    p, m = 2, 4
    sim = bench.simulate(kind, p, m, 1, (2, 2), _costs(bench, 4), Link(gbps=1.0))
    assert sim.step_s == pytest.approx((m + p - 1) * 4.0)  # (m + p - 1) ticks of F + B, two blocks each
    assert sim.bubble == pytest.approx((p - 1) / (m + p - 1))
    assert sim.busy_s == pytest.approx((m * 4.0, m * 4.0))


def test_a_transfer_takes_the_link_latency_and_no_receive_time(bench):
    """GPipe, 2 ranks, 4 micro-batches, stages of F = B = 2, a link of latency h: receives are
    posted a pass ahead (comm.p2p [Note: receives posted early]), so only the first forward's
    and the first backward's transfers lie on the step's path: 20 + 2h (a late receive's round
    on each of the 8 receives would make it 20 + 8h); busy time leaves h out."""
    h = 0.5
    sim = bench.simulate("gpipe", 2, 4, 1, (2, 2), _costs(bench, 4), Link(gbps=1.0, latency_s=h, recv_s=h))
    assert sim.step_s == pytest.approx(20 + 2 * h)
    assert sim.busy_s == pytest.approx((16.0, 16.0))


def test_the_balanced_partition_moves_blocks_off_the_heavy_head(bench):
    costs = _costs(bench, 8, last=3.0)  # the head weighs three layers
    assert bench.min_max_partition(costs, 2, split=False) == (5, 3)
    assert bench.balanced_partition("1f1b", 2, 8, 1, costs, Link(gbps=1.0)) == (5, 3)
    even = bench.simulate("1f1b", 2, 8, 1, (4, 4), costs, Link(gbps=1.0))
    balanced = bench.simulate("1f1b", 2, 8, 1, (5, 3), costs, Link(gbps=1.0))
    assert balanced.step_s < even.step_s and balanced.bubble < even.bubble


def test_the_balanced_partition_is_the_simulators_fastest(bench):
    """The min-max split leaves the first rank's tail (its last backward, its heavy optimizer
    step) after the last rank's work: the simulator moves a block off the first stage."""
    costs = _costs(bench, 8, last=3.0)
    costs = bench.BlockCosts(**{**{f: getattr(costs, f) for f in bench.BlockCosts.__slots__},
                                "optim_s": (12.0,) + (0.0,) * 7})
    best = bench.balanced_partition("1f1b", 2, 8, 1, costs, Link(gbps=1.0))
    every = [(k, 8 - k) for k in range(1, 8)]
    steps = {parts: bench.simulate("1f1b", 2, 8, 1, parts, costs, Link(gbps=1.0)).step_s for parts in every}
    assert steps[best] == min(steps.values()) and best != bench.min_max_partition(costs, 2, split=False)


def test_split_stages_carry_b_and_w(bench):
    costs = _costs(bench, 4, w=0.5)
    whole, split = bench.stage_costs(costs, (1, 3), False), bench.stage_costs(costs, (1, 3), True)
    assert [c.wgrad_s for c in whole] == [0.0, 0.0] and [c.wgrad_s for c in split] == [0.5, 1.5]
    assert [c.fwd_s for c in split] == [1.0, 3.0]


@pytest.mark.parametrize("argv,flag", [(["--steps", "2", "--warmup", "2"], "--warmup"), (["--ranks", "0"], "--ranks"),
                                       (["--balance", "x"], "--balance"), (["--hidden", "66"], "--hidden"),
                                       (["--layers", "1", "--schedules", "v-half"], "--layers"),
                                       (["--microbatches", "3", "--schedules", "interleaved-1f1b"], "--microbatches")])
def test_bad_input_exits_2_naming_the_flag(bench, capsys, argv, flag):
    assert bench.main(["--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err


@pytest.fixture
def ray_env(monkeypatch):
    """Loopback Ray and gloo, token authentication with a token of this test's (restored after)."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("RAY_worker_niceness", "0")  # what the bench sets (its [Note: worker niceness])
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication
        yield
        return
    _enable_token_auth()
    AuthenticationTokenLoader.instance().reset_cache()
    yield
    AuthenticationTokenLoader.instance().reset_cache()


_ROW = re.compile(r"^(gpipe|1f1b)\s+(\d+,\d+)\s+([\d.]+) ms\s+([\d.]+)%\s+([\d.]+) ms\s+([\d.]+)%\s+([+-][\d.]+)%"
                  r"\s+([\d.]+) ms\s+([\d.]+)×\s+(\S+)\s+[\d.]+$", re.M)


@pytest.mark.slow
def test_quick_run_prints_every_column_and_matches_torchs_losses(bench, ray_env, capsys):
    """memtrain's per-step mean loss equals torch's within ``LOSS_TOL`` (1e-5) on both schedules.
    Slow: 30-65 s on 2 shared cores (Ray, 2 pipeline runs, 2 torch runs, the probes), mostly
    starting processes."""
    import ray

    rc = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert not ray.is_initialized(), "the bench's embedded Ray is shut down"
    assert rc == 0, out
    for text in ("per block F", "per block W split", "per block optimizer", "gloo on loopback", "Ray actor call",
                 "memtrain/torch", "max|Δloss|", "median |error| over 2 schedules", "target <= 10%",
                 "every rank ran its program: yes", "balanced against even (1f1b)", "idle per rank",
                 "the block costs, timed afresh before each run"):
        assert text in out, text
    rows = {m.group(1): m for m in _ROW.finditer(out)}
    assert set(rows) == {"gpipe", "1f1b"}, out
    for kind, row in rows.items():
        measured, simulated, torch_s, ratio = (float(row.group(i)) for i in (3, 5, 8, 9))
        assert measured > 0 and simulated > 0 and torch_s > 0 and ratio > 0, kind
        assert float(row.group(10)) <= bench.LOSS_TOL, f"{kind}: memtrain's losses differ from torch's"
        rounding = 0.1 + 100 * 0.05 * (1 + simulated / measured) / measured  # the printed ms have one decimal
        assert float(row.group(7)) == pytest.approx((simulated / measured - 1) * 100, abs=rounding), kind
