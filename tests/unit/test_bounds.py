"""planner.bounds.fetch_counts against the program it counts: for random block layouts, depths
and micro-batch counts, the fetches per chunk equal the ``PREFETCH`` actions of the whole step's
program (``program.lower_step``), which lowers every micro-batch instead of three."""

from __future__ import annotations

import random
from collections import Counter

from memtrain.planner.bounds import fetch_counts
from memtrain.planner.plan import Op
from memtrain.planner.program import Layout, lower_step


def test_fetch_counts_equal_the_prefetches_of_the_lowered_step():
    rng = random.Random(7)
    for _ in range(200):
        num_chunks = rng.randint(1, 8)
        uses = [tuple(sorted(rng.sample(range(num_chunks), rng.randint(0, min(3, num_chunks)))))
                for _ in range(rng.randint(1, 10))]
        depth, n = rng.randint(1, 5), rng.randint(1, 6)
        layout = Layout(uses=tuple(uses), off=frozenset(c for u in uses for c in u), prefetch_depth=depth)
        expected = Counter(a.chunk for a in lower_step(layout, n) if a.op is Op.PREFETCH)
        assert fetch_counts(uses, depth, n) == dict(expected), (uses, depth, n)
