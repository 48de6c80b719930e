"""One FedPrompt run in its own process (`python -m fedbpt.bench.fedprompt_job SPEC OUT`), so that the bench can
read the peak memory of a client that must hold the model. SPEC and OUT are JSON files."""

from __future__ import annotations

import json
import sys

from fed_clients.data import client_shard, load_splits
from fed_clients.tasks import get_task
from fedbpt.bench.fedprompt import fedprompt_run
from fedbpt_assets import resolve_model


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    task = get_task(spec["task"])
    splits = load_splits(spec["data"], task)
    test = splits["test"][: spec["test_size"]]
    # The same shards the black-box clients of this setting hold: same pool, partition and seed.
    shards = [
        client_shard(splits["train"], k, spec["clients"], spec["alpha"], spec["seed"], spec["per_class"])
        for k in range(spec["clients"])
    ]
    res = fedprompt_run(
        resolve_model(spec["model"]),
        task,
        shards,
        test[: spec["curve_size"]],
        rounds=spec["rounds"],
        local_steps=spec["local_steps"],
        lr=spec["lr"],
        prompt_length=spec["prompt_length"],
        batch_size=spec["batch_size"],
        seed=spec["seed"],
        dtype=spec["dtype"],
        final_test=test,
        progress=lambda r: print(json.dumps(r), flush=True),
    )
    out = {
        "test_accuracy": res["final_test_accuracy"],
        "test_loss": res["final_test_loss"],
        "initial_curve_accuracy": res["initial_test_accuracy"],
        "rounds": [{**r, "curve_accuracy": r["test_accuracy"]} for r in res["rounds"]],
        "bytes_up": res["bytes_up"],
        "bytes_down": res["bytes_down"],
        "client_model_bytes": res["client_model_bytes"],
        "seconds": res["seconds"],
    }
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
