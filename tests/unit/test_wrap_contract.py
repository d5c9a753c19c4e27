"""wrap()'s contract: docs/wrap.md runs as written, its memory keys are a config file's
``memory`` section plus ``nvme_path`` (read by the same code), and the planner honours them."""

import re
from pathlib import Path

import pytest
import torch

from memtrain.errors import UserError
from memtrain.models.gpt import GPT, gpt_config
from memtrain.planner.plan import Tier
from memtrain.runtime import wrap
from memtrain.runtime.config_file import load_config
from memtrain.runtime.planning import plan_from_config
from memtrain.runtime.wrapping import WRAP_MEMORY_KEYS

DOC = Path(__file__).resolve().parents[2] / "docs" / "wrap.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks(DOC.read_text()))))
def test_every_python_block_of_the_wrap_page_runs(index, capsys):
    exec(compile(_python_blocks(DOC.read_text())[index], f"docs/wrap.md block {index}", "exec"), {})
    assert capsys.readouterr().out.strip()  # each block prints what it trained


def test_the_page_documents_every_memory_key():
    rows = {m.group(1) for m in re.finditer(r"^\| `(\w+)` \|", DOC.read_text(), flags=re.M)}
    assert set(WRAP_MEMORY_KEYS) <= rows


def _tiny():
    torch.manual_seed(0)
    return GPT(gpt_config("tiny"))


def test_the_plan_is_made_from_the_first_batch():
    engine = wrap(_tiny(), optimizer="adamw", memory={"device": "2MiB", "host": "64MiB"}, verbose=False)
    assert engine.plan is None
    with pytest.raises(UserError, match="first batch"):
        engine.memory_report()
    ids = torch.randint(0, 256, (4, 32))
    engine.train_step((ids, ids))
    assert engine.plan.train.seq_len == 32 and engine.plan.train.global_batch_size == 4
    assert engine.micro_batch_size == engine.plan.train.micro_batch_size
    assert {str(c.home) for c in engine.store.chunks} != {"device"}  # 1 MiB cannot hold the states
    engine.close()


def test_chunk_elems_and_prefetch_depth_are_honoured_by_the_planner():
    model = _tiny()
    free = wrap(model, optimizer="adamw", memory={"device": "2MiB", "host": "64MiB"}, seq_len=32,
                global_batch_size=4, verbose=False)
    chosen = free.plan.memory
    free.close()
    size = 9_000
    depth = max(chosen.prefetch_depth, 1) + 2
    engine = wrap(model, optimizer="adamw", verbose=False, seq_len=32, global_batch_size=4,
                  memory={"device": "2MiB", "host": "64MiB", "chunk_elems": size, "prefetch_depth": depth})
    policy = engine.plan.memory
    assert policy.chunk_size_elems == size != chosen.chunk_size_elems
    biggest_param = max(p.numel() for p in model.parameters())
    assert all(c.num_elems <= max(size, biggest_param) for c in policy.chunks)
    assert policy.prefetch_depth == depth == engine.store.prefetch_depth
    engine.close()


def test_a_config_files_memory_section_fixes_the_same_choices(tmp_path):
    cfg = load_config(None, ["model.preset=tiny", "train.seq_len=32", "train.global_batch_size=4",
                             "memory.device=2MiB", "memory.host=64MiB", "memory.chunk_elems=9000",
                             "memory.prefetch_depth=8", f"run_dir={tmp_path}"])
    plan = plan_from_config(cfg)
    assert plan.memory.chunk_size_elems == 9000 and plan.memory.prefetch_depth == 8


def test_a_depth_below_what_a_block_needs_says_which_setting_to_drop():
    with pytest.raises(UserError, match=r"memory.chunk_elems = 3000 and memory.prefetch_depth = 1.*unset them"):
        wrap(_tiny(), optimizer="adamw", memory={"device": "2MiB", "host": "64MiB", "chunk_elems": 3000,
                                                 "prefetch_depth": 1},
             seq_len=32, global_batch_size=4, verbose=False)


@pytest.mark.parametrize("memory, match", [
    ({"nvme": "/scratch/memtrain"}, r"memory\['nvme'\]: '/scratch/memtrain' is a path.*memory\['nvme_path'\]"),
    ({"nvme_budget": "1GiB"}, r"memory\['nvme_budget'\]: the NVMe budget is memory\['nvme'\]"),
    ({"nvme": "1GiB"}, r"memory\['nvme'\]: an NVMe budget without a directory"),
    ({"nvme_path": "/no/such/parent/memtrain"}, r"memory\['nvme_path'\]: the parent of '/no/such/parent/memtrain'"),
    ({"device": float("inf")}, r"memory.device: "),
    ({"chunk_elems": 0}, r"memory.chunk_elems: must be a whole number from 1"),
    ({"prefetch_depth": 2.5}, r"memory.prefetch_depth: "),
    ({"devices": "1GiB"}, r"memory\['devices'\]: unknown key; known keys: device, host, nvme, .*nvme_path"),
    ("8GiB", r"memory: a mapping of device, host"),
])
def test_bad_memory_is_refused_naming_the_key(memory, match):
    with pytest.raises(UserError, match=match):
        wrap(_tiny(), optimizer="adamw", memory=memory, verbose=False)


def test_wrap_reads_sizes_and_messages_as_a_config_file_does(tmp_path):
    for value, text in (("2 bananas", "2 bananas"), (-1, "-1"), (float("nan"), ".nan"), (True, "true")):
        with pytest.raises(UserError) as from_wrap:
            wrap(_tiny(), optimizer="adamw", memory={"host": value}, verbose=False)
        with pytest.raises(UserError) as from_config:
            load_config(None, [f"memory.host={text}"])
        assert str(from_wrap.value) == str(from_config.value)


def test_seq_len_without_global_batch_size_is_refused():
    with pytest.raises(UserError, match="both seq_len= and global_batch_size="):
        wrap(_tiny(), optimizer="adamw", memory={"device": "64MiB"}, seq_len=32, verbose=False)


def test_a_given_plan_with_another_chunk_size_is_refused():
    engine = wrap(_tiny(), optimizer="adamw", memory={"device": "2MiB", "host": "64MiB"}, seq_len=32,
                  global_batch_size=4, verbose=False)
    plan = engine.plan
    engine.close()
    assert Tier.HOST in {c.home for c in plan.memory.chunks}
    with pytest.raises(UserError, match="memory.chunk_elems: 7 but the plan given packs chunks of"):
        wrap(_tiny(), optimizer="adamw", plan=plan, memory={"device": "2MiB", "host": "64MiB", "chunk_elems": 7},
             verbose=False)


def test_memory_offload_and_activations_fix_the_plans_choices():
    engine = wrap(_tiny(), optimizer="adamw", memory={"offload": "host", "activations": "recompute"}, seq_len=32,
                  global_batch_size=4, verbose=False)
    assert {str(c.home) for c in engine.plan.memory.chunks} == {"host"}  # plenty of device memory: auto keeps them there
    assert {str(a) for a in engine.plan.memory.activations} == {"recompute"}
    engine.close()
