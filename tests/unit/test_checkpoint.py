"""runtime.checkpoint: atomic, checksummed checkpoint directories and what a rank's state holds."""

from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch

from memtrain.runtime import checkpoint as ck


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"step": seed, "w": torch.randn(1000, generator=g), "nested": {"b": torch.arange(5), "x": [1.5, "a"]}}


@pytest.mark.parametrize("compress", [False, True])
def test_a_saved_checkpoint_reads_back_equal_with_a_manifest_of_checksums(tmp_path, compress):
    path = ck.save(tmp_path, 3, {0: _state(3), 1: _state(4)}, meta={"config": {"name": "x"}}, compress=compress)
    assert path == tmp_path / "step-00000003"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == ck.FORMAT_VERSION and manifest["world_size"] == 2 and manifest["config"] == {"name": "x"}
    suffix = ".pt.zst" if compress else ".pt"
    assert sorted(manifest["files"]) == [f"rank-00000/state{suffix}", f"rank-00001/state{suffix}"]
    loaded = ck.latest(tmp_path, warn=pytest.fail)
    assert loaded.step == 3 and set(loaded.states) == {0, 1}
    for rank, seed in ((0, 3), (1, 4)):
        assert torch.equal(loaded.states[rank]["w"], _state(seed)["w"])
        assert loaded.states[rank]["nested"]["x"] == [1.5, "a"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_only_the_newest_keep_checkpoints_stay(tmp_path):
    for step in range(1, 6):
        ck.save(tmp_path, step, {0: _state(step)}, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_names_the_cause_and_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, err):
    ck.save(tmp_path, 1, {0: _state(1)})
    real = ck._write_file
    calls = []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 2:  # the manifest, after the state file
            raise OSError(err, "No space left on device" if err == errno.ENOSPC else "Read-only file system")
        return real(path, data)

    monkeypatch.setattr(ck, "_write_file", failing)
    with pytest.raises(ck.CheckpointError, match=r"could not write .*step-00000002: (No space left|Read-only).*"
                                                  r"the previous checkpoint step-00000001 is intact"):
        ck.save(tmp_path, 2, {0: _state(2)}, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]  # the temporary directory went, nothing pruned
    assert ck.latest(tmp_path, warn=pytest.fail).step == 1


def test_a_background_write_failure_is_raised_at_the_next_wait(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    writer = ck.Checkpointer(tmp_path / "file" / "sub")  # under a file: cannot be made
    writer.save(1, {0: _state(1)})
    with pytest.raises(ck.CheckpointError, match="could not write"):
        writer.wait()


def test_save_copies_the_state_so_later_training_does_not_change_the_checkpoint(tmp_path):
    live = {"w": torch.zeros(4)}
    writer = ck.Checkpointer(tmp_path)
    writer.save(1, {0: live})
    live["w"].add_(1.0)  # the next step changes the live tensor while the write may be in flight
    writer.wait()
    assert torch.equal(ck.latest(tmp_path).states[0]["w"], torch.zeros(4))


def test_truncated_and_foreign_checkpoints_are_skipped_with_a_warning_naming_them(tmp_path):
    ck.save(tmp_path, 1, {0: _state(1)})
    ck.save(tmp_path, 2, {0: _state(2)})
    ck.save(tmp_path, 3, {0: _state(3)})
    f = tmp_path / "step-00000003" / "rank-00000" / "state.pt"
    f.write_bytes(f.read_bytes()[:-10])
    m = tmp_path / "step-00000002" / "manifest.json"
    m.write_text(json.dumps({**json.loads(m.read_text()), "format": 99}))
    warnings = []
    assert ck.latest(tmp_path, warn=warnings.append).step == 1
    assert "step-00000003" in warnings[0] and "checksum" in warnings[0]
    assert "step-00000002" in warnings[1] and "format 99" in warnings[1]


def test_the_rng_states_round_trip_so_every_generator_continues_its_sequence():
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    state = ck._copied(ck.capture_rng())
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    ck.restore_rng(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def _engine(memory: dict):
    from memtrain.models.gpt import GPT, gpt_config
    from memtrain.runtime.wrapping import wrap

    torch.manual_seed(0)
    model = GPT(gpt_config("tiny"))
    return wrap(model, optimizer="adamw", memory=memory, micro_batch_size=2, verbose=False, device="cpu", seq_len=16,
                global_batch_size=2)


BATCH = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))


def _tensors(state: dict) -> dict:
    return {(c["index"], k): t for c in state["engine"]["chunks"]
            for k, t in [("master", c.get("master")), *c.get("states", {}).items()] if t is not None}


def test_engine_state_holds_copies_so_the_next_steps_change_nothing_in_it():
    engine = _engine({"device": 2**30, "host": 2**30, "offload": "host"})
    try:
        engine.train_step((BATCH[:, :-1], BATCH[:, 1:]))
        state = ck.engine_state(engine, step=1)
        frozen = ck._copied(state)
        assert len(_tensors(state)) == 3 * len(engine.store.chunks)  # master, exp_avg, exp_avg_sq of each
        engine.train_step((BATCH[:, :-1], BATCH[:, 1:]))
        for key, t in _tensors(frozen).items():
            assert torch.equal(_tensors(state)[key], t), key
        assert not all(torch.equal(_tensors(ck.engine_state(engine, step=2))[k], t) for k, t in _tensors(frozen).items())
    finally:
        engine.close()


def test_nvme_chunks_are_kept_as_the_stores_files_and_come_back_exactly(tmp_path):
    """offload.chunk_state [Note: NVMe chunks in a checkpoint]: no NVMe chunk's tensors in the
    state; its files as they were at the checkpoint, though training goes on rewriting them."""
    memory = {"device": 2**30, "host": 2**30, "offload": "nvme", "nvme_path": str(tmp_path / "nvme")}
    engine = _engine(memory)
    try:
        engine.train_step((BATCH[:, :-1], BATCH[:, 1:]))
        writer = ck.Checkpointer(tmp_path / "ckpt")
        writer.save(1, {0: ck.engine_state(engine, step=1)}, copy=False)
        after = [engine.train_step((BATCH[:, :-1], BATCH[:, 1:])) for _ in range(2)]  # rewrites every chunk file
        writer.wait()
    finally:
        engine.close()
    loaded = ck.latest(tmp_path / "ckpt", warn=pytest.fail)
    chunks = loaded.states[0]["engine"]["chunks"]
    assert {c["home"] for c in chunks} == {"nvme"} and all("master" not in c for c in chunks)
    parts = {k.rsplit(":", 1)[1] for k in loaded.nvme_files[0]}
    assert parts == {"master", "exp_avg", "exp_avg_sq"} and len(loaded.nvme_files[0]) == 3 * len(chunks)
    manifest = loaded.manifest["files"]
    assert sum(e.get("kind") == "nvme" for e in manifest.values()) == 3 * len(chunks)
    engine = _engine({**memory, "nvme_path": str(tmp_path / "nvme2")})
    try:
        ck.restore_engine_state(engine, loaded)
        again = [engine.train_step((BATCH[:, :-1], BATCH[:, 1:])) for _ in range(2)]
    finally:
        engine.close()
    assert again == after


def test_a_corrupt_nvme_file_in_a_checkpoint_is_caught_by_its_checksum(tmp_path):
    memory = {"device": 2**30, "host": 2**30, "offload": "nvme", "nvme_path": str(tmp_path / "nvme")}
    engine = _engine(memory)
    try:
        engine.train_step((BATCH[:, :-1], BATCH[:, 1:]))
        ck.save(tmp_path / "ckpt", 1, {0: ck.engine_state(engine, step=1)})
    finally:
        engine.close()
    f = next((tmp_path / "ckpt" / "step-00000001" / "rank-00000" / "nvme").iterdir())
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    warnings = []
    assert ck.latest(tmp_path / "ckpt", warn=warnings.append) is None
    assert f.name in warnings[0] and "checksum" in warnings[0]
