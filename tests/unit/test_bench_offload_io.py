"""bench/offload_io.py end to end on a tiny model: it runs, prints every figure, rejects bad input."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "offload_io.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("offload_io_bench", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        del sys.modules[spec.name]


def test_runs_on_a_tiny_model_and_prints_every_figure(bench, tmp_path, capsys):
    rc = bench.main(["--path", str(tmp_path), "--size", "8MiB", "--chunk", "4MiB", "--repeat", "1", "--train", "tiny",
                     "--train-steps", "2", "--train-chunk-elems", "40000", "--train-staged", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("raw file", "NvmeStore O_DIRECT", "step, all chunks on NVMe", "compute alone", "I/O alone",
                 "step / lower bound", "spread (least-most)", "compute and I/O at once, no dependencies", "optimizer stages up to 2 NVMe chunks at once; host ledger peak"):
        assert text in out, text
    assert not list(tmp_path.iterdir())  # every file the bench wrote is gone


def test_training_result_reports_the_staging_it_ran_with(bench, tmp_path):
    r = bench.measure_training(str(tmp_path), preset="tiny", seq_len=16, micro_batch_size=1, num_micro=2, num_steps=1,
                               chunk_elems=40_000, prefetch_depth=None, optim_staged_chunks=1)
    assert r.optim_staged_chunks == 1 and r.host_peak_bytes > 0
    assert r.max_loss_diff < 1e-5 and r.step_s > 0 and r.io_s > 0 and r.read_bytes > 0 and r.write_bytes > 0
    assert r.step_range_s[0] <= r.step_s <= r.step_range_s[1] and r.io_range_s[0] <= r.io_s <= r.io_range_s[1]
    assert r.together_s > 0


@pytest.mark.parametrize("argv,field", [(["--train-staged", "0"], "--train-"), (["--train-prefetch", "x"], "--train-prefetch"),
                                         (["--chunk", "1000"], "--chunk")])
def test_bad_input_exits_2_naming_the_option(bench, tmp_path, capsys, argv, field):
    assert bench.main(["--path", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err
