"""The ``parallel`` config section: degrees, schedule, micro-batches, partition, and the checks
that need the train section or the model."""

import pytest

from memtrain.config import PIPELINE_SCHEDULES, ConfigError, ParallelConfig, config_from_dict
from memtrain.planner.pipeline import SCHEDULES


def _cfg(parallel, **train):
    return config_from_dict({"train": {"global_batch_size": 8, **train}, "parallel": parallel})


def test_schedule_names_are_the_planners():
    assert PIPELINE_SCHEDULES == SCHEDULES


def test_defaults_are_one_process_1f1b():
    p = config_from_dict({}).parallel
    assert (p.pipeline, p.data, p.schedule, p.microbatches, p.partition, p.comm_timeout_s) == (1, 1, "1f1b", 0, None, 300.0)
    assert p.num_workers == 1 and p.num_stages == 1


@pytest.mark.parametrize("schedule,spr,stages", [("1f1b", 2, 4), ("gpipe", 3, 4), ("interleaved-1f1b", 3, 12),
                                                 ("v-half", 1, 8), ("v-min", 2, 8), ("zb-h1", 2, 4)])
def test_num_stages_follows_the_schedule(schedule, spr, stages):
    assert ParallelConfig(pipeline=4, schedule=schedule, stages_per_rank=spr).num_stages == stages


@pytest.mark.parametrize("parallel,field", [
    ({"pipeline": -1}, "parallel.pipeline"), ({"data": -1}, "parallel.data"), ({"pipeline": 1.5}, "parallel.pipeline"),
    ({"schedule": "1f2b"}, "parallel.schedule"), ({"microbatches": -2}, "parallel.microbatches"),
    ({"stages_per_rank": 0}, "parallel.stages_per_rank"), ({"comm_timeout_s": 0}, "parallel.comm_timeout_s"),
    ({"comm_timeout_s": "soon"}, "parallel.comm_timeout_s"), ({"partition": [2, 0], "pipeline": 2}, r"parallel.partition\[1\]"),
    ({"pipeline": 2, "partition": [1, 2, 3]}, "parallel.partition"), ({"bogus": 1}, "parallel.bogus"),
])
def test_bad_values_name_the_field(parallel, field):
    with pytest.raises(ConfigError, match=field):
        _cfg(parallel)


def test_partition_length_is_the_stage_count_of_the_schedule():
    assert _cfg({"pipeline": 2, "schedule": "v-half", "partition": [1, 1, 1, 1]}).parallel.partition == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match=r"parallel.partition: lists 2 stage\(s\).*has 4"):
        _cfg({"pipeline": 2, "schedule": "v-half", "partition": [2, 2]})


@pytest.mark.parametrize("parallel,train,field,fix", [
    ({"data": 3}, {}, "train.global_batch_size", "multiple of 3"),
    ({"pipeline": 2, "data": 2, "microbatches": 3}, {}, "parallel.microbatches", "choose a divisor"),
    ({"data": 2}, {"micro_batch_size": 8}, "train.micro_batch_size", "choose a divisor"),
    ({"pipeline": 2, "microbatches": 4}, {"micro_batch_size": 4}, "parallel.microbatches", "set one of them to 0"),
    ({"pipeline": 4, "schedule": "interleaved-1f1b", "microbatches": 2}, {}, "parallel.microbatches", "groups of"),
    ({"pipeline": 4, "schedule": "interleaved-1f1b"}, {"micro_batch_size": 4}, "parallel.microbatches", "groups of"),
])
def test_the_global_batch_must_split_over_the_workers(parallel, train, field, fix):
    with pytest.raises(ConfigError, match=field) as e:
        _cfg(parallel, **train)
    assert fix in str(e.value)


def test_batch_checks_leave_one_process_alone():
    # one worker: the single-process planner chooses the micro-batch; nothing splits
    assert _cfg({"microbatches": 3}).parallel.microbatches == 3
    assert _cfg({"pipeline": 2, "data": 2, "microbatches": 2}, micro_batch_size=2).parallel.num_workers == 4


def test_check_blocks_where_the_model_is_known():
    p = ParallelConfig(pipeline=6)
    p.check_blocks(6)
    with pytest.raises(ConfigError, match=r"parallel.pipeline: 6 rank.*gpt-tiny has 4 blocks.*at most 4"):
        p.check_blocks(4, "gpt-tiny")
    v = ParallelConfig(pipeline=3, schedule="v-min")
    with pytest.raises(ConfigError, match="at most 2"):
        v.check_blocks(5)
    with pytest.raises(ConfigError, match="parallel.partition: the block counts add up to 5.*add up to 6"):
        ParallelConfig(pipeline=2, partition=[2, 3]).check_blocks(6)


def test_auto_leaves_the_degrees_and_the_schedule_to_the_planner(tmp_path):
    from memtrain.runtime.config_file import load_config

    p = config_from_dict({"train": {"global_batch_size": 7}, "parallel": "auto"}).parallel
    assert (p.pipeline, p.data, p.schedule, p.planner_chooses) == (0, 0, "auto", True)
    assert not config_from_dict({}).parallel.planner_chooses  # no section: one device, as before
    assert not _cfg({"schedule": "auto"}).parallel.planner_chooses  # one worker has no schedule to choose
    assert _cfg({"pipeline": 2, "schedule": "auto"}).parallel.planner_chooses
    path = tmp_path / "c.yaml"
    path.write_text("parallel: auto\n")
    p = load_config(path, ["parallel.pipeline=4"]).parallel  # an override fixes one choice, the rest stay open
    assert (p.pipeline, p.data, p.schedule) == (4, 0, "auto")
    with pytest.raises(ConfigError, match="parallel.partition: fixes the blocks of each stage, so it needs a fixed"):
        _cfg({"pipeline": 0, "partition": [1, 1]})
    with pytest.raises(ConfigError, match="parallel.partition: fixes the blocks"):
        _cfg({"pipeline": 2, "schedule": "auto", "partition": [1, 1]})
    # a data degree of 0 leaves the batch's split to the planner; a fixed one is still checked
    assert _cfg({"data": 0, "microbatches": 3}).parallel.data == 0
    with pytest.raises(ConfigError, match="train.global_batch_size: 8 does not split over parallel.data 3"):
        _cfg({"pipeline": 0, "data": 3})


def test_zero_levels_and_what_they_do_not_combine_with():
    """parallel.zero: 0, 1 or 2; sharding needs more than one data-parallel copy (0 leaves the
    count to the planner); ZeRO-1 and ZeRO-2 both combine with memory.offload host or nvme
    (runtime.stage_offload_zero)."""
    assert _cfg({"pipeline": 2, "data": 2, "zero": 2}).parallel.zero == 2
    assert _cfg({"pipeline": 0, "data": 0, "zero": 2}).parallel.zero == 2
    with pytest.raises(ConfigError, match=r"parallel.zero: must be|parallel.zero: .*3"):
        _cfg({"pipeline": 2, "data": 2, "zero": 3})
    for zero in (1, 2):
        with pytest.raises(ConfigError, match=rf"^parallel.zero: {zero} shards the optimizer states across the "
                                              r"parallel.data copies, and there is one; set parallel.data to 2"):
            _cfg({"pipeline": 2, "zero": zero})
    for zero in (1, 2):
        for home in ("host", "nvme"):
            assert config_from_dict({"train": {"global_batch_size": 8}, "memory": {"offload": home},
                                     "parallel": {"pipeline": 2, "data": 2, "zero": zero}}).parallel.zero == zero
