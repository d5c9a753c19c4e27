"""Per-stage offload and ZeRO-1 in the pipeline runtime, on a local Ray, against one process.

Same cases as test_pipeline_run.py (the tiny GPT, 3 steps of 4 micro-batches of 2 sequences of
16 tokens per replica, AdamW, seed 0). An offloaded stage keeps its model states in host chunks
or NVMe files between steps and steps them with memtrain's offloaded optimizer
(runtime.stage_offload); on this machine the "device" is the CPU too, so each case also checks
where the bytes are: the chunk store's ledgers per tier, and the chunk files in the worker's
directory while the run is on.

Tolerances: offload keeps every sum in one process's order and the host/NVMe AdamW is elementwise
torch's (offload.optim [Note: host kernel choice]): bitwise. ZeRO-1 adds the replicas' gradients
as data parallelism without sharding does (a reduce-scatter): test_pipeline_run.py's 1e-5
against one process ([Note: pipeline tolerances]); with 2 replicas bitwise against the same run
without sharding, with 4 within 1e-5 of it (runtime.stage_zero [Note: ZeRO-1 parity]).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pipeline_reference import reference_losses

from memtrain.config import ConfigError, ModelConfig
from memtrain.models.source import build_model
from memtrain.planner.pipeline import SCHEDULES, placement
from memtrain.runtime.pipeline_driver import PipelineError, PipelineResult, even_partition, run_pipeline
from memtrain.runtime.stage_worker import block_ranges

STEPS, M, B, SEQ, SEED, LR = 3, 4, 2, 16, 0, 1e-3
UNTIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False}}
UNTIED_6 = {"preset": "tiny", "overrides": {"num_layers": 6, "tie_embeddings": False}}
TIED_2 = {"preset": "tiny", "overrides": {"num_layers": 2}}
STATES = 2
"""AdamW's states per parameter (exp_avg, exp_avg_sq)."""


def _stage_params(model: dict, num_stages: int) -> list[int]:
    """Parameters per stage under the even partition."""
    built = build_model(ModelConfig(**model), max_seq_len=SEQ)
    blocks = [m for _, m in built.blocks]
    return [sum(q.numel() for i in r for q in blocks[i].parameters())
            for r in block_ranges(even_partition(len(blocks), num_stages))]


def _run(model: dict, schedule: str, p: int, dp: int = 1, **kw) -> PipelineResult:
    return run_pipeline(model=model, schedule=schedule, num_ranks=p, dp=dp, num_microbatches=M, micro_batch_size=B,
                        seq_len=SEQ, num_steps=STEPS, seed=SEED, lr=LR, timeout_s=30, step_timeout_s=120, **kw)


def _max_diff(got: PipelineResult, want: list[list[float]]) -> float:
    return max(abs(a - b) for g, w in zip(got.microbatch_losses, want) for a, b in zip(g, w, strict=True))


