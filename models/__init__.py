"""memtrain.models."""
