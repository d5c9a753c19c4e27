"""memtrain.optimizers is the only place an optimizer's facts are written: the planner's bytes, the
chunk store's state buffers and files, the state dict and the config's defaults all follow the
descriptor; the defaults are torch's; an unknown name is refused everywhere."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memtrain import optimizers
from memtrain.errors import UserError
from memtrain.models.gpt import GPT, gpt_config
from memtrain.offload.chunks import make_chunk_plans, named_blocks, param_order
from memtrain.optimizers import KINDS, Optimizer, OptimizerSpec, lookup
from memtrain.planner import cost
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Tier
from memtrain.planner.stats import model_state_bytes_per_param
from memtrain.runtime import wrap
from memtrain.config import ConfigError, OptimizerConfig, config_from_dict

ROOT = Path(__file__).resolve().parents[2]
OPTIMIZERS = {"adamw": {"name": "adamw", "lr": 1e-3}, "sgd": {"name": "sgd", "lr": 1e-2, "momentum": 0.9}}
"""One setting per registered optimizer that holds all of its states."""


def test_every_registered_optimizer_is_tested():
    assert set(OPTIMIZERS) == {str(o) for o in Optimizer} == {k.name for k in KINDS.values()}


def _engine(optimizer, home: Tier, tmp_path: Path):
    torch.manual_seed(0)
    model = GPT(gpt_config("tiny"))
    blocks = named_blocks(model, None)
    policy = MemoryPolicy(chunk_size_elems=20_000, chunks=make_chunk_plans(param_order(model, blocks), 20_000, home),
                          prefetch_depth=2, activations=(ActPolicy.KEEP,) * len(blocks))
    return wrap(model, optimizer=optimizer, plan=policy, micro_batch_size=2, verbose=False,
                memory={"device": "64MiB", "host": "256MiB", "nvme_path": str(tmp_path / "nvme")})


@pytest.mark.parametrize("home", [Tier.HOST, Tier.NVME])
@pytest.mark.parametrize("extra", [False, True], ids=["registered", "one-more-state"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_descriptor_is_what_every_reader_uses(name, extra, home, monkeypatch, tmp_path):
    kind = lookup(name)
    if extra:  # a descriptor with one more state: a reader with a copy of its own would not follow
        kind = dataclasses.replace(kind, state_names=(*kind.state_names, "extra"))
        monkeypatch.setattr(optimizers, "KINDS", {**KINDS, Optimizer(name): kind})
    o = 4 * len(kind.state_names)
    # the planner
    assert cost.optimizer_state_bytes_per_elem(name) == o
    assert model_state_bytes_per_param("fp32", name) == 4 + 4 + o
    assert cost.chunk_bytes(Tier.HOST, 10, "fp32", name)[Tier.HOST] == 10 * (4 + 4 + o)
    assert cost.nvme_chunk_file_sizes(10, "fp32", name) == [40] * (1 + len(kind.state_names))
    assert cost.optimizer_bytes_touched(1, "fp32", name) == kind.fused_bytes_per_elem == 4 + 2 * (4 + o)
    # the chunk store
    engine = _engine(OPTIMIZERS[name], home, tmp_path)
    store = engine.store
    assert store.state_names == kind.state_names
    for c in store.chunks:
        if home is Tier.HOST:
            assert tuple(c.states) == kind.state_names
        else:
            owners = store.nvme.ledger.by_owner()
            parts = {k.rsplit(":", 1)[1] for k in owners if k.startswith(f"chunk:{c.index}:")}
            assert parts == {"master", *kind.state_names}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (4, 17), generator=gen)
    engine.train_step((ids[:, :-1], ids[:, 1:]))
    # the state dict torch.optim reads
    sd = engine.state_dict()["optimizer"]
    engine.close()
    assert sd["state"] and all(set(s) == {*kind.state_names, *(["step"] if kind.counts_steps else [])}
                               for s in sd["state"].values())
    group = sd["param_groups"][0]
    assert list(group) == [*kind.defaults, *kind.group_flags, "params"]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_defaults_are_torchs(name):
    p = torch.nn.Parameter(torch.zeros(3))
    reference = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]([p]).param_groups[0]
    assert OptimizerSpec(name=name).torch_group() == {k: v for k, v in reference.items() if k != "params"}
    # a config file's section has the same defaults
    assert OptimizerConfig(name=name).spec() == OptimizerSpec(name=name)
    assert config_from_dict({"train": {"optimizer": {"name": name}}}).train.optimizer.spec() == OptimizerSpec(name=name)


def test_sgd_without_momentum_holds_no_state():
    assert OptimizerSpec(name="sgd").state_names == ()
    assert OptimizerSpec(name="sgd", momentum=0.9).state_names == ("momentum_buffer",)


def test_wrap_md_lists_the_registrys_defaults():
    text = (ROOT / "docs" / "wrap.md").read_text().split("## Optimizer", 1)[1]
    rows = re.findall(r"^\| `(\w+)` \| ([\w ,()]+?) \| `([^`]+)`", text, flags=re.M)
    listed = {(key, name): value for key, names, value in rows for name in re.findall(r"adamw|sgd", names)}
    want = {(key, kind.name): repr(value) for kind in KINDS.values() for key, value in kind.defaults.items()}
    assert listed == want


def test_an_unknown_optimizer_is_refused_naming_the_field_and_the_known_names(capsys):
    known = "memtrain knows adamw, sgd"
    model = GPT(gpt_config("tiny"))
    for value in ("lamb", {"name": "lamb", "lr": 1e-3}):
        with pytest.raises(UserError, match=rf"^optimizer\.name: unknown optimizer 'lamb'; {known}$"):
            wrap(model, optimizer=value, memory={"device": "64MiB"}, seq_len=16, global_batch_size=2, verbose=False)
    with pytest.raises(UserError, match=rf"^optimizer: unknown optimizer 'lamb'; {known}$"):
        cost.chunk_bytes(Tier.HOST, 10, "fp32", "lamb")
    with pytest.raises(UserError, match=known):
        Optimizer("lamb")  # the planner's plan(optimizer=) and a plan file's field
    with pytest.raises(ConfigError, match=rf"^train\.optimizer\.name: unknown optimizer 'lamb'; {known}$"):
        config_from_dict({"train": {"optimizer": {"name": "lamb"}}})
    from memtrain.runtime.cli import main

    rc = main(["plan", str(ROOT / "examples" / "tiny-cpu.yaml"), "--quiet", "--set", "train.optimizer.name=lamb"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.splitlines() == [f"memtrain: error: train.optimizer.name: unknown optimizer 'lamb'; {known}"]


def test_the_planner_and_the_config_do_not_import_torch():
    script = ("import sys, memtrain.planner.search, memtrain.planner.cost, memtrain.config; "
              "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
