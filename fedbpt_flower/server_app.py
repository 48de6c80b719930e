"""The ServerApp: the run's global search distribution, driven round by round by Flower's `Strategy.start`.

`flwr run` (deployment) and `flwr.simulation.run_simulation` both load `app` from here. Where the run config names
a `report` path, the per-round history (selection, reporters, step sizes, the global mean after each round) is
written there as JSON when the run ends: the ServerApp runs inside the SuperLink's host, so that file is where
an operator (and the tests) read a Flower run's outcome.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from .settings import run_config_from
from .strategy import FedBPTFlowerStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = run_config_from(context.run_config)
    strategy = FedBPTFlowerStrategy(config)
    start = ArrayRecord({"mean": Array(np.zeros(config.intrinsic_dim, dtype=np.float32))})
    strategy.start(grid=grid, initial_arrays=start, num_rounds=config.rounds, timeout=config.round_timeout_s)
    report = str(context.run_config.get("report", ""))
    if report:
        write_report(Path(report), strategy)


def write_report(path: Path, strategy: FedBPTFlowerStrategy) -> None:
    final = strategy.strategy
    own = final.client_means() if final is not None else None
    body = {
        "config": strategy.config.model_dump(),
        "history": [asdict(r) for r in strategy.history],
        "client_means": None if own is None else {cid: [float(x) for x in m] for cid, m in own.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(path)  # whole or absent: a reader polling for the file never sees half of it
