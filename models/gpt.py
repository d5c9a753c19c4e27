"""The built-in decoder-only transformer family ``gpt``.

GPT-2/3 style (learned positions, LayerNorm, GELU, tied embeddings, biases) and Llama style
(rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases) are the two ends of
one config. The model is a sequence of **blocks** — embedding, each layer, head — applied in
order; blocks are the unit of partitioning and activation policy (docs/DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memtrain.units import show
from memtrain.config import ConfigError

__all__ = ["GPTConfig", "GPT", "PRESETS", "gpt_config", "gpt_num_params", "causal_lm_loss"]


@dataclass(kw_only=True, slots=True)
class GPTConfig:
    vocab_size: int = 50304
    """Vocabulary size (GPT-2's 50257 padded to a multiple of 64)."""
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None = num_heads (multi-head)."""
    ffn_hidden_size: int | None = None
    """MLP inner size; None = 4*hidden (gelu) or 8/3*hidden rounded up to 256 (swiglu)."""
    max_seq_len: int = 1024
    """Longest sequence (size of the learned position table)."""
    position: str = "learned"
    """``learned`` (GPT-2) or ``rotary`` (RoPE, Su et al. 2021)."""
    norm: str = "layernorm"
    """``layernorm`` or ``rmsnorm``."""
    activation: str = "gelu"
    """``gelu`` or ``swiglu`` (Shazeer 2020)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    bias: bool = True
    """Biases in linear layers and LayerNorm."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches."""
    fused_attention: bool = True
    """Use ``F.scaled_dot_product_attention``; False computes softmax(QK^T)V explicitly."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        # Field names are those of the config's model.overrides, where a user sets them.
        for name in ("vocab_size", "num_layers", "hidden_size", "num_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.overrides.{name}: must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.overrides.hidden_size: {self.hidden_size} must be divisible by "
                              f"num_heads ({self.num_heads})")
        kv = self.kv_heads
        if kv < 1 or self.num_heads % kv:
            raise ConfigError(f"model.overrides.num_kv_heads: {kv} must divide num_heads ({self.num_heads})")
        if self.position not in ("learned", "rotary"):
            raise ConfigError(f"model.overrides.position: must be 'learned' or 'rotary', got {show(self.position)}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"model.overrides.norm: must be 'layernorm' or 'rmsnorm', got {show(self.norm)}")
        if self.activation not in ("gelu", "swiglu"):
            raise ConfigError(f"model.overrides.activation: must be 'gelu' or 'swiglu', got {show(self.activation)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.overrides.dropout: must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"model.overrides.{name}: must be a finite number > 0, got {value}")
        if self.position == "rotary" and self.head_dim % 2:
            raise ConfigError(f"model.overrides.hidden_size: rotary positions need an even head size "
                              f"(hidden_size / num_heads), got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return 256 * math.ceil(8 * self.hidden_size / 3 / 256)
        return 4 * self.hidden_size


_GPT3 = dict(position="learned", norm="layernorm", activation="gelu", tie_embeddings=True, bias=True, max_seq_len=2048)
_LLAMA = dict(position="rotary", norm="rmsnorm", activation="swiglu", tie_embeddings=False, bias=False,
              vocab_size=32000, max_seq_len=4096, norm_eps=1e-6)

PRESETS: dict[str, dict] = {
    # trains on a CPU in seconds
    "tiny": dict(vocab_size=256, num_layers=2, hidden_size=64, num_heads=4, max_seq_len=64),
    # ~98M parameters, GPT-2 shapes with a 16k vocabulary
    "100m": dict(vocab_size=16384, num_layers=12, hidden_size=768, num_heads=12, max_seq_len=512),
    # GPT-3 family (Brown et al. 2020, Table 2.1); head size 128 from 1.3B up
    "125m": dict(_GPT3, num_layers=12, hidden_size=768, num_heads=12),
    "350m": dict(_GPT3, num_layers=24, hidden_size=1024, num_heads=16),
    "760m": dict(_GPT3, num_layers=24, hidden_size=1536, num_heads=16),
    "1.3b": dict(_GPT3, num_layers=24, hidden_size=2048, num_heads=16),
    "2.7b": dict(_GPT3, num_layers=32, hidden_size=2560, num_heads=20),
    "6.7b": dict(_GPT3, num_layers=32, hidden_size=4096, num_heads=32),
    "13b": dict(_GPT3, num_layers=40, hidden_size=5120, num_heads=40),
    "175b": dict(_GPT3, num_layers=96, hidden_size=12288, num_heads=96),
    # Llama 2 family (Touvron et al. 2023)
    "llama-7b": dict(_LLAMA, num_layers=32, hidden_size=4096, num_heads=32, ffn_hidden_size=11008),
    "llama-13b": dict(_LLAMA, num_layers=40, hidden_size=5120, num_heads=40, ffn_hidden_size=13824),
    "llama-70b": dict(_LLAMA, num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, ffn_hidden_size=28672),
}
# Aliases people type.
PRESETS["1b"] = PRESETS["1.3b"]
PRESETS["70b"] = PRESETS["llama-70b"]


MAX_NUM_LAYERS = 256
"""Layers an override may ask for at most: the deepest presets have 96, the deepest published
transformers about 128, and planning time grows faster than linearly in the layers."""
MAX_DIM = 1 << 24
"""Any other whole-number override at most (sizes, heads, vocabulary, sequence length)."""


def _check_overrides(overrides: dict) -> None:
    """Refuse an override whose type is not its GPTConfig field's (``"2"`` for num_layers, ``abc``
    for hidden_size), or a whole number out of range, naming ``model.overrides.<field>``."""
    hints = typing.get_type_hints(GPTConfig)
    for name, value in overrides.items():
        where = f"model.overrides.{name}"
        args = typing.get_args(hints[name])
        if value is None and type(None) in args:
            continue
        kind = next((a for a in args if a is not type(None)), hints[name])
        if kind is bool:
            ok, want = isinstance(value, bool), "true or false"
        elif kind is int:
            top = MAX_NUM_LAYERS if name == "num_layers" else MAX_DIM
            ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top
            want = f"a whole number from 1 to {top}" + (" (or null for the default)" if type(None) in args else "")
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        else:
            ok, want = isinstance(value, str), "text"
        if not ok:
            raise ConfigError(f"{where}: must be {want}, got {show(value)}")


def gpt_config(preset: str = "tiny", **overrides) -> GPTConfig:
    """The preset's GPTConfig with ``overrides`` (model.overrides) in place of its fields."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {show(preset)}; choose one of {', '.join(sorted(PRESETS))}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise ConfigError(f"model.overrides.{unknown[0][:60]}: unknown field; known: {', '.join(sorted(fields))}")
    _check_overrides(overrides)
    return GPTConfig(**{**PRESETS[preset], **overrides})


