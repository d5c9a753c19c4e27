"""Model sources: gpt, hf and python factories build models split into blocks."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from memtrain.models import BuiltModel, build_model, causal_lm_loss, gpt_config
from memtrain.config import ConfigError, ModelConfig

FACTORY_MODULE = "mt_test_model_factories"

FACTORY_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Tiny(nn.Module):
        def __init__(self, vocab=32, dim=16, num_layers=2):
            super().__init__()
            self.vocab_size = vocab
            self.embed = nn.Embedding(vocab, dim)
            self.layers = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU()) for _ in range(num_layers)
            )
            self.scale = nn.Parameter(torch.ones(dim))  # outside every block, used before the head
            self.out = nn.Linear(dim, vocab)

        def forward(self, input_ids):
            x = self.embed(input_ids)
            for layer in self.layers:
                x = x + layer(x)
            return self.out(x * self.scale)


    def with_blocks():
        m = Tiny()
        m.blocks = [m.embed, *m.layers, m.out]
        return m


    def as_pair():
        m = Tiny()
        return m, nn.ModuleList([m.embed, *m.layers, m.out])


    def mean_logit_loss(logits, labels):
        return logits.float().mean()


    def as_triple():
        m = Tiny()
        return m, [m.embed, *m.layers, m.out], mean_logit_loss


    def no_blocks():
        return Tiny()


    def wrong_type():
        return 42


    def foreign_block():
        m = Tiny()
        return m, [m.embed, nn.Linear(4, 4)]


    not_a_function = 3
    """
)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / f"{FACTORY_MODULE}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, FACTORY_MODULE, raising=False)
    yield FACTORY_MODULE
    sys.modules.pop(FACTORY_MODULE, None)


def _python(factory: str) -> ModelConfig:
    return ModelConfig(source="python", factory=factory)


# --- gpt -------------------------------------------------------------------------------------


def test_gpt_blocks_are_embedding_layers_head_in_order():
    built = build_model(ModelConfig(preset="tiny", overrides={"num_layers": 3}))
    assert [n for n, _ in built.blocks] == [f"blocks.{i}" for i in range(5)]
    assert all(m is built.module.blocks[i] for i, (_, m) in enumerate(built.blocks))
    assert built.vocab_size == gpt_config("tiny").vocab_size
    assert built.loss_fn is causal_lm_loss


def test_build_on_meta_allocates_nothing_and_builds_on_default_device():
    with torch.device("meta"):
        built = build_model(ModelConfig(preset="1.3b"))
    assert {p.device.type for p in built.module.parameters()} == {"meta"}
    cpu = build_model(ModelConfig(preset="tiny"))
    assert {p.device.type for p in cpu.module.parameters()} == {"cpu"}


