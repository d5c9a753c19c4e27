"""Gradient clipping by global norm (offload.clip) and parameter groups (offload.optim [Note:
parameter groups]) against plain PyTorch: ``clip_grad_norm_`` then ``torch.optim.AdamW``, bitwise
in fp32 on every chunk home, with recompute, and through a state dict and a resume."""

from __future__ import annotations

import pytest
import torch

from memtrain.errors import UserError
from memtrain.models.gpt import GPT, causal_lm_loss, gpt_config
from memtrain.offload.chunks import make_chunk_plans, named_blocks, param_order
from memtrain.planner.plan import ActPolicy, MemoryPolicy, Op, Tier
from memtrain.runtime import wrap

SEQ_LEN, BATCH, MICRO, STEPS = 16, 4, 2, 6
CFG = gpt_config("tiny")


def _batch(step: int):
    ids = torch.randint(0, CFG.vocab_size, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1000 + step))
    return ids[:, :-1], ids[:, 1:]


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or ".norm" in name


def _groups(model, lr2=None):
    """Two groups as the Hugging Face Trainer makes them: decay on all but biases and norms."""
    named = list(model.named_parameters())
    decay = {"params": [n for n, _ in named if not _no_decay(n)], "weight_decay": 0.1}
    rest = {"params": [n for n, _ in named if _no_decay(n)], "weight_decay": 0.0, **({"lr": lr2} if lr2 else {})}
    return [decay, rest]


def _torch_opt(model, groups):
    if groups is None:
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = dict(model.named_parameters())
    return torch.optim.AdamW([{**g, "params": [params[n] for n in g["params"]]} for g in groups], lr=1e-3)


def _reference(max_norm, groups=None, steps=STEPS):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = _torch_opt(model, groups and groups(model))
    losses, norms = [], []
    for step in range(steps):
        x, y = _batch(step)
        num, total = BATCH // MICRO, 0.0
        for xm, ym in zip(x.split(MICRO), y.split(MICRO)):
            loss = causal_lm_loss(model(xm), ym)
            total += loss.item()
            (loss / num).backward()
        if max_norm is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        opt.step()
        opt.zero_grad()
        losses.append(total / num)
    return losses, norms, model, opt


def _homes(model, home, chunk):
    plans = make_chunk_plans(param_order(model, named_blocks(model, None)), chunk, Tier.HOST)
    if home == "cycle":
        return [(Tier.NVME, Tier.HOST, Tier.DEVICE)[i % 3] for i in range(len(plans))]
    return home


def _engine(tmp_path, home, *, max_norm, acts=ActPolicy.KEEP, groups=None, chunk=20_000):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = GPT(CFG)
    blocks = named_blocks(model, None)
    policy = MemoryPolicy(chunk_size_elems=chunk, chunks=make_chunk_plans(param_order(model, blocks), chunk,
                                                                         _homes(model, home, chunk)),
                          prefetch_depth=2, activations=(acts,) * len(blocks))
    optimizer = {"name": "adamw", "lr": 1e-3, **({"param_groups": groups(model)} if groups else {})}
    memory = {"device": "64MiB", "host": "256MiB", "nvme_path": str(tmp_path / "nvme")}
    return wrap(model, optimizer=optimizer, memory=memory, plan=policy, micro_batch_size=MICRO, verbose=False,
                host_kernel="single", max_grad_norm=max_norm), model


def _run(engine, steps=range(STEPS)):
    losses, norms = [], []
    for step in steps:
        losses.append(engine.train_step(_batch(step)))
        norms.append(engine.last_grad_norm)
    return losses, norms


# max_norm 0.05 clips every step (the tiny GPT's norms are about 1); 1e4 never does.
CLIP = [(Tier.DEVICE, ActPolicy.KEEP, 0.05), (Tier.HOST, ActPolicy.KEEP, 0.05), (Tier.NVME, ActPolicy.KEEP, 0.05),
        ("cycle", ActPolicy.RECOMPUTE, 0.05), (Tier.NVME, ActPolicy.RECOMPUTE, 1e4), (Tier.HOST, ActPolicy.KEEP, 1e4)]


