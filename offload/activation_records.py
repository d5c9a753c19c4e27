"""The records an ``ActivationManager`` holds and the I/O they have in flight
(``offload.activations.ActivationManager`` inherits it): the live records by block and
micro-batch, those on their way back, the NVMe writes staged in order and the deletes started.
Kept apart from the policies' forward and the program's swap actions, which only decide what
these carry: here is what is alive, and waiting for it (offload.activations [Note: bounded NVMe
writes]; offload.swap [Note: swap files deleted in the background])."""

from __future__ import annotations

import threading
import warnings

from memtrain.offload.swap import _Record, _State
from memtrain.planner.plan import ActPolicy

__all__ = ["ActivationRecords"]


class ActivationRecords:
    """The record book of ``ActivationManager``; the records (offload.swap ``_Record``) call back
    into it as they are kept, moved, written and released. Uses the manager's ``nvme`` store."""

    def _init_records(self) -> None:
        self._records: dict[tuple[int, int], _Record] = {}
        """Records with saved activations alive, by (block index, micro-batch)."""
        self._inbound: set[_Record] = set()
        """Records on their way back (NVMe read or host -> device copy in flight)."""
        self._staged: list[_Record] = []
        """swap_nvme records whose write has not been waited for, in the order they were staged."""
        # Reentrant: a saved tensor's release (a __del__) may run inside a garbage collection
        # triggered while this thread already holds the lock.
        self._lock = threading.RLock()
        self._key_serial = 0
        self._deletes: list = []
        """(future, record) of the NVMe deletes started and not yet waited for (memtrain.offload.swap [Note: swap files
        deleted in the background])."""

    def _swapped_record(self, block: int, mb: int) -> _Record | None:
        with self._lock:
            rec = self._records.get((block, mb))
        return rec if rec is not None and rec.policy in (ActPolicy.SWAP_HOST, ActPolicy.SWAP_NVME) else None

    # --- polling -------------------------------------------------------------------------

    def _advance_inbound(self) -> None:
        """Move prefetched records along (their NVMe read or host copy may have finished)."""
        if not self._inbound:
            return
        with self._lock:
            inbound = list(self._inbound)
        for rec in inbound:
            rec.advance_in(consumer=False)
            if rec.state not in (_State.READING, _State.COPY_IN):
                with self._lock:
                    self._inbound.discard(rec)

    def _poll(self) -> None:
        """Advance records whose copies or I/O finished (cheap; called at block boundaries)."""
        for rec in self._live_records():
            rec.finish_copy_out(wait=False)
            rec.advance_in(consumer=False)

    def _wait_writes(self, keep: int) -> None:
        """Wait, in staging order, for the oldest NVMe writes until ``keep`` are left staged."""
        with self._lock:
            n = max(0, len(self._staged) - keep)
            ready, self._staged = self._staged[:n], self._staged[n:]
        for r in ready:
            r.wait_write()

    # --- bookkeeping ---------------------------------------------------------------------

    def _deleting(self, fut, what: str) -> None:
        with self._lock:
            self._deletes.append((fut, what))

    def _wait_deletes(self) -> None:
        """Wait for the deletes started; warn of those that failed ([Note: swap I/O failures]:
        the data was no longer needed; the file stays on the store's ledger until its close())."""
        with self._lock:
            pending, self._deletes = self._deletes, []
        for fut, what in pending:
            error = fut.exception()  # waits
            if error is not None:
                warnings.warn(f"{what}: {error}; the NVMe store's close() removes the file", stacklevel=3)

    def _remember(self, rec: _Record) -> None:
        with self._lock:
            self._records[(rec.index, rec.mb)] = rec

    def _forget(self, rec: _Record) -> None:
        with self._lock:
            if self._records.get((rec.index, rec.mb)) is rec:
                del self._records[(rec.index, rec.mb)]
            self._inbound.discard(rec)
            if rec in self._staged:
                self._staged.remove(rec)
            rested = not self._records
        if rested:  # the last record of the backward: nothing swapped is left, on disk either
            self._wait_deletes()

    def _live_records(self) -> list[_Record]:
        with self._lock:
            return list(self._records.values())

    def _nvme_key(self, owner: str) -> str:
        # The owner name is the key (the nvme ledger then speaks the same vocabulary); a second
        # record of the same block and micro-batch alive at once gets a distinct key.
        with self._lock:
            if owner not in self.nvme:
                return owner
            self._key_serial += 1
            return f"{owner}#{self._key_serial}"

