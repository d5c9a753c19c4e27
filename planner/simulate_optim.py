"""The optimizer's side of a simulated step (planner.simulate_builder): gradients flushed into the home
accumulators, the early updates of host and NVMe chunks during the last backward, their states
read ahead, staged and written back (carried into the next step), and the final update.

``_OptimizerSteps`` is a part of ``simulate_builder._StepBuilder``: it uses the builder's graph, chunks
and streams, and times the optimizer's points of the step's program where they come
(planner.program_optim [Note: the optimizer's points]); offload.optim's notes are named where
they apply.
"""

from __future__ import annotations

from memtrain.planner import cost
from memtrain.planner.plan import Action, Op, Tier

__all__ = ["_OptimizerSteps"]


class _OptimizerSteps:
    def _carry_in(self) -> None:
        """offload.optim [Note: write-backs across the step end]: the write-backs the last step
        left running (the same chunks this step leaves), submitted before this step's first
        fetch; their staging and rewrite copies are held until the training thread waits for
        each ([Note: carried write-backs released lazily]: ``_release_carried``)."""
        for c in self.carried:
            ch = self.chunks[c]
            mark = self.g.add(f"carried@c{c}", "compute", 0.0, alloc_start=[self._states_staging(c), self._rewrite(c)], tag=0)
            nbytes = cost.chunk_disk_bytes(ch.num_elems, self.train.dtype, self.train.optimizer)
            self.behind[c] = self._disk_write(f"write-states@c{c}:carried",
                                        cost.disk_write_time_s(nbytes, self.nvme, self.comp), deps=(mark,), tag=0)

    def _release_carried(self, m: int, c: int | None = None) -> bool:
        """offload.optim [Note: carried write-backs released lazily]: the training thread waits for
        chunk ``c``'s carried write-back (None: the oldest) and the copies out of its staging,
        then frees the staging and the rewrite copy; False when there is none."""
        if c is None and self.behind:
            c = next(iter(self.behind))
        if c not in self.behind:
            return False
        self.g.add(f"release@c{c}:carried", "compute", 0.0, deps=(self.behind.pop(c), *self.carried_copies.pop(c, ())),
                   free_end=[self._states_staging(c), self._rewrite(c)], tag=m)
        return True

    def _optim_points(self, m: int, points: list[Action], *, upto: int | None, bt: int | None = None,
                      acc: int | None = None) -> None:
        """Time the program's optimizer points after a backward block's marker, from the first not
        yet timed: at the block's start (``upto`` None) those up to the first update; when chunk
        ``upto``'s gradients are flushed (its backward ``bt``, its accumulation ``acc``) those up
        to and including its update."""
        while points:
            a = points[0]
            gate = next((b for b in points if b.op is not Op.OPTIM_WAIT), a)  # a wait goes with what follows it
            if gate.op is Op.OPTIM and gate.chunk != upto:
                return
            points.pop(0)
            if a.op is Op.OPTIM_WAIT:
                if not self._release_carried(m, a.chunk):
                    self._wait_write(m, a.chunk)
            elif a.op is Op.OPTIM_READ:
                self._read_ahead(m, a.chunk)
            else:
                self._optim_early(m, a.chunk, bt, acc)
                return

    def _read_ahead(self, m: int, c: int) -> None:
        """offload.optim [Note: states read ahead]: an ``OPTIM_READ``: chunk ``c``'s states are read
        into staging."""
        ch, dt, opt = self.chunks[c], self.train.dtype, self.train.optimizer
        mark = self.g.add(f"alloc@c{c}:ahead", "compute", 0.0, alloc_start=[self._ahead_staging(c)], tag=m)
        nbytes = cost.nvme_optim_read_bytes(ch.num_elems, dt, opt, early=True)
        self.ahead[c] = self._disk_read(f"read-states@c{c}:ahead",
                                   cost.disk_read_time_s(nbytes, self.nvme, self.comp), deps=(mark,), tag=m)

    def _ahead_staging(self, c: int) -> tuple[str, str, int]:
        """The staging a read ahead takes: all of it but the master when the param buffer becomes
        the master (offload.optim [Note: master from the param buffer])."""
        tier, owner, nbytes = self._states_staging(c)
        n, dt, opt = self.chunks[c].num_elems, self.train.dtype, self.train.optimizer
        master = cost.nvme_optim_read_bytes(n, dt, opt, early=False) - cost.nvme_optim_read_bytes(n, dt, opt, early=True)
        return (tier, owner, nbytes - master)

    def _states_staging(self, c: int) -> tuple[str, str, int]:
        ch = self.chunks[c]
        return (Tier.HOST.value, f"staging:{c}", cost.nvme_optim_staging_bytes(ch.num_elems, self.train.dtype, self.train.optimizer))

    def _wait_write(self, m: int, c: int) -> int | None:
        """An ``OPTIM_WAIT``: the training thread waits for chunk ``c``'s early write-back; its
        staging goes (None when it has none in flight)."""
        pos = next((i for i, (k, _) in enumerate(self.writing) if k == c), None)
        if pos is None:
            return None
        k, op = self.writing.pop(pos)
        # The write is put on the in-order disk stream only here: placed at its update, it would
        # hold back every backward fetch read behind an update still running, which the
        # runtime's store (writes submitted when the update ends) does not.
        if op is None:  # an update deferred to the training thread runs when first waited for
            op = self._run_deferred(k)
        ch = self.chunks[k]
        nbytes = cost.chunk_disk_bytes(ch.num_elems, self.train.dtype, self.train.optimizer)
        wr = self._disk_write(f"write-states@c{k}", cost.disk_write_time_s(nbytes, self.nvme, self.comp), deps=(op,),
                        tag=self.n)
        return self.g.add(f"wait@c{k}", "compute", 0.0, deps=(wr,), free_end=[self._states_staging(k), self._rewrite(k)],
                          tag=m)

    def _rewrite(self, c: int) -> tuple[str, str, int]:
        """The second copy of an nvme chunk's files while they are rewritten (offload.nvme keeps the
        old copy until the rename). Early updates run on another thread, so the sim holds it over
        the whole window the runtime's may fall in: from queueing to the write-back's wait."""
        ch = self.chunks[c]
        return (Tier.NVME.value, f"chunk:{c}:rewrite", cost.nvme_chunk_file_bytes(ch.num_elems, self.train.dtype, self.train.optimizer))

    def _optim_early(self, m: int, c: int, bt: int, acc: int) -> None:
        """Chunk ``c``'s gradients are complete in the last micro-batch: queue its update
        (offload.optim.OffloadedOptimizer.step_early; [Note: early optimizer step]). The
        training thread's marker follows the block's backward ``bt`` in program order; the
        update itself waits for the accumulation ``acc`` (on a GPU the cpu stream also runs
        accumulations, which a marker waiting on them would wrongly stall the compute behind)."""
        g, ch, dt, opt = self.g, self.chunks[c], self.train.dtype, self.train.optimizer
        upd_s = cost.cpu_optimizer_time_s(ch.num_elems, opt, self.host)  # ZeRO-Offload CPU Adam term
        if ch.home is Tier.HOST:
            self.optim_tasks.append(g.add(f"OPTIM@c{c}", self.cpu, upd_s, deps=(acc,), tag=self.n))
            return
        rd = self.ahead.pop(c, None)
        if rd is None:  # the program waited for write-backs before it where staging was needed
            mark = g.add(f"alloc@c{c}:states", "compute", 0.0, deps=(bt,),
                         alloc_start=[self._states_staging(c), self._rewrite(c)], tag=m)
            nbytes = cost.nvme_optim_read_bytes(ch.num_elems, dt, opt, early=True)
            rd = self._disk_read(f"read-states@c{c}", cost.disk_read_time_s(nbytes, self.nvme, self.comp), deps=(mark,), tag=self.n)
        else:  # the rest of the staging (the master, handed over from the param buffer) and the rewrite
            tier, owner, full = self._states_staging(c)
            rest = full - self._ahead_staging(c)[2]
            g.add(f"alloc@c{c}:states", "compute", 0.0, deps=(bt,),
                  alloc_start=([(tier, owner, rest)] if rest else []) + [self._rewrite(c)], tag=m)
        if self.inline:  # offload.optim [Note: where early updates run]: one chunk late, on this thread
            for k, _ in [w for w in self.writing if w[1] is None]:
                self._run_deferred(k)
            self.deferred[c] = (rd, acc)
            self.writing.append((c, None))
            return
        op = g.add(f"OPTIM@c{c}", self.cpu, upd_s, deps=(rd, acc), tag=self.n)
        self.optim_tasks.append(op)
        self.writing.append((c, op))

    def _run_deferred(self, c: int) -> int:
        """A CPU device's deferred nvme update runs now on the training thread (compute stream)."""
        rd, acc = self.deferred.pop(c)
        upd_s = cost.cpu_optimizer_time_s(self.chunks[c].num_elems, self.train.optimizer, self.host)
        op = self.g.add(f"OPTIM@c{c}", self.cpu, upd_s, deps=(rd, acc), tag=self.n)
        self.optim_tasks.append(op)
        self.writing = [(k, op if k == c else o) for k, o in self.writing]
        return op

    def _grad_out(self, m: int, c: int, bt: int, prev: int | None) -> int:
        """Add the chunk's grad buffer into its fp32 host accumulator, then free the buffer (an nvme
        chunk's accumulator is taken at its first flush of the step; offload.grads)."""
        deps = (bt,) if prev is None else (bt, prev)  # a chunk's adds run in micro-batch order
        grad = ("device", f"buffer:grad:{c}", self.pbytes[c])
        acc = [("host", f"chunk:{c}", cost.host_grad_accum_bytes(self.chunks[c].num_elems))] \
            if m == 0 and self.chunks[c].home is Tier.NVME else []
        if self.flush_s[c] == 0.0:  # a CPU device: the accumulator reads the buffer in place
            return self.g.add(f"accum{m}@c{c}", self.cpu, self.accum_s[c], deps=deps, alloc_start=acc,
                              free_end=(grad,), tag=m)
        landing = ("host", f"staging:grad:{c}", self.pbytes[c])
        d = self.g.add(f"OFFLOAD{m}@c{c}", self.copy_out, self.flush_s[c], deps=(bt,), alloc_start=[*acc, landing],
                       free_end=(grad,), tag=m)
        return self.g.add(f"accum{m}@c{c}", self.grads, self.accum_s[c], deps=(d, *deps[1:]),
                          free_end=(landing,), tag=m)

    def _optimizer(self, accum: dict[int, int]) -> None:
        """The step's end (offload.optim.OffloadedOptimizer.step), as the program's final points
        say (planner.program_optim [Note: the step's end]): each ``OPTIM`` on a chunk that did
        not update early (a device chunk on the compute stream, one after another; a host chunk
        on the cpu stream after its accumulation; an nvme chunk from its states read by an
        ``OPTIM_READ``, then written back until its ``OPTIM_WAIT``), then the early updates are
        waited for, and the NVMe chunks' host accumulators are freed. A clipped step's updates
        each carry clipping's pass over their gradients (``cost.CLIP_BYTES_PER_ELEM``)."""
        g, dt, opt, tag = self.g, self.train.dtype, self.train.optimizer, self.n
        clip = self.train.clip_grad_norm  # offload.clip: the norm and the coefficient's multiply per chunk
        dev_point = len(g) - 1  # the last device update, or the step's last task
        point = None  # the training thread's last wait in the nvme stream
        reads: dict[int, int] = {}
        writes: dict[int, int] = {}
        streamed: list[int] = []
        hst, nvm = Tier.HOST.value, Tier.NVME.value

        def staging(c: int) -> tuple[str, str, int]:
            return (hst, f"staging:{c}", cost.nvme_optim_staging_bytes(self.chunks[c].num_elems, dt, opt))

        for a in self.final_points:
            c = a.chunk
            ch = self.chunks[c]
            if a.op is Op.OPTIM_READ:
                mark = g.add(f"alloc@c{c}:states", self.cpu, 0.0, deps=(dev_point if point is None else point,),
                             alloc_start=[staging(c)], tag=tag)
                nbytes = cost.chunk_disk_bytes(ch.num_elems, dt, opt)
                reads[c] = self._disk_read(f"read-states@c{c}", cost.disk_read_time_s(nbytes, self.nvme, self.comp),
                                 deps=(mark,), tag=tag)
            elif a.op is Op.OPTIM_WAIT:
                point = g.add(f"wait@c{c}", self.cpu, 0.0, deps=(point, writes.pop(c)), free_end=[staging(c)], tag=tag)
            elif ch.home is Tier.DEVICE:
                upd_s = cost.device_optimizer_time_s(ch.num_elems, dt, opt, self.device, clip=clip)
                dev_point = g.add(f"OPTIM@c{c}", "compute", upd_s, deps=(dev_point,), tag=tag)
            elif ch.home is Tier.HOST:
                deps = (dev_point, accum[c]) if c in accum else (dev_point,)
                upd_s = cost.cpu_optimizer_time_s(ch.num_elems, opt, self.host, clip=clip)
                g.add(f"OPTIM@c{c}", self.cpu, upd_s, deps=deps, tag=tag)
            elif c in accum:  # nvme: [Note: the step's end] streamed through staging
                # Each rewritten file holds its old and new copy until the rename (offload.nvme).
                files = [(nvm, f"chunk:{c}:rewrite", cost.nvme_chunk_file_bytes(ch.num_elems, dt, opt))]
                op = g.add(f"OPTIM@c{c}", self.cpu, cost.cpu_optimizer_time_s(ch.num_elems, opt, self.host, clip=clip),
                           deps=(reads.pop(c), accum[c]), alloc_end=files, tag=tag)
                nbytes = cost.chunk_disk_bytes(ch.num_elems, dt, opt)
                writes[c] = self._disk_write(f"write-states@c{c}", cost.disk_write_time_s(nbytes, self.nvme, self.comp),
                                  deps=(op,), free_end=files, tag=tag)
                point = op
                streamed.append(c)
        assert not reads and not writes, ("the program's step end leaves reads or writes unwaited", reads, writes)
        if self.early:  # the early updates are waited for (a deferred one runs), then the write-backs in order
            for c in list(self.deferred):
                self._run_deferred(c)
            point = g.add("wait-updates", "compute", 0.0, deps=(dev_point, *self.optim_tasks), tag=tag)
            # [Note: write-backs across the step end] the writes left run on into the next step
            assert [c for c, _ in self.writing] == self.carried, (self.writing, self.carried)
            accs = [(hst, f"chunk:{c.index}", cost.host_grad_accum_bytes(c.num_elems))
                    for c in self.chunks if c.home is Tier.NVME and c.index in accum]
            if accs:
                g.add("zero_grad", "compute", 0.0, deps=(point,), free_end=accs, tag=tag)
            return
        if streamed:
            accs = [(hst, f"chunk:{c}", cost.host_grad_accum_bytes(self.chunks[c].num_elems)) for c in streamed]
            g.add("zero_grad", self.cpu, 0.0, deps=(point,), free_end=accs, tag=tag)