def test_same_seed_builds_the_same_weights():
    torch.manual_seed(3)
    a = build_model(ModelConfig(preset="tiny"))
    torch.manual_seed(3)
    b = build_model(ModelConfig(preset="tiny"))
    for (na, pa), (nb, pb) in zip(a.module.named_parameters(), b.module.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_make_batch_is_seeded_and_labels_are_shifted_by_one():
    built = build_model(ModelConfig(preset="tiny"))
    ids, labels = built.make_batch(3, 16, torch.Generator().manual_seed(7))
    ids2, labels2 = built.make_batch(3, 16, torch.Generator().manual_seed(7))
    ids3, _ = built.make_batch(3, 16, torch.Generator().manual_seed(8))
    assert ids.shape == labels.shape == (3, 16) and ids.dtype == torch.long
    assert torch.equal(ids, ids2) and torch.equal(labels, labels2)
    assert not torch.equal(ids, ids3)
    assert torch.equal(ids[:, 1:], labels[:, :-1])
    assert int(ids.min()) >= 0 and int(ids.max()) < built.vocab_size


def test_forward_gives_logits_and_a_trainable_loss():
    torch.manual_seed(0)
    built = build_model(ModelConfig(preset="tiny"))
    ids, labels = built.make_batch(2, 8, torch.Generator().manual_seed(0))
    logits = built.forward(ids)
    assert logits.shape == (2, 8, built.vocab_size)
    loss = built.loss_fn(logits, labels)
    loss.backward()
    # A freshly initialised LM predicts roughly uniformly: loss close to ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(float(built.vocab_size))).item()) < 0.5
    assert all(p.grad is not None for p in built.module.parameters())


def test_learned_positions_shorter_than_the_sequence_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.seq_len \(128\).*model.overrides.max_seq_len"):
        build_model(ModelConfig(preset="tiny"), max_seq_len=128)
    # Rotary positions have no table, so any length builds.
    build_model(ModelConfig(preset="tiny", overrides={"position": "rotary"}), max_seq_len=4096)


# --- python factories ------------------------------------------------------------------------


@pytest.mark.parametrize("func", ["with_blocks", "as_pair", "as_triple"])
def test_python_factory_forms(factories, func):
    torch.manual_seed(0)
    built = build_model(_python(f"{factories}:{func}"))
    assert isinstance(built, BuiltModel)
    assert built.name == f"{factories}:{func}"
    assert [n for n, _ in built.blocks] == ["embed", "layers.0", "layers.1", "out"]
    assert built.vocab_size == 32
    ids, labels = built.make_batch(2, 5, torch.Generator().manual_seed(1))
    logits = built.forward(ids)
    assert logits.shape == (2, 5, 32)
    # The third element of the tuple replaces the default next-token cross entropy.
    expected = logits.float().mean() if func == "as_triple" else causal_lm_loss(logits, labels)
    assert torch.equal(built.loss_fn(logits, labels), expected)


@pytest.mark.parametrize(
    "factory, message",
    [
        ("mt_no_such_module_xyz:make", r"model.factory: cannot import module 'mt_no_such_module_xyz'.*PYTHONPATH"),
        ("{mod}:missing", r"model.factory: module '{mod}' has no 'missing'"),
        ("{mod}:not_a_function", r"model.factory: .* is a int, not a function"),
        ("{mod}:wrong_type", r"model.factory: .* returned int; return an nn.Module with .blocks"),
        ("{mod}:no_blocks", r"model.factory: .* without .blocks"),
        ("{mod}:foreign_block", r"model.factory: block 1 \(Linear\) is not a submodule"),
    ],
)
def test_bad_factories_say_what_to_fix(factories, factory, message):
    with pytest.raises(ValueError, match=message.format(mod=factories)):
        build_model(_python(factory.format(mod=factories)))


def test_factory_without_colon_is_rejected_by_the_config():
    with pytest.raises(ConfigError, match="model.factory: write 'package.module:function'"):
        _python("just_a_module")


# --- hf --------------------------------------------------------------------------------------


def test_hf_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    with pytest.raises(ValueError, match=r"pip install memtrain\[hf\]"):
        build_model(ModelConfig(source="hf", hf_config={"model_type": "llama"}))


TINY_LLAMA = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TINY_GPT2 = dict(model_type="gpt2", vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                 bos_token_id=0, eos_token_id=0)


def test_hf_llama_blocks_forward_and_loss():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    built = build_model(ModelConfig(source="hf", hf_config=dict(TINY_LLAMA, bos_token_id=0, eos_token_id=1)))
    assert built.name == "hf-llama"
    assert [n for n, _ in built.blocks] == ["model.embed_tokens", "model.layers.0", "model.layers.1", "lm_head"]
    assert built.vocab_size == 128
    ids, labels = built.make_batch(2, 16, torch.Generator().manual_seed(0))
    logits = built.forward(ids)
    assert logits.shape == (2, 16, 128)
    # The logits are the model's own (no extra processing in forward).
    assert torch.equal(logits, built.module(input_ids=ids, use_cache=False).logits)
    loss = built.loss_fn(logits, labels)
    assert torch.isfinite(loss)


def test_hf_gpt2_blocks_and_position_limit():
    pytest.importorskip("transformers")
    built = build_model(ModelConfig(source="hf", hf_config=TINY_GPT2))
    assert [n for n, _ in built.blocks] == ["transformer.wte", "transformer.h.0", "transformer.h.1",
                                             "transformer.h.2", "lm_head"]
    with pytest.raises(ConfigError, match=r"max_position_embeddings \(64\).*model.hf_config.max_position_embeddings"):
        build_model(ModelConfig(source="hf", hf_config=TINY_GPT2), max_seq_len=65)


def test_hf_unknown_model_type_is_a_config_error():
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="model.hf_config"):
        build_model(ModelConfig(source="hf", hf_config={"model_type": "no-such-model-type"}))


@pytest.mark.parametrize("hf_config, says", [
    ({"model_type": "llama", "hidden_size": -5}, "transformers rejected it"),  # huggingface_hub's validator
    ({"model_type": "gpt2", "n_embd": -5}, "cannot build 'gpt2'"),  # torch's negative dimension
    ({"model_type": "gpt2", "n_layer": "two"}, "model.hf_config"),
])
def test_hf_invalid_values_are_config_errors_naming_the_field(hf_config, says):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match=says) as e:
        build_model(ModelConfig(source="hf", hf_config=hf_config))
    assert str(e.value).startswith("model.hf_config:") and "\n" not in str(e.value)
