"""memtrain.cluster."""
