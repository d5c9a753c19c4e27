"""memtrain.comm."""