def _check_offload(model: dict, schedule: str, p: int, homes: tuple[str, ...], nvme_dir: Path, *, dp: int = 1,
                   want: list[list[float]] | None = None) -> PipelineResult:
    """Run with ``homes``; losses bitwise ``want`` (default: one process's), records their
    programs, the offloaded stages' programs with their PREFETCH and OFFLOAD, the NVMe files
    there while the run is on."""
    on_disk: list[dict[str, int]] = []

    def files(step: int, loss: float, results: list, wall_s: float) -> None:
        on_disk.append({str(f.relative_to(nvme_dir)): f.stat().st_size for f in nvme_dir.rglob("*.mt")})

    got = _run(model, schedule, p, dp=dp, offload=homes, nvme_dir=str(nvme_dir), on_step=files)
    if want is None:
        want = reference_losses(model, num_steps=STEPS, num_microbatches=M, micro_batch_size=B, seq_len=SEQ,
                                seed=SEED, lr=LR)
    assert [list(x) for x in got.microbatch_losses] == want, f"{schedule} {homes}: max |Δ| {_max_diff(got, want)}"
    for step in got.records:
        for rank, record in enumerate(step):
            assert record == got.programs[rank % p], f"rank {rank}: the record differs from its program"
    place = placement(schedule, p, 2)
    for s, home in enumerate(homes):
        prog = got.programs[place.rank_of[s]]
        first = next(k for k, a in enumerate(prog) if a.startswith(str(s)) and a[len(str(s))].isalpha())
        if home == "device":
            assert f"{s}PREFETCH" not in prog and f"{s}OFFLOAD" not in prog
        else:  # fetched before the stage's first action, sent home right before its step
            assert prog[first] == f"{s}PREFETCH"
            assert prog[prog.index(f"{s}OPTIM") - 1] == f"{s}OFFLOAD"
    # the chunk files of each nvme stage, under its rank's directory, at every step; none after
    want_dirs = {f"rank{d * p + place.rank_of[s]}/stage{s}" for s, h in enumerate(homes) if h == "nvme"
                 for d in range(dp)}
    for seen in on_disk:
        assert {str(Path(f).parent) for f in seen} == want_dirs
        for d in want_dirs:
            parts = sorted(Path(f).name.split("%3A")[2] for f in seen if f.startswith(d + "/"))
            assert parts and set(parts) == {"master.mt", "exp_avg.mt", "exp_avg_sq.mt"}
    assert not list(nvme_dir.iterdir()), "the files and directories go with the run"
    return got


def _check_bytes(got: PipelineResult, model: dict, homes: tuple[str, ...], rank_of: tuple[int, ...]) -> None:
    """Between steps an offloaded stage holds nothing on the device: host chunks hold master,
    gradient accumulator and states (16 bytes a parameter), NVMe files master and states (12,
    block-aligned) and the host nothing; ``nvme_files`` is what the disk holds."""
    params = _stage_params(model, len(homes))
    p = max(rank_of) + 1
    for rank, held in enumerate(got.state_bytes):
        stages = [s for s, r in enumerate(rank_of) if r == rank % p]
        host = sum(params[s] * 4 * (2 + STATES) for s in stages if homes[s] == "host")
        nvme = sum(params[s] * 4 * (1 + STATES) for s in stages if homes[s] == "nvme")
        device = sum(params[s] * 4 * (1 + STATES) for s in stages if homes[s] == "device")
        assert held["host"] == host, (rank, held)
        assert held["device"] == device, (rank, held)  # parameters and states of device stages only
        assert nvme <= held["nvme"] <= nvme + 3 * 4096 * 8, (rank, held)  # files are padded to 4 KiB blocks
        assert held["nvme_files"] == held["nvme"], (rank, held)
        assert held["optimizer_states"] == sum(params[s] * 4 * STATES for s in stages), (rank, held)


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_two_stages_host_and_nvme_bitwise(local_ray, tmp_path: Path, schedule: str) -> None:
    """Stage 0's states in host chunks, stage 1's in NVMe files: the losses of one process."""
    homes = ("host", "nvme")
    got = _check_offload(UNTIED_2, schedule, 2, homes, tmp_path)
    _check_bytes(got, UNTIED_2, homes, (0, 1))


