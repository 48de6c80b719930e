"""The aggregator: strategies and their math, rounds, auth, abuse and fuzzing, over loopback HTTP."""
