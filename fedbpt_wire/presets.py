"""The run settings the project ships, in one place: the embedded model's search space, the demo's run, and the
GPU budget measured on one H100 (docs/design.md, section 6). The aggregator, `fedbpt demo`, the bench's grids and
compose read them from here; RunConfig's own defaults are the paper's (d = 500, L = 50).
"""

from __future__ import annotations

from typing import Any

# The search space and start the embedded model (SmolLM2-135M) needs: the aggregator's defaults where no flag or
# --config file says otherwise.
EMBEDDED_RUN: dict[str, Any] = {
    "intrinsic_dim": 50,
    "prompt_length": 5,
    "prompt_init": "zeros",
    "prompt_placement": "after-text",
    "local_popsize": 8,
}

# `fedbpt demo`'s run, sized for 10 minutes on 2 AVX2 cores: FedBPT without perturbation (the label prior is what
# there is to learn on the demo's task, and the perturbed fitness works against learning it), 4 rounds of 2 local
# iterations.
DEMO_RUN: dict[str, Any] = {**EMBEDDED_RUN, "strategy": "fedbpt-noperturb", "rounds": 4, "local_iterations": 2}

# How the demo's clients hold and batch their data.
DEMO_DATA: dict[str, Any] = {"per_class": 40, "batch_size": 16}

# The budget that beat the calibrated baseline on one H100 (bench/RESULTS.md, "Enough budget"), as changes to the
# demo's: the prompt ahead of the text from real token embeddings, L = 20, d = 100, 12 rounds of 6 x 16 candidates
# on 500 labelled examples in batches of 32, scored in float32 (~150k sequences, ~190 s there; hours on a CPU).
GPU_BUDGET: dict[str, Any] = {
    "prompt_placement": "ahead",
    "prompt_init": "tokens",
    "prompt_length": 20,
    "intrinsic_dim": 100,
    "per_class": 250,
    "batch_size": 32,
    "local_popsize": 16,
    "local_iterations": 6,
    "rounds": 12,
    "dtype": "float32",
}
