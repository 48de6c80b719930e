"""Development benchmarks, run from a checkout's root as `python -m bench.NAME`; not installed with the package.

The benchmark grid users run (`fedbpt bench`) lives in `fedbpt.bench`; the scripts here time the engine and
the service side by side (service_overhead, kv_reuse, engine_throughput) or study prompt placement
(prompt_study), and RESULTS.md keeps their latest numbers.
"""
