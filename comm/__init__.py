"""memtrain.comm: process groups inside Ray actors, pipeline p2p and data-parallel collectives.

``group`` joins a ``torch.distributed`` world through a TCP store hosted by rank 0 (gloo, GPU
workers' tensors through host memory; NCCL not yet) and makes sub-groups; ``p2p`` sends tensors with their shape and dtype and sums
gradients across a group. Every wait has a timeout: a late or dead peer raises ``CommError``
naming the rank, the peer and the action, never a hang.
"""

from memtrain.comm.group import CommError, Rendezvous, host_store, join, leave, subgroups
from memtrain.comm.p2p import (Channel, PendingReduce, all_gather, all_reduce_, reduce_scatter, start_reduce,
                              start_reduce_scatter)

__all__ = ["CommError", "Rendezvous", "host_store", "join", "leave", "subgroups", "Channel",
           "all_gather", "all_reduce_", "reduce_scatter", "start_reduce_scatter", "start_reduce",
           "PendingReduce"]
