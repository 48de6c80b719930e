"""The inference service: engines against an independent transformers forward, the HTTP contract, limits,
abuse and fuzzing."""
