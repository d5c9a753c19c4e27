"""planner.hetero [Note: a simulated rank over its budget]: a candidate whose simulation takes a
rank past its device budget (the boundary tensors it receives and sends, which the stage
estimates leave out) is partitioned once more with that rank's budget less the excess."""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrain.planner import hetero
from memtrain.runtime.config_file import load_config
from memtrain.runtime.planning import plan_config

MIXED = Path(__file__).resolve().parents[2] / "examples" / "mixed-a100-4090.yaml"
FIXED = ["parallel.pipeline=8", "parallel.data=2", "parallel.schedule=1f1b", "parallel.microbatches=16"]


def test_a_rank_over_its_budget_is_partitioned_again_and_the_plan_fits(monkeypatch) -> None:
    calls = []
    real = hetero._tighter

    def spy(cand, sim, cluster):
        again = real(cand, sim, cluster)
        calls.append((sim, again))
        return again

    monkeypatch.setattr(hetero, "_tighter", spy)
    plan = plan_config(load_config(MIXED, FIXED))
    redone = [(sim, again) for sim, again in calls if again is not None]
    assert redone, "no candidate of this shape went over and fitted again: the case no longer exercises it"
    sim, again = redone[0]
    budgets = [r[4].device for r in sim.cand.ranks]
    assert any(need > have for need, have in zip(sim.device_bytes, budgets))  # over, by its boundary tensors
    over = [r for r, (need, have) in enumerate(zip(sim.device_bytes, budgets)) if need > have]
    # partitioned again for the tighter budget (fewer blocks there, or a stage that recomputes or offloads)
    assert again.fits and (again.cand.partition, again.estimates) != (sim.cand.partition, sim.estimates)
    assert all(need <= have for need, have in zip(again.device_bytes, budgets))
    assert all(again.device_bytes[r] < sim.device_bytes[r] for r in over)
    assert all(d.peak_bytes["device"] <= d.budget_bytes["device"] for d in plan.prediction.devices)


def test_without_the_second_partition_the_fixed_shape_does_not_fit(monkeypatch) -> None:
    from memtrain.errors import UserError

    monkeypatch.setattr(hetero, "_tighter", lambda cand, sim, cluster: None)
    with pytest.raises(UserError):
        plan_config(load_config(MIXED, FIXED))
