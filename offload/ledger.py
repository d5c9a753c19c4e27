"""The memory ledger: bytes in use per tier, by owner, with the peak and what made it.

docs/DESIGN.md rule 5 and docs/memory-accounting.md. Every allocation memtrain makes in a
tier (chunk, buffer, activation, staging) is recorded here under an owner name; exceeding the
tier's budget raises ``BudgetExceeded`` before the bytes are taken, never a silent overrun.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from memtrain.errors import UserError
from memtrain.units import format_bytes

__all__ = ["BudgetExceeded", "Ledger"]


class BudgetExceeded(UserError, MemoryError):
    """An allocation would take a tier past its budget."""


class Ledger:
    """Bytes in use in one tier (``device``, ``host`` or ``nvme``), by owner. Thread-safe."""

    def __init__(self, tier: str, budget_bytes: int | None = None) -> None:
        self.tier = tier
        self.budget_bytes = budget_bytes
        """None = unlimited."""
        self._lock = threading.Lock()
        self._owners: dict[str, int] = defaultdict(int)
        self._in_use = 0
        self._peak = 0
        self._peak_breakdown: dict[str, int] = {}
        self._window_peak = 0

    def alloc(self, owner: str, num_bytes: int) -> None:
        """Record ``num_bytes`` more under ``owner``; raise BudgetExceeded past the budget."""
        assert num_bytes >= 0, num_bytes
        with self._lock:
            new = self._in_use + num_bytes
            if self.budget_bytes is not None and new > self.budget_bytes:
                top = sorted(self._owners.items(), key=lambda kv: -kv[1])[:5]
                raise BudgetExceeded(
                    f"{self.tier} tier: allocating {format_bytes(num_bytes)} for {owner} would use "
                    f"{format_bytes(new)} of a {format_bytes(self.budget_bytes)} budget; largest owners: "
                    + ", ".join(f"{o}={format_bytes(b)}" for o, b in top)
                )
            self._owners[owner] += num_bytes
            self._in_use = new
            if new > self._peak:
                self._peak = new
                self._peak_breakdown = dict(self._owners)
            if new > self._window_peak:
                self._window_peak = new

    def free(self, owner: str, num_bytes: int | None = None) -> int:
        """Release ``num_bytes`` of ``owner`` (all of them if None); returns bytes released."""
        with self._lock:
            held = self._owners.get(owner, 0)
            n = held if num_bytes is None else num_bytes
            assert 0 <= n <= held, f"{self.tier}: freeing {n} bytes of {owner}, which holds {held}"
            if n == held:
                self._owners.pop(owner, None)
            else:
                self._owners[owner] = held - n
            self._in_use -= n
            return n

    def holds(self, owner: str) -> int:
        with self._lock:
            return self._owners.get(owner, 0)

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    @property
    def peak_bytes(self) -> int:
        return self._peak

    def by_owner(self) -> dict[str, int]:
        with self._lock:
            return dict(self._owners)

    def peak_breakdown(self, group: bool = True) -> dict[str, int]:
        """Owners at the peak; with ``group``, summed by kind (the part before the first ':')."""
        with self._lock:
            items = dict(self._peak_breakdown)
        if not group:
            return items
        out: dict[str, int] = defaultdict(int)
        for owner, b in items.items():
            out[owner.split(":", 1)[0]] += b
        return dict(out)

    @property
    def window_peak_bytes(self) -> int:
        """Peak since the last ``start_window()`` (e.g. this training step's peak)."""
        return self._window_peak

    def start_window(self) -> None:
        """Start a new window for ``window_peak_bytes``; the overall peak is kept."""
        with self._lock:
            self._window_peak = self._in_use

    def reset_peak(self) -> None:
        """Start a new peak window (e.g. per step) from the bytes in use now."""
        with self._lock:
            self._peak = self._in_use
            self._peak_breakdown = dict(self._owners)