@pytest.mark.parametrize("home,acts,max_norm", CLIP, ids=lambda v: getattr(v, "value", str(v)))
def test_clipping_is_torch_clip_grad_norm_bitwise(home, acts, max_norm, tmp_path):
    want, want_norms, ref, _ = _reference(max_norm)
    assert (min(want_norms) > max_norm) if max_norm < 1 else (max(want_norms) < max_norm)  # clips / does not
    engine, model = _engine(tmp_path, home, max_norm=max_norm, acts=acts)
    try:
        got, norms = _run(engine)
        assert engine.optimizer.num_early == 0 and not engine._optim_layout.early
        # no early update: every update is at the step's end of the program
        assert not any(a.op is Op.OPTIM and a.microbatch is not None for a in engine.store.executed)
    finally:
        engine.close()
    assert got == want and norms == want_norms
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_clipping_changes_the_run_and_grad_norm_is_reported_without_clipping(tmp_path):
    unclipped, _, _, _ = _reference(None)
    clipped, _, _, _ = _reference(0.05)
    assert unclipped != clipped  # the tests above see clipping act
    engine, _ = _engine(tmp_path, Tier.HOST, max_norm=None)
    try:
        x, y = _batch(0)
        for i, (xm, ym) in enumerate(zip(x.split(MICRO), y.split(MICRO))):
            engine.backward(engine((xm, ym)) / 2, last_microbatch=i == 1)
        norm = engine.grad_norm()  # as the Trainer logs it, with early updates on
        engine.step()
    finally:
        engine.close()
    _, want_norms, _, _ = _reference(1e9, steps=1)
    assert norm == want_norms[0] == engine.last_grad_norm


@pytest.mark.parametrize("home", [Tier.DEVICE, Tier.HOST, Tier.NVME, "cycle"], ids=lambda v: getattr(v, "value", v))
def test_two_param_groups_are_torch_adamw_groups_bitwise(home, tmp_path):
    groups = lambda m: _groups(m, lr2=3e-4)  # noqa: E731
    want, want_norms, ref, ref_opt = _reference(0.5, groups)
    engine, model = _engine(tmp_path, home, max_norm=0.5, groups=groups)
    # a chunk holds slots of both groups, so the update runs per stretch of one group
    assert any(len(r) > 1 for r in engine.optimizer._runs.values())
    try:
        got, norms = _run(engine)
        sd = engine.state_dict()["optimizer"]
    finally:
        engine.close()
    assert got == want and norms == want_norms
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    want_sd = ref_opt.state_dict()
    assert [len(g["params"]) for g in sd["param_groups"]] == [len(g["params"]) for g in want_sd["param_groups"]]
    assert [(g["lr"], g["weight_decay"]) for g in sd["param_groups"]] == [(0.001, 0.1), (3e-4, 0.0)]
    for i, st in want_sd["state"].items():
        for k, v in st.items():
            assert torch.equal(sd["state"][i][k], v), (i, k)


def test_groups_and_clipping_resume_exactly(tmp_path):
    groups = lambda m: _groups(m)  # noqa: E731
    whole, _ = _engine(tmp_path / "a", Tier.NVME, max_norm=0.05, groups=groups)
    try:
        want, _ = _run(whole)
    finally:
        whole.close()
    first, _ = _engine(tmp_path / "b", Tier.NVME, max_norm=0.05, groups=groups)
    try:
        _run(first, range(3))
        sd = first.state_dict()
    finally:
        first.close()
    # a torch AdamW with the same groups loads the state
    torch.manual_seed(0)
    plain = GPT(CFG)
    _torch_opt(plain, groups(plain)).load_state_dict(sd["optimizer"])
    second, _ = _engine(tmp_path / "c", Tier.NVME, max_norm=0.05, groups=groups)
    try:
        second.load_state_dict(sd)
        got, _ = _run(second, range(3, STEPS))
    finally:
        second.close()
    assert got == want[3:]


@pytest.mark.parametrize("groups,match", [
    ([{"params": ["blocks.0.wte.weight"], "momentum": 0.9}], r"param_groups\[0\]\.momentum: not settable"),
    ([{"params": ["nope"]}], r"param_groups: 'nope' is not a trainable parameter"),
    ([{"params": ["blocks.0.wte.weight"]}], r"param_groups: parameter 'blocks.0.wpe.weight' is in no group"),
    ([{"params": ["blocks.0.wte.weight"]}, {"params": ["blocks.0.wte.weight"]}], r"param_groups\[1\]\.params: .* earlier"),
    ([{"params": ["blocks.0.wte.weight"], "weight_decay": -1}], r"param_groups\[0\]\.weight_decay"),
])
def test_bad_param_groups_name_the_field(groups, match, tmp_path):
    with pytest.raises(UserError, match=match):
        _engine(tmp_path, Tier.HOST, max_norm=None, groups=lambda m: groups)


