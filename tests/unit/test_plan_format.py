import pytest

from memtrain.planner.plan import Action, Op, PlanFormatError, schedule_from_csv, schedule_to_csv


@pytest.mark.parametrize("text", ["0F3", "1B0", "0PREFETCH@c5", "0OFFLOAD@c12", "0OPTIM", "2SEND_F7", "0SWAP_OUT4@c1"])
def test_action_string_round_trip(text):
    assert str(Action.parse(text)) == text


def test_action_fields():
    a = Action.parse("3RECV_B11")
    assert (a.stage, a.op, a.microbatch, a.chunk) == (3, Op.RECV_B, 11, None)
    assert Action.parse("0PREFETCH@c5") == Action(0, Op.PREFETCH, None, 5)


@pytest.mark.parametrize("bad", ["F3", "0X3", "", "0F3@5"])
def test_bad_actions_rejected(bad):
    with pytest.raises(PlanFormatError):
        Action.parse(bad)


def test_schedule_csv_round_trip():
    sched = {0: (Action(0, Op.F, 0), Action(0, Op.B, 0), Action(0, Op.OPTIM)), 1: (Action(1, Op.RECV_F, 0),)}
    assert schedule_from_csv(schedule_to_csv(sched)) == sched
