"""`fedbpt bench`: the benchmark grid, its baselines and its report."""