@pytest.mark.parametrize("value", [-1.0, float("inf"), "1", True])
def test_bad_max_grad_norm_is_refused(value, tmp_path):
    with pytest.raises(UserError, match="max_grad_norm"):
        _engine(tmp_path, Tier.HOST, max_norm=value)


def test_groups_may_list_the_parameters_themselves(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG)
    params = list(model.parameters())
    engine = wrap(model, optimizer={"name": "adamw", "param_groups": [{"params": params[:3]}, {"params": params[3:],
                  "weight_decay": 0.0}]}, memory={"offload": "host", "device": "64MiB", "host": "256MiB"},
                  seq_len=SEQ_LEN, global_batch_size=BATCH, verbose=False)
    try:
        assert [len(g.params) for g in engine.optimizer.spec.param_groups] == [3, len(params) - 3]
        engine.set_lr([1e-4, 2e-4])
        assert [s.lr for s in engine.optimizer.spec.group_specs()] == [1e-4, 2e-4]
        engine.set_lr(5e-4)
        assert [s.lr for s in engine.optimizer.spec.group_specs()] == [5e-4, 5e-4]
        with pytest.raises(UserError, match="2 parameter group"):
            engine.set_lr([1e-4])
    finally:
        engine.close()


def test_a_clipped_plan_has_no_early_updates_and_the_engine_runs_it(tmp_path):
    from memtrain.planner.plan import Plan
    from memtrain.planner.schedule import engine_program

    torch.manual_seed(0)
    model = GPT(CFG)
    memory = {"offload": "nvme", "device": "64MiB", "host": "256MiB", "nvme_path": str(tmp_path / "nvme")}
    engine = wrap(model, optimizer="adamw", memory=memory, seq_len=SEQ_LEN, global_batch_size=BATCH,
                  micro_batch_size=MICRO, verbose=False, max_grad_norm=1.0)
    try:
        plan = engine.plan
        assert plan.train.clip_grad_norm
        program = engine_program(plan.schedule)
        points = [a for a in program if a.op in (Op.OPTIM, Op.OPTIM_READ, Op.OPTIM_WAIT)]
        assert points and all(a.microbatch is None for a in points)  # all at the step's end
        for step in range(2):
            engine.train_step(_batch(step))
            assert [str(a) for a in engine.store.executed] == [str(a) for a in program]
    finally:
        engine.close()
    again = Plan.from_json(plan.to_json())
    assert again.train.clip_grad_norm and again.schedule == plan.schedule
    with pytest.raises(UserError, match="max_grad_norm: the plan was made with gradient clipping"):
        wrap(GPT(CFG), optimizer="adamw", memory=memory, plan=plan, verbose=False)


def _fp16_engine(tmp_path, max_norm):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = GPT(CFG)
    blocks = named_blocks(model, None)
    policy = MemoryPolicy(chunk_size_elems=20_000, chunks=make_chunk_plans(param_order(model, blocks), 20_000, Tier.HOST),
                          prefetch_depth=2, activations=(ActPolicy.KEEP,) * len(blocks))
    return wrap(model, optimizer="adamw", memory={"device": "64MiB", "host": "256MiB"}, plan=policy, dtype="fp16",
                loss_scale={"scale": 1024.0}, micro_batch_size=MICRO, verbose=False, host_kernel="single",
                max_grad_norm=max_norm)


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_fp16_norm_is_of_the_unscaled_gradients_and_asking_for_it_changes_nothing(max_norm, tmp_path):
    fp32, _ = _engine(tmp_path / "fp32", Tier.HOST, max_norm=0.05)
    asked, quiet = _fp16_engine(tmp_path / "a", max_norm), _fp16_engine(tmp_path / "b", max_norm)
    try:
        fp32.train_step(_batch(0))
        for engine, ask in ((asked, True), (quiet, False)):
            x, y = _batch(0)
            for i, (xm, ym) in enumerate(zip(x.split(MICRO), y.split(MICRO))):
                engine.backward(engine((xm, ym)) / 2, last_microbatch=i == 1)
            if ask:
                norm = engine.grad_norm()  # unscales the gradients once; the step must not again
            assert engine.step() is True
        # fp16 compute: the norm of the unscaled gradients is fp32's within fp16's precision
        assert norm == pytest.approx(fp32.last_grad_norm, rel=1e-2)
        a, b = asked.store.gather_params(), quiet.store.gather_params()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (quiet.last_grad_norm is None) == (max_norm is None)
    finally:
        for engine in (fp32, asked, quiet):
            engine.close()