def test_four_stages_mixed_homes_bitwise(local_ray, tmp_path: Path) -> None:
    homes = ("nvme", "device", "host", "nvme")
    got = _check_offload(UNTIED_6, "1f1b", 4, homes, tmp_path)
    _check_bytes(got, UNTIED_6, homes, (0, 1, 2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_two_ranks_every_schedule_offloaded_bitwise(local_ray, tmp_path: Path, schedule: str) -> None:
    """Every schedule with its stages' states alternately in host chunks and NVMe files."""
    place = placement(schedule, 2, 2)
    homes = tuple(("host", "nvme")[s % 2] for s in range(place.num_stages))
    got = _check_offload(UNTIED_2, schedule, 2, homes, tmp_path)
    _check_bytes(got, UNTIED_2, homes, place.rank_of)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_four_ranks_every_schedule_offloaded_bitwise(local_ray, tmp_path: Path, schedule: str) -> None:
    """Four ranks (8 stages for the interleaved and V schedules), homes nvme, host, device in turn."""
    place = placement(schedule, 4, 2)
    homes = tuple(("nvme", "host", "device")[s % 3] for s in range(place.num_stages))
    got = _check_offload(UNTIED_6, schedule, 4, homes, tmp_path)
    _check_bytes(got, UNTIED_6, homes, place.rank_of)


@pytest.mark.slow
def test_offload_with_two_replicas(local_ray, tmp_path: Path) -> None:
    """Host and NVMe stages in 2 replicas: bitwise the same data-parallel run without offload (its
    sums are the same), so within its 1e-5 of one process."""
    plain = _run(UNTIED_2, "1f1b", 2, dp=2)
    homes = ("host", "nvme")
    got = _check_offload(UNTIED_2, "1f1b", 2, homes, tmp_path, dp=2, want=[list(x) for x in plain.microbatch_losses])
    _check_bytes(got, UNTIED_2, homes, (0, 1))
    want = reference_losses(UNTIED_2, num_steps=STEPS, num_microbatches=M * 2, micro_batch_size=B, seq_len=SEQ,
                            seed=SEED, lr=LR)
    assert _max_diff(got, want) <= 1e-5


def test_zero1_two_replicas(local_ray) -> None:
    """ZeRO-1 over 2 replicas of a 2-stage 1f1b, stage 0's states in host chunks, stage 1's on
    the device: the losses of one process within the dp tolerance, each rank holding about half
    its stage's optimizer states (the device stage's exactly, the host stage's at whole
    parameters: 47-53% measured)."""
    got = _run(UNTIED_2, "1f1b", 2, dp=2, zero=1, offload=("host", "device"))
    want = reference_losses(UNTIED_2, num_steps=STEPS, num_microbatches=M * 2, micro_batch_size=B, seq_len=SEQ,
                            seed=SEED, lr=LR)
    assert _max_diff(got, want) <= 1e-5, _max_diff(got, want)
    assert got.losses[-1] < got.losses[0]
    params = _stage_params(UNTIED_2, 2)
    held = got.state_bytes
    # stage 1 on the device: a flat shard each, the parameters whole besides the shard's fp32 copy
    n = params[1]
    for replica, rank in enumerate((1, 3)):
        mine = math.ceil(n / 2) if replica == 0 else n - math.ceil(n / 2)
        assert held[rank]["optimizer_states"] == mine * 4 * STATES, (rank, held[rank], n)
        assert held[rank]["device"] == n * 4 + mine * 4 * (1 + STATES), (rank, held[rank])
    # stage 0 in host chunks: each replica's own chunks' states and accumulators, every master
    n = params[0]
    states = [held[rank]["optimizer_states"] for rank in (0, 2)]
    assert sum(states) == n * 4 * STATES and all(0.4 < x / (n * 4 * STATES) < 0.6 for x in states), states
    for rank, x in zip((0, 2), states):
        assert held[rank]["host"] == n * 4 + x * (1 + STATES) // STATES and held[rank]["device"] == 0, held[rank]


@pytest.mark.slow
def test_zero1_four_replicas(local_ray) -> None:
    """One stage in 4 replicas: ZeRO-1's reduce-scatter may sum in another order than the
    all-reduce, so within the dp tolerance of one process and of the unsharded run; a quarter of
    the optimizer states per rank."""
    plain = _run(UNTIED_2, "1f1b", 1, dp=4, zero=0)
    sharded = _run(UNTIED_2, "1f1b", 1, dp=4, zero=1)
    want = reference_losses(UNTIED_2, num_steps=STEPS, num_microbatches=M * 4, micro_batch_size=B, seq_len=SEQ,
                            seed=SEED, lr=LR)
    assert _max_diff(sharded, want) <= 1e-5 and _max_diff(plain, want) <= 1e-5
    assert _max_diff(sharded, [list(x) for x in plain.microbatch_losses]) <= 1e-5
    n = _stage_params(UNTIED_2, 1)[0]
    shard = math.ceil(n / 4)
    assert [h["optimizer_states"] for h in sharded.state_bytes] == [
        min(shard, n - d * shard) * 4 * STATES for d in range(4)]
    assert all(h["optimizer_states"] == n * 4 * STATES for h in plain.state_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("homes", [("device", "device"), ("host", "nvme")])
def test_zero1_is_bitwise_data_parallelism_without_sharding(local_ray, tmp_path: Path, homes) -> None:
    """[Note: ZeRO-1 parity] (runtime.stage_zero; runtime.stage_offload [Note: ZeRO-1 of an
    offloaded stage]) and the measured halving: per stage, the two replicas' optimizer states
    with ZeRO-1 add up to one replica's without, each about half."""
    plain = _run(UNTIED_2, "1f1b", 2, dp=2, zero=0, offload=homes, nvme_dir=str(tmp_path))
    sharded = _run(UNTIED_2, "1f1b", 2, dp=2, zero=1, offload=homes, nvme_dir=str(tmp_path))
    assert sharded.microbatch_losses == plain.microbatch_losses
    for r in (0, 1):
        full = plain.state_bytes[r]["optimizer_states"]
        assert plain.state_bytes[r + 2]["optimizer_states"] == full
        halves = [sharded.state_bytes[rank]["optimizer_states"] for rank in (r, r + 2)]
        assert sum(halves) == full and all(0.4 < h / full < 0.6 for h in halves), (full, halves)
    if "nvme" in homes:  # the other replica's state files are gone, its masters' stay
        assert sharded.state_bytes[1]["nvme"] < plain.state_bytes[1]["nvme"]


def test_offload_and_zero_mistakes_are_config_errors(local_ray, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"offload: one of device, host, nvme for all stages, or one per stage \(2\)"):
        _run(UNTIED_2, "1f1b", 2, offload=("host",))
    with pytest.raises(ConfigError, match=r"nvme_dir: nvme stages keep their files there"):
        _run(UNTIED_2, "1f1b", 2, offload="nvme", nvme_dir=None)
    # the directory is checked where the files go, on each rank's node, and the error names it
    with pytest.raises(PipelineError, match=r"nvme_dir: .*/missing is not a directory on this rank's node"):
        _run(UNTIED_2, "1f1b", 2, offload="nvme", nvme_dir=str(tmp_path / "missing" / "run"))
    with pytest.raises(ConfigError, match=r"zero: 0 \(every replica keeps all optimizer states\), 1 \(ZeRO-1\) or 2"):
        _run(UNTIED_2, "1f1b", 2, zero=3)
    with pytest.raises(ConfigError, match=r"offload: stages 0 and 3 share the tied embeddings on rank 0"):
        _run(TIED_2, "v-half", 2, offload=("host", "device", "device", "device"))


@pytest.mark.slow
@pytest.mark.parametrize(("homes", "dp", "zero"), [(("host", "nvme"), 1, 0), (("host", "device"), 2, 1),
                                                   (("device", "device"), 2, 2), (("host", "nvme"), 2, 2)])
def test_resume_from_a_checkpoint_of_offloaded_and_sharded_stages(local_ray, tmp_path: Path, homes, dp, zero) -> None:
    """A checkpoint after step 1 (an offloaded stage's parameters and optimizer states read from its
    chunks, a ZeRO-1 or ZeRO-2 shard's per rank, an offloaded ZeRO-2 stage's own chunks') continues bitwise as the run that went on."""
    saved: dict[int, dict] = {}

    def keep(k: int, states: dict) -> None:
        saved.update(states)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _run(UNTIED_2, "1f1b", 2, dp=dp, zero=zero, offload=homes, nvme_dir=str(tmp_path / "a"),
                 save_after=lambda k: k == 1, on_states=keep)
    assert sorted(saved) == list(range(2 * dp))
    resumed = _run(UNTIED_2, "1f1b", 2, dp=dp, zero=zero, offload=homes, nvme_dir=str(tmp_path / "b"),
                   start_step=1, states=saved)
    assert resumed.microbatch_losses == whole.microbatch_losses[1:]
