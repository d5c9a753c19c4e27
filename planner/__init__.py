"""memtrain.planner."""
