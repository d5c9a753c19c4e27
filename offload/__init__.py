"""memtrain.offload."""
