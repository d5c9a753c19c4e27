"""``train.optimizer.param_groups`` in the config file: reading and refusals (each naming the
field), the first matching group taking a parameter, ``memtrain plan``/``run`` exiting 2 on a bad
group, and ``memtrain run`` in one process bitwise a plain ``torch.optim.AdamW`` loop with the
same groups under ``LambdaLR`` (warm-up, then cosine), through a checkpoint and ``resume`` too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from memtrain.config import ConfigError, DataConfig, ModelConfig, config_from_dict
from memtrain.models.gpt import gpt_config
from memtrain.models.gpt_blocks import param_names
from memtrain.models.source import build_model
from memtrain.runtime.cli import main
from memtrain.runtime.config_file import load_config
from memtrain.runtime.data import TokenBatches
from memtrain.runtime.planning import optimizer_spec
from memtrain.runtime.train import lr_at, lr_factor, step_lrs, train

UNTIED = {"source": "gpt", "preset": "tiny", "overrides": {"num_layers": 2, "tie_embeddings": False}}
NAMES = param_names(gpt_config("tiny", num_layers=2, tie_embeddings=False))
HEAD = "blocks.3"  # the head of a 2-layer gpt: embedding, 2 layers, head
GROUPS = [  # no decay on biases and norms; the head's weights at 3x the rate; the rest as the optimizer
    {"params": ["*.bias", "*norm*"], "weight_decay": 0.0},
    {"params": [f"{HEAD}.*"], "lr": 3e-3},
    {"params": ["*"]},
]


def _optimizer(groups) -> dict:
    return {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "param_groups": groups}


def _resolved(groups):
    cfg = config_from_dict({"model": UNTIED, "train": {"optimizer": _optimizer(groups)}})
    return optimizer_spec(cfg).param_groups


def test_the_first_matching_group_takes_a_parameter_and_names_keep_the_models_order():
    g0, g1, g2 = _resolved(GROUPS)
    no_decay = [n for n in NAMES if n.endswith(".bias") or "norm" in n]
    assert g0.params == tuple(no_decay) and g0.weight_decay == 0.0 and g0.lr is None
    assert f"{HEAD}.lm_head.bias" in g0.params  # *.bias came first
    assert g1.params == (f"{HEAD}.lm_head.weight",) and g1.lr == 3e-3 and g1.weight_decay is None
    assert g2.params == tuple(n for n in NAMES if n not in no_decay and not n.startswith(HEAD))
    # exact names work as patterns without wildcards; an entry repeating its own group's is harmless
    exact = _resolved([{"params": ["blocks.0.wte.weight", "blocks.0.*"], "lr": 0.5}, {"params": ["*"]}])
    assert exact[0].params == ("blocks.0.wte.weight", "blocks.0.wpe.weight") and exact[0].lr == 0.5


@pytest.mark.parametrize("groups, message", [
    ([{"params": ["*.bias"]}],
     r"train\.optimizer\.param_groups: the parameter 'blocks\.0\.wte\.weight' is in no group; .*params: \['\*'\]"),
    ([{"params": ["*.weigth"]}, {"params": ["*"]}],
     r"train\.optimizer\.param_groups\[0\]\.params\[0\]: the pattern '\*\.weigth' matches no parameter"),
    ([{"params": ["blocks.9.attn.qkv.weight"]}, {"params": ["*"]}],
     r"param_groups\[0\]\.params\[0\]: the name 'blocks\.9\.attn\.qkv\.weight' matches no parameter .*"
     r"such as 'blocks\.0\.wte\.weight'"),
    ([{"params": ["*"]}, {"params": ["*.bias"], "weight_decay": 0.0}],
     r"param_groups\[1\]\.params\[0\]: every parameter '\*\.bias' matches is already in group 0 .*"
     r"move this group before group 0"),
])
def test_groups_that_cannot_be_resolved_are_refused_naming_the_entry_and_the_fix(groups, message):
    with pytest.raises(ConfigError, match=message):
        _resolved(groups)


@pytest.mark.parametrize("groups, message", [
    ([{"params": []}], r"param_groups\[0\]\.params: a list of parameter names or patterns .* got none"),
    ([{"params": ["*"]}, {"params": [" "]}], r"param_groups\[1\]\.params\[0\]: an empty name"),
    ([{"params": "*"}], r"param_groups\[0\]\.params: expected a list"),
    ([{"params": ["*"], "lr": -1}], r"param_groups\[0\]\.lr: must be a finite number >= 0"),
    ([{"params": ["*"], "weight_decay": -0.1}], r"param_groups\[0\]\.weight_decay: must be a finite number >= 0"),
    ([{"params": ["*"], "betas": [0.9, 0.9]}], r"param_groups\[0\]\.betas: unknown field; known fields here: "
                                               r"params, lr, weight_decay"),
    ([{"params": ["*.bias"]}, {"params": ["*", "*.bias"]}], r"param_groups\[1\]\.params\[1\]: '\*\.bias' is also "
                                                            r"in group 0"),
    ({"params": ["*"]}, r"train\.optimizer\.param_groups: expected a list"),
])
def test_malformed_groups_are_refused_when_the_config_is_read(groups, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"train": {"optimizer": _optimizer(groups)}})


def test_groups_are_read_from_yaml_and_set_options(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"model": UNTIED, "train": {"optimizer": _optimizer(GROUPS)}}))
    cfg = load_config(path, ["train.optimizer.param_groups[1].lr=1e-2"])
    assert [g.lr for g in cfg.train.optimizer.param_groups] == [None, 1e-2, None]
    cfg = load_config(None, ["train.optimizer.param_groups=[{params: ['*norm*'], weight_decay: 0}, {params: ['*']}]"])
    assert [(g.params, g.weight_decay) for g in cfg.train.optimizer.param_groups] == [(["*norm*"], 0.0), (["*"], None)]


def test_each_groups_rate_is_its_peak_times_the_schedules_factor():
    cfg = config_from_dict({"model": UNTIED, "train": {"steps": 6, "warmup_steps": 2, "lr_schedule": "cosine",
                                                       "optimizer": _optimizer(GROUPS)}})
    for step in range(6):
        f = lr_factor(step, cfg)
        assert step_lrs(step, cfg) == (1e-3 * f, 3e-3 * f, 1e-3 * f)
        assert lr_at(step, cfg) == 1e-3 * f
    assert [lr_factor(k, cfg) for k in (0, 1, 2)] == [0.5, 1.0, 1.0]
    plain = config_from_dict({"train": {"optimizer": {"lr": 1e-3}}})
    assert step_lrs(0, plain) == lr_at(0, plain) == 1e-3  # without groups: one number, as before


@pytest.mark.parametrize("command, pipeline", [("plan", 1), ("run", 1), ("plan", 2), ("run", 2)])
def test_the_cli_exits_2_naming_the_entry(tmp_path, capsys, command, pipeline):
    """One process and a pipeline alike (refused before Ray starts)."""
    path = tmp_path / "bad.yaml"
    groups = [{"params": ["*.bias"], "weight_decay": 0.0}, {"params": ["*.weigth"]}]
    path.write_text(yaml.safe_dump({"model": UNTIED, "train": {"optimizer": _optimizer(groups)},
                                    "parallel": {"pipeline": pipeline}, "run_dir": str(tmp_path / "run")}))
    import sys

    had_ray = "ray" in sys.modules
    assert main([command, str(path)]) == 2
    if not had_ray:
        import ray

        assert not ray.is_initialized()
    err = capsys.readouterr().err
    assert "train.optimizer.param_groups[1].params[0]: the pattern '*.weigth' matches no parameter" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_plan_accepts_a_config_with_groups(tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump({"model": UNTIED, "train": {"optimizer": _optimizer(GROUPS)},
                                    "run_dir": str(tmp_path / "run")}))
    assert main(["plan", str(path), "--quiet"]) == 0


# --- memtrain run against plain PyTorch ------------------------------------------------------------


STEPS, BATCH, MICRO, SEQ = 6, 4, 2, 16


def _run_config(tmp_path: Path, name: str, **checkpoint) -> Path:
    cfg = {"name": name, "model": UNTIED, "data": {"source": "synthetic", "seed": 3},
           "train": {"global_batch_size": BATCH, "micro_batch_size": MICRO, "seq_len": SEQ, "steps": STEPS, "seed": 7,
                     "warmup_steps": 2, "lr_schedule": "cosine", "optimizer": _optimizer(GROUPS)},
           "memory": {"offload": "device", "activations": "keep"}, "checkpoint": checkpoint,
           "run_dir": str(tmp_path / "runs" / "{name}")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torch_reference(cfg) -> tuple[list[float], list[list[float]]]:
    """Plain PyTorch: the groups written out by hand (not by memtrain's resolution), AdamW,
    ``LambdaLR`` with the run's schedule factor, the batch as micro-batches, each loss / their
    number before its backward. The mean loss and every group's rate per step."""
    torch.manual_seed(cfg.train.seed)
    built = build_model(ModelConfig(**UNTIED), max_seq_len=SEQ)
    named = list(built.module.named_parameters())
    no_decay = [q for n, q in named if n.endswith(".bias") or "norm" in n]
    head = [q for n, q in named if n.startswith(f"{HEAD}.") and not (n.endswith(".bias") or "norm" in n)]
    rest = [q for n, q in named if not any(q is r for r in no_decay + head)]
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": head, "lr": 3e-3},
                             {"params": rest}], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, cfg))
    data = TokenBatches(DataConfig(source="synthetic", seed=3), batch_size=BATCH, seq_len=SEQ,
                        vocab_size=built.vocab_size)
    losses, lrs = [], []
    for step in range(STEPS):
        ids, labels = data.batch(step)
        total = 0.0
        for rows in (slice(0, MICRO), slice(MICRO, BATCH)):
            loss = built.loss_fn(built.forward(ids[rows]), labels[rows])
            (loss / (BATCH // MICRO)).backward()
            total += loss.item()
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(total / (BATCH // MICRO))
    return losses, lrs


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_with_groups_is_bitwise_torch_adamw_with_the_same_groups_and_schedule(tmp_path):
    cfg = load_config(_run_config(tmp_path, "groups"))
    out = train(cfg, print_fn=lambda s: None)
    want, want_lrs = _torch_reference(cfg)
    assert out["losses"] == want  # bitwise
    metrics = _metrics(tmp_path / "runs" / "groups")
    assert [m["group_lrs"] for m in metrics] == want_lrs
    assert want_lrs[0] == [0.5e-3, 1.5e-3, 0.5e-3]  # the warm-up's first step scales every group's own rate
    # the groups matter: the same run with one group of everything trains otherwise
    plain = load_config(_run_config(tmp_path, "plain"), ["train.optimizer.param_groups=[]"])
    assert train(plain, print_fn=lambda s: None)["losses"][2:] != want[2:]


def test_a_run_with_groups_resumed_from_a_checkpoint_continues_exactly(tmp_path):
    from memtrain.runtime.resume import resume

    whole = train(load_config(_run_config(tmp_path, "whole", interval_steps=3)), print_fn=lambda s: None)
    run = tmp_path / "runs" / "whole"
    cut = tmp_path / "runs" / "cut"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / f"step-{STEPS:08d}")  # as if stopped after step 3
    with pytest.raises(ConfigError, match=r"train\.optimizer\.param_groups"):  # another group rate: not exact
        resume(cut, overrides=["train.optimizer.param_groups[1].lr=1e-2"], print_fn=lambda s: None)
    lines: list[str] = []
    resume(cut, print_fn=lines.append)
    assert any(line.startswith("resuming after step 3 ") for line in lines)
    assert [m["loss"] for m in _metrics(cut)] == whole["losses"]  # steps 4-6 rerun bitwise
    assert [m["group_lrs"] for m in _metrics(cut)] == [m["group_lrs"] for m in _metrics(run)]
    # the resumed run's final weights are the uninterrupted run's
    from memtrain.runtime.checkpoint import latest

    a, b = latest(run / "checkpoints"), latest(cut / "checkpoints")
    assert a.step == b.step == STEPS
    sa, sb = a.states[0], b.states[0]
    assert torch.equal(torch.as_tensor(_flat(sa)), torch.as_tensor(_flat(sb)))


def _flat(state) -> torch.Tensor:
    """Every tensor of a checkpoint's state, in its order, concatenated."""
    out: list[torch.Tensor] = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append(v.detach().reshape(-1).double())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(state)
    assert out
    return torch.cat(out)
