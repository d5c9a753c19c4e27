"""``models.gpt_blocks.build_blocks``: a worker's blocks equal the whole model's, bit for bit,
without building the others."""

from __future__ import annotations

import pytest
import torch

from memtrain.models.gpt import GPT, gpt_config
from memtrain.models.gpt_blocks import build_blocks

CASES = [
    ("tiny", {}),  # learned positions, LayerNorm with biases, tied embeddings
    ("tiny", {"norm": "rmsnorm", "position": "rotary", "activation": "swiglu", "bias": False, "num_kv_heads": 2}),
    ("tiny", {"tie_embeddings": False, "bias": True}),
]


@pytest.mark.parametrize("preset,overrides", CASES)
@pytest.mark.parametrize("keep", [{0}, {1, 2}, {"last"}, {0, "last"}, "all"])
def test_kept_blocks_equal_the_whole_models(preset, overrides, keep):
    cfg = gpt_config(preset, **overrides)
    torch.manual_seed(7)
    whole = GPT(cfg)
    n = len(whole.blocks)
    keep = set(range(n)) if keep == "all" else {n - 1 if k == "last" else k for k in keep}
    got = build_blocks(cfg, keep, seed=7)
    assert sorted(got) == sorted(keep)
    for i, block in got.items():
        want = dict(whole.blocks[i].named_parameters(remove_duplicate=False))
        have = dict(block.named_parameters(remove_duplicate=False))
        assert want.keys() == have.keys()
        for name in want:
            assert torch.equal(want[name], have[name]), (i, name)
        assert block.training
    if cfg.tie_embeddings and {0, n - 1} <= keep:
        assert got[n - 1].lm_head.weight is got[0].wte.weight
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    if keep == set(range(n)):
        y = x
        for i in range(n):
            y = got[i](y)
        torch.testing.assert_close(y, whole(x), rtol=0, atol=0)


def test_a_block_outside_the_model_is_refused():
    with pytest.raises(ValueError, match=r"keep: block indices in 0..3"):
        build_blocks(gpt_config("tiny"), {4}, seed=0)
