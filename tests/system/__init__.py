"""Whole runs as users make them: processes and the CLI, faults, the demo, the bench, containers, Flower, and
the package layout."""
