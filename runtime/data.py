"""Training data: seeded synthetic token walks or a flat file of token ids, with a resumable position.

A batch is ``(input_ids, labels)`` of shape (batch, seq_len) with ``labels[t] = ids[t+1]``.
``state_dict()`` / ``load_state_dict()`` carry the position so a resumed run continues with the
next batch it would have seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from memtrain.config import ConfigError, DataConfig

__all__ = ["TokenBatches", "SYNTHETIC_BRANCHING"]

SYNTHETIC_BRANCHING = 4
"""Successors per token in the synthetic Markov chain (loss floor ln 4 ≈ 1.39)."""


class TokenBatches:
    def __init__(self, cfg: DataConfig, *, batch_size: int, seq_len: int, vocab_size: int) -> None:
        self.cfg = cfg
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.position = 0
        """Batches produced so far."""
        self._tokens: np.ndarray | None = None
        self._successors: torch.Tensor | None = None
        if cfg.source == "tokens":
            self._tokens = self._open(Path(cfg.path))

    def _open(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise ConfigError(f"data.path: {str(path)!r} does not exist; point it at a .npy or .bin file of token ids")
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
        else:
            tokens = np.memmap(path, dtype=np.uint16, mode="r")  # nanoGPT-style .bin of uint16 ids
        if tokens.ndim != 1 or tokens.size < self.seq_len + 1:
            raise ConfigError(f"data.path: {path} must hold a flat array of at least seq_len+1 = {self.seq_len + 1} token ids")
        if int(tokens.max()) >= self.vocab_size:
            raise ConfigError(f"data.path: {path} holds token id {int(tokens.max())}, outside the model's vocabulary "
                              f"(ids 0 to {self.vocab_size - 1}); tokenize for this model or raise its vocab_size")
        return tokens

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch(self.position)
        self.position += 1
        return batch

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``index``-th batch; a pure function of (seed, index), so resuming is exact."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + index)
        if self._tokens is None:
            seq = self._synthetic(g)
        else:
            n = self._tokens.size - self.seq_len - 1
            starts = torch.randint(0, n + 1, (self.batch_size,), generator=g).tolist()
            seq = torch.from_numpy(np.stack([np.asarray(self._tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts]))
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    def _synthetic(self, g: torch.Generator) -> torch.Tensor:
        """Walks of a fixed sparse Markov chain: each token has ``SYNTHETIC_BRANCHING`` possible
        successors drawn once from the data seed. The data has structure a model can learn (the
        loss can fall from ln(vocab) towards ln(branching)), so a run shows learning."""
        if self._successors is None:
            table_gen = torch.Generator().manual_seed(self.cfg.seed)
            self._successors = torch.randint(0, self.vocab_size, (self.vocab_size, SYNTHETIC_BRANCHING), generator=table_gen)
        b, n = self.batch_size, self.seq_len + 1
        choice = torch.randint(0, SYNTHETIC_BRANCHING, (b, n), generator=g)
        seq = torch.empty(b, n, dtype=torch.long)
        seq[:, 0] = torch.randint(0, self.vocab_size, (b,), generator=g)
        for t in range(1, n):
            seq[:, t] = self._successors[seq[:, t - 1], choice[:, t]]
        return seq

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.cfg.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
