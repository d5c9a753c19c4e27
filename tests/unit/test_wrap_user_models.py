"""wrap() on models written the way people write them, not only on the built-in GPT.

Each model here trains with memtrain exactly as with plain PyTorch: tensors made inside
``forward`` without ``device=`` (or with one named outright), a ``forward(idx, targets)`` that
returns ``(logits, loss)`` run through ``call=``, and blocks under the user's own labels.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memtrain.errors import UserError
from memtrain.runtime import wrap

VOCAB, DIM, HEADS, SEQ = 96, 32, 4, 24


class Layer(nn.Module):
    """A pre-norm transformer layer whose causal mask is made in forward without ``device=``."""

    def __init__(self, explicit_device: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc, self.out = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)
        self.explicit_device = explicit_device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(c, dim=2))
        att = (q @ k.transpose(-2, -1)) / (c // HEADS) ** 0.5
        if self.explicit_device:  # written for a CPU: a device named outright, then moved to x's
            mask = torch.ones(t, t, dtype=torch.bool, device="cpu").triu(1).to(x.device)
        else:
            mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        y = (att.masked_fill(mask, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """nanoGPT-style: ``forward(idx, targets)`` returns ``(logits, loss)``; positions from ``torch.arange(T)``."""

    def __init__(self, explicit_device: bool = False) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ, DIM)
        self.layers = nn.ModuleList(Layer(explicit_device) for _ in range(3))
        self.ln_f, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB, bias=False)
        self.explicit_device = explicit_device

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None):
        pos = torch.arange(idx.shape[1])
        if self.explicit_device:
            pos = pos.cpu().to(idx.device, torch.long)
        x = self.wte(idx) + self.wpe(pos)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        return logits, loss


def _labelled(model: TinyLM) -> list[tuple[str, nn.Module]]:
    return [("embedding", model.wte), *((f"layer{i}", m) for i, m in enumerate(model.layers)), ("lm head", model.head)]


def _batches(num: int, batch: int = 4):
    g = torch.Generator().manual_seed(3)
    for _ in range(num):
        ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
        yield ids, torch.roll(ids, -1, 1)


@pytest.mark.parametrize("explicit_device", [False, True], ids=["no-device", "device-named"])
@pytest.mark.parametrize("tier, memory", [
    ("device", {"device": "64MiB", "host": "256MiB"}),  # everything fits on the device
    ("host", {"device": "1MiB", "host": "256MiB"}),     # states go to the host, activations recomputed
    ("nvme", {"device": "1MiB", "host": 600_000}),      # and to NVMe
], ids=["device", "host", "nvme"])
def test_a_user_written_model_trains_like_plain_torch(tmp_path, tier, memory, explicit_device):
    torch.manual_seed(0)
    model, ref = TinyLM(explicit_device), TinyLM(explicit_device)
    ref.load_state_dict(model.state_dict())
    if tier == "nvme":
        memory = {**memory, "nvme_path": str(tmp_path / "nvme")}
    engine = wrap(model, optimizer={"name": "adamw", "lr": 1e-3}, memory=memory, blocks=_labelled(model),
                  call=lambda m, ids: m(ids, None)[0], host_kernel="single", micro_batch_size=4, verbose=False)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for ids, labels in _batches(4):
        loss = engine.train_step((ids, labels))
        _, expected = ref(ids, labels)
        expected.backward()
        opt.step()
        opt.zero_grad()
        assert loss == expected.item()  # bitwise: the same arithmetic in the same order
    assert tier in {str(c.home) for c in engine.store.chunks}
    assert [name for name, _ in engine.blocks] == ["embedding", "layer0", "layer1", "layer2", "lm head"]
    engine.close()
    refs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, refs[name]), name


def test_the_planner_runs_the_model_through_call():
    """The planner's trace runs ``call``; without it, it fails as plain ``model(ids)`` would."""
    model = TinyLM()
    engine = wrap(model, optimizer="adamw", memory={"device": "64MiB", "host": "256MiB"}, blocks=_labelled(model),
                  call=lambda m, ids: m(ids, None)[0], seq_len=SEQ, global_batch_size=4, verbose=False)
    assert [b.name for b in engine.plan.model.blocks] == ["embedding", "layer0", "layer1", "layer2", "lm head"]
    engine.close()
    with pytest.raises(TypeError, match="targets"):
        wrap(model, optimizer="adamw", memory={"device": "64MiB"}, blocks=_labelled(model), seq_len=SEQ,
             global_batch_size=4, verbose=False)


class ReadsValues(nn.Module):
    """A forward that reads a tensor's value: it cannot be traced without weights."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, VOCAB)
        self.blocks = [self.emb, self.mid, self.head]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.emb(idx))
        if h.abs().max().item() > 1e4:  # a value read between two blocks
            h = h / h.abs().max()
        return self.head(h)


def test_a_model_that_reads_values_in_forward_gets_a_message_naming_the_block():
    model = ReadsValues()
    with pytest.raises(UserError, match=r"after block 'mid', outside every block.*\.item\(\)") as info:
        wrap(model, optimizer="adamw", memory={"device": "64MiB"}, seq_len=SEQ, global_batch_size=2, verbose=False)
    assert "plan=" in str(info.value)  # the way out is named


@pytest.mark.parametrize("blocks, match", [
    (lambda m: [("a", m.wte), ("a", m.layers[0])], "label of block 'a' appears twice"),
    (lambda m: [("a", m.wte), ("b", m.wte)], "module of block 'b' appears twice"),
    (lambda m: [(0, m.wte)], "not a \\(label, module\\) pair"),
    (lambda m: [("x", nn.Linear(2, 2))], "'x' is not a submodule"),
])
def test_bad_block_lists_are_refused_by_name(blocks, match):
    model = TinyLM()
    with pytest.raises(UserError, match=match):
        wrap(model, optimizer="adamw", memory={"device": "64MiB"}, blocks=blocks(model), seq_len=SEQ,
             global_batch_size=2, verbose=False)
