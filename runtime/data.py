"""Training data: seeded synthetic token walks, a flat file of token ids, or a column of token ids
in Parquet or Arrow files, with a resumable position.

A batch is ``(input_ids, labels)`` of shape (batch, seq_len) with ``labels[t] = ids[t+1]``.
``state_dict()`` / ``load_state_dict()`` carry the position so a resumed run continues with the
next batch it would have seen. Every source but ``synthetic`` is one stream of token ids (a
Parquet or Arrow column's rows joined end to end) from which batch ``k`` takes windows at
positions drawn from (seed, ``k``): any process reads the same batch for the same step.
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
        elif cfg.source in ("parquet", "arrow"):
            self._tokens = self._checked(Path(cfg.path), _read_column(Path(cfg.path), cfg.source, cfg.column))

    def _open(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise ConfigError(f"data.path: {str(path)!r} does not exist; point it at a .npy or .bin file of token ids")
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
        else:
            tokens = np.memmap(path, dtype=np.uint16, mode="r")  # nanoGPT-style .bin of uint16 ids
        return self._checked(path, tokens)

    def _checked(self, path: Path, tokens: np.ndarray) -> np.ndarray:
        if tokens.ndim != 1 or tokens.size < self.seq_len + 1:
            raise ConfigError(f"data.path: {path} must hold a flat array of at least seq_len+1 = {self.seq_len + 1} token ids")
        if tokens.dtype.kind == "i" and int(tokens.min()) < 0:
            raise ConfigError(f"data.path: {path} holds a negative token id ({int(tokens.min())}); token ids are >= 0")
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


def _read_column(path: Path, source: str, column: str) -> np.ndarray:
    """``column`` of the Parquet file or folder (files in name order) or Arrow IPC file at
    ``path``, as one flat array of token ids (list cells joined end to end)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if source == "parquet":
        import pyarrow.parquet as pq

        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files or not files[0].is_file():
            raise ConfigError(f"data.path: {str(path)!r} is neither a Parquet file nor a folder holding *.parquet files")
        schema = pq.read_schema(files[0])
        read = [lambda f=f: pq.read_table(f, columns=[column]) for f in files]
    else:
        import pyarrow.feather as feather

        if not path.is_file():
            raise ConfigError(f"data.path: {str(path)!r} does not exist; point it at an Arrow IPC (Feather) file")
        try:
            table = feather.read_table(path, memory_map=True)
        except pa.ArrowInvalid as e:
            raise ConfigError(f"data.path: {path} is not an Arrow IPC (Feather) file ({e})") from None
        schema = table.schema
        read = [lambda: table.select([column])]
    if column not in schema.names:
        raise ConfigError(f"data.column: {column!r} is not a column of {path}; its columns: {', '.join(schema.names)}")
    kind = schema.field(column).type
    inner = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else kind
    if not pa.types.is_integer(inner):
        raise ConfigError(f"data.column: {column!r} of {path} holds {kind}, not token ids; give a column of integer "
                          "ids or lists of them (tokenize the text first)")
    parts = []
    for load in read:
        col = load().column(column)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            col = pc.list_flatten(col)
        parts.append(col.to_numpy().astype(np.int64, copy=False))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