def gpt_num_params(cfg: GPTConfig) -> int:
    """Closed-form parameter count of ``GPT(cfg)``.

    Per layer: attention h·(h + 2·h_kv) + h·h weights (+ h + 2·h_kv + h biases), MLP
    2·h·f (gelu) or 3·h·f (swiglu) weights (+ f + h biases for gelu), two norms of h
    (+h each for LayerNorm bias). With GPT-3 shapes this is Narayanan et al. 2021's
    12·l·h²(1 + 13/(12h) + (V+s)/(12lh)).
    """
    h, f, v, l = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size, cfg.num_layers
    h_kv = cfg.kv_heads * cfg.head_dim
    b = 1 if cfg.bias else 0
    attn = h * (h + 2 * h_kv) + h * h + b * (h + 2 * h_kv + h)
    if cfg.activation == "swiglu":
        mlp = 3 * h * f + b * (2 * f + h)
    else:
        mlp = 2 * h * f + b * (f + h)
    norm = h + (h if cfg.norm == "layernorm" and cfg.bias else 0)
    per_layer = attn + mlp + 2 * norm
    embed = v * h + (cfg.max_seq_len * h if cfg.position == "learned" else 0)
    head = norm + (0 if cfg.tie_embeddings else v * h + b * v)
    return embed + l * per_layer + head


class RMSNorm(nn.Module):
    """Zhang & Sennrich 2019."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.bias)


def _rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Apply rotary position embedding to (b, heads, s, d)."""
    s, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(s, device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Embedding(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.hidden_size) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(input_ids.shape[-1], device=input_ids.device))
        return self.drop(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kv = cfg.kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, cfg.hidden_size + 2 * kv, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.bias)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, s, h = x.shape
        kv = cfg.kv_heads * cfg.head_dim
        q, k, v = self.qkv(x).split((h, kv, kv), dim=-1)
        q = q.view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.position == "rotary":
            q, k = _rotate(q, cfg.rope_theta), _rotate(k, cfg.rope_theta)
        if cfg.kv_heads != cfg.num_heads:
            rep = cfg.num_heads // cfg.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if cfg.fused_attention:
            p = cfg.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            # Explicit attention: the form Korthikanti et al. 2022 count activations for.
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(cfg.head_dim))
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            probs = self.attn_drop(scores.masked_fill(mask, float("-inf")).softmax(dim=-1))
            y = probs @ v
        y = y.transpose(1, 2).reshape(b, s, h)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        f = cfg.ffn_size
        self.fc = nn.Linear(cfg.hidden_size, 2 * f if self.swiglu else f, bias=cfg.bias)
        self.proj = nn.Linear(f, cfg.hidden_size, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.drop(self.proj(F.silu(gate) * up))
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Layer(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    def __init__(self, cfg: GPTConfig, embedding: Embedding) -> None:
        super().__init__()
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.bias and not cfg.tie_embeddings)
        if cfg.tie_embeddings:
            self.lm_head.weight = embedding.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


class GPT(nn.Module):
    """``forward(input_ids) -> logits`` as ``blocks[-1](...blocks[0](input_ids))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        embedding = Embedding(cfg)
        self.blocks = nn.ModuleList([embedding, *(Layer(cfg) for _ in range(cfg.num_layers)), Head(cfg, embedding)])
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = input_ids
        for block in self.blocks:
            x = block(x)
        return x


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; ``labels`` are already shifted (labels[t] = ids[t+1])."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
