import math

import numpy as np
import pytest
import torch

from memtrain.config import ConfigError, DataConfig
from memtrain.runtime.data import SYNTHETIC_BRANCHING, TokenBatches


def test_synthetic_batches_are_shifted_seeded_and_resumable():
    a = TokenBatches(DataConfig(seed=3), batch_size=4, seq_len=16, vocab_size=64)
    first = [next(a) for _ in range(3)]
    ids, labels = first[0]
    assert ids.shape == labels.shape == (4, 16)
    assert torch.equal(ids[:, 1:], labels[:, :-1])
    b = TokenBatches(DataConfig(seed=3), batch_size=4, seq_len=16, vocab_size=64)
    b.load_state_dict(a.state_dict())
    assert a.state_dict()["position"] == 3
    assert torch.equal(next(b)[0], next(a)[0])  # a resumed reader continues with the next batch
    c = TokenBatches(DataConfig(seed=4), batch_size=4, seq_len=16, vocab_size=64)
    assert not torch.equal(next(c)[0], first[0][0])


def test_synthetic_data_has_learnable_structure():
    data = TokenBatches(DataConfig(seed=0), batch_size=64, seq_len=32, vocab_size=128)
    ids, labels = next(data)
    pairs = {(int(x), int(y)) for x, y in zip(ids.flatten(), labels.flatten())}
    successors: dict[int, set] = {}
    for x, y in pairs:
        successors.setdefault(x, set()).add(y)
    assert max(len(s) for s in successors.values()) <= SYNTHETIC_BRANCHING
    assert math.log(SYNTHETIC_BRANCHING) < math.log(128)


def test_token_file(tmp_path):
    tokens = np.arange(1000, dtype=np.int64) % 50
    np.save(tmp_path / "t.npy", tokens)
    data = TokenBatches(DataConfig(source="tokens", path=str(tmp_path / "t.npy")), batch_size=2, seq_len=8, vocab_size=50)
    ids, labels = next(data)
    assert torch.equal((ids + 1) % 50, labels)


def test_token_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        TokenBatches(DataConfig(source="tokens", path=str(tmp_path / "none.npy")), batch_size=2, seq_len=8, vocab_size=50)
    np.save(tmp_path / "big.npy", np.arange(100, dtype=np.int64))
    with pytest.raises(ConfigError, match=r"big\.npy holds token id 99, outside the model's vocabulary \(ids 0 to 49\)"):
        TokenBatches(DataConfig(source="tokens", path=str(tmp_path / "big.npy")), batch_size=2, seq_len=8, vocab_size=50)


def _ids(n: int, vocab: int = 97) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * 7919) % vocab


def test_parquet_and_arrow_columns_read_as_the_same_token_stream(tmp_path):
    import pyarrow as pa
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    ids = _ids(600)
    np.save(tmp_path / "flat.npy", ids)
    docs = [ids[:150].tolist(), ids[150:420].tolist(), ids[420:].tolist()]  # documents of unequal length
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"input_ids": docs[:2], "text": ["a", "b"]}), tmp_path / "shards" / "part-0.parquet")
    pq.write_table(pa.table({"input_ids": docs[2:], "text": ["c"]}), tmp_path / "shards" / "part-1.parquet")
    feather.write_feather(pa.table({"ids": pa.array(ids, pa.int32())}), tmp_path / "flat.arrow")
    kw = dict(batch_size=3, seq_len=16, vocab_size=97)
    want = TokenBatches(DataConfig(source="tokens", path=str(tmp_path / "flat.npy"), seed=5), **kw)
    got = [TokenBatches(DataConfig(source="parquet", path=str(tmp_path / "shards"), seed=5), **kw),
           TokenBatches(DataConfig(source="arrow", path=str(tmp_path / "flat.arrow"), column="ids", seed=5), **kw)]
    for k in (0, 3, 11):
        for source in got:
            for a, b in zip(source.batch(k), want.batch(k)):
                assert torch.equal(a, b)


def test_parquet_and_arrow_errors_name_the_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input_ids": [[1, 2, 3] * 10], "text": ["x"]}), tmp_path / "d.parquet")
    kw = dict(batch_size=2, seq_len=8, vocab_size=97)
    with pytest.raises(ConfigError, match="data.column: 'tokens' is not a column of .*; its columns: input_ids, text"):
        TokenBatches(DataConfig(source="parquet", path=str(tmp_path / "d.parquet"), column="tokens"), **kw)
    with pytest.raises(ConfigError, match="data.column: 'text' .* holds string, not token ids"):
        TokenBatches(DataConfig(source="parquet", path=str(tmp_path / "d.parquet"), column="text"), **kw)
    with pytest.raises(ConfigError, match="is neither a Parquet file nor a folder"):
        TokenBatches(DataConfig(source="parquet", path=str(tmp_path / "empty")), **kw)
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        TokenBatches(DataConfig(source="parquet", path=str(tmp_path / "d.parquet")), batch_size=2, seq_len=8, vocab_size=3)
    (tmp_path / "x.arrow").write_bytes(b"not arrow")
    with pytest.raises(ConfigError, match="is not an Arrow IPC"):
        TokenBatches(DataConfig(source="arrow", path=str(tmp_path / "x.arrow")), **kw)
    with pytest.raises(ConfigError, match="data.path: set the file to read for data.source 'parquet'"):
        DataConfig(source="parquet")
