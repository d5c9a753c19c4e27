import threading

import pytest

from memtrain.offload.ledger import BudgetExceeded, Ledger


def test_alloc_free_peak_and_breakdown():
    led = Ledger("device", 1000)
    led.alloc("chunk:0", 400)
    led.alloc("act:blocks.1:0", 300)
    led.free("act:blocks.1:0")
    led.alloc("buffer:param:3", 500)
    assert led.in_use_bytes == 900 and led.peak_bytes == 900
    assert led.peak_breakdown() == {"chunk": 400, "buffer": 500}
    assert led.peak_breakdown(group=False) == {"chunk:0": 400, "buffer:param:3": 500}
    assert led.free("buffer:param:3", 200) == 200 and led.holds("buffer:param:3") == 300


def test_budget_is_never_overrun():
    led = Ledger("device", 1000)
    led.alloc("chunk:0", 900)
    with pytest.raises(BudgetExceeded, match="device tier.*chunk:1.*chunk:0"):
        led.alloc("chunk:1", 101)
    assert led.in_use_bytes == 900 and led.peak_bytes == 900  # nothing was taken


def test_window_peak_is_per_step_while_overall_peak_stays():
    led = Ledger("host")
    led.alloc("a", 500)
    led.free("a")
    led.start_window()
    led.alloc("b", 200)
    assert led.window_peak_bytes == 200 and led.peak_bytes == 500
    led.start_window()
    assert led.window_peak_bytes == 200  # starts from the bytes in use now
    led.free("b")
    assert led.window_peak_bytes == 200


def test_thread_safety():
    led = Ledger("host")

    def work(i):
        for _ in range(1000):
            led.alloc(f"o{i}", 3)
            led.free(f"o{i}", 3)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert led.in_use_bytes == 0 and 3 <= led.peak_bytes <= 12
