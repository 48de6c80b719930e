"""`fedbpt bench`: every method on the same model, data, partitions and seeds; accuracy against the queries
and bytes it took, measured on the wire.

This module holds what a grid is (its settings and methods); `runs` runs one method on one setting, `report` turns
the finished runs into tables and plots, `command` is `fedbpt bench`. Every finished run is appended to
`runs.jsonl` at once, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedbpt_wire.federation import STRATEGIES, RunConfig
from fedbpt_wire.presets import DEMO_DATA, DEMO_RUN, GPU_BUDGET

BLACK_BOX = STRATEGIES
METHODS = ("zero-shot", "calibrated", "icl", *BLACK_BOX, "fedprompt")
LABELS = {
    "zero-shot": "zero-shot (manual prompt)",
    "calibrated": "calibrated zero-shot",
    "icl": "in-context (5 demos)",
    "fedbpt": "FedBPT",
    "fedbpt-noperturb": "FedBPT w/o perturbation",
    "fedavg-z": "FedBBT (FedAvg of z)",
    "centralized": "centralized BBT",
    "local-only": "local-only BBT",
    "fedprompt": "FedPrompt (white-box)",
}


@dataclass
class Grid:
    name: str
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    tasks: tuple[str, ...] = ("rotten_tomatoes", "amazon_snippets")
    data: str = "default"  # 'default' (each task's embedded set), 'hf', or a directory
    # Few-shot: examples per class in the whole pool, as the paper's 40; None = every training example.
    regimes: dict[str, int | None] = field(default_factory=lambda: {"few-shot": 40})
    alphas: tuple[float | None, ...] = (0.5,)  # Dirichlet alpha; None = IID
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    clients: int = 10
    rounds: int = 4
    intrinsic_dim: int = 50
    prompt_length: int = 5
    popsize: int = 4
    local_iterations: int = 2
    batch_size: int = 8
    sigma0: float = 1.0
    test_size: int = 300
    curve_size: int = 100  # test examples the per-round curves are scored on
    icl_shots: int = 5
    fedprompt_steps: int = 4
    fedprompt_lr: float = 0.01
    prompt_wire: str = "seed"
    prompt_init: str = "zeros"
    prompt_placement: str = "after-text"
    label_words: str = ""  # comma-separated verbalizer replacing each task's, e.g. " terrible, great"
    clip_multiple: float = 4.0  # the aggregator's bound on a client mean's distance (0: none)
    robust_merge: str = "none"  # fedavg-z's merge: none (weighted mean), median, trimmed-mean
    # Any other RunConfig field for every federated run (a grid file's keys that name one, e.g. "perturb_rate").
    run: dict[str, Any] = field(default_factory=dict)

    def run_config(self, method: str, seed: int, clients: int) -> dict[str, Any]:
        """The aggregator's RunConfig fields (but the run id) for `method` on one seed."""
        return {
            "strategy": method,
            "rounds": self.rounds,
            "intrinsic_dim": self.intrinsic_dim,
            "prompt_length": self.prompt_length,
            "sigma0": self.sigma0,
            "local_popsize": self.popsize,
            "local_iterations": self.local_iterations,
            "seed": seed,
            "projection_seed": seed,
            "min_clients": clients,
            "prompt_init": self.prompt_init,
            "prompt_placement": self.prompt_placement,
            "round_timeout_s": 3600,
            "clip_multiple": self.clip_multiple,
            "robust_merge": self.robust_merge,
            **self.run,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> Grid:
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        further = set(RunConfig.model_fields) - known - {"run_id", "strategy", "seed", "min_clients"}
        if further & set(raw):
            raw["run"] = {**raw.get("run", {}), **{k: raw.pop(k) for k in sorted(further & set(raw))}}
        unknown = sorted(set(raw) - known - {"paper", "notes"})
        if unknown:
            raise ValueError(f"{path}: unknown grid keys {unknown}; known: {sorted(known | further)}")
        for key in ("tasks", "alphas", "seeds", "methods"):
            if key in raw:
                raw[key] = tuple(raw[key])
        bad = sorted(set(raw.get("methods", ())) - set(METHODS))
        if bad:
            raise ValueError(f"{path}: unknown methods {bad}; known: {list(METHODS)}")
        return cls(**{k: v for k, v in raw.items() if k in known})


def _budget(values: dict[str, Any]) -> dict[str, Any]:
    """Grid keywords for a preset's run and data settings (fedbpt_wire.presets)."""
    names = {"local_popsize": "popsize"}
    out = {names.get(k, k): v for k, v in values.items() if k not in ("strategy", "per_class")}
    if "per_class" in values:
        out["regimes"] = {
            "few-shot" if values["per_class"] == DEMO_DATA["per_class"] else "larger": values["per_class"]
        }
    return out


# The demo's setting (fedbpt demo's defaults): Amazon snippets, " terrible"/" great", IID, 4 clients.
_DEMO = {
    **_budget({**DEMO_RUN, **DEMO_DATA}),
    "tasks": ("amazon_snippets",),
    "label_words": " terrible, great",
    "alphas": (None,),
    "clients": 4,
}

GRIDS = {
    # Under 10 minutes on 2 cores: the demo's setting, one seed, 2 rounds, a 200-example test slice.
    "quick": Grid(
        "quick",
        **{**_DEMO, "rounds": 2},
        seeds=(0,),
        methods=("zero-shot", "calibrated", "fedbpt-noperturb", "fedavg-z"),
        test_size=200,
        curve_size=50,
    ),
    # About an hour on 2 AVX2 cores (SmolLM2-135M in fp32 runs ~250 tokens/s there): the demo's setting, 3 seeds,
    # the tuned methods against zero-shot and the calibrated zero-shot, on the whole 1,000-example test split.
    "default": Grid(
        "default",
        **_DEMO,
        methods=("zero-shot", "calibrated", "fedbpt", "fedbpt-noperturb", "fedavg-z"),
        test_size=1000,
        curve_size=50,
    ),
    # The budget that beat the calibrated baseline on one H100 (`fedbpt demo --preset gpu`, bench/RESULTS.md
    # "Enough budget"), 3 seeds. For a GPU host: hours on a CPU.
    "gpu": Grid(
        "gpu",
        **{**_DEMO, **_budget(GPU_BUDGET)},
        methods=("zero-shot", "calibrated", "fedbpt", "fedbpt-noperturb", "fedavg-z"),
        test_size=1000,
        curve_size=100,
    ),
    # Both embedded tasks, both regimes, IID and three Dirichlet alphas: hours on a CPU, for a long run by hand.
    "full": Grid("full", regimes={"few-shot": 40, "larger": 400}, alphas=(None, 1.0, 0.5, 0.1)),
}


@dataclass(frozen=True)
class Setting:
    task: str
    regime: str
    alpha: float | None
    seed: int

    @property
    def partition(self) -> str:
        return "iid" if self.alpha is None else f"dir{self.alpha:g}"

    def key(self, method: str) -> str:
        return f"{self.task}/{self.regime}/{self.partition}/seed{self.seed}/{method}"
