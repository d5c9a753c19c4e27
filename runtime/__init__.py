"""memtrain.runtime."""
