"""A round's task and a client's update as Flower records, and back into the wire models.

The mean travels as a float32 Array: the native aggregator's wire (fedbpt_wire.tensors) carries float32 too, so
both engines hand the client, and the merge, the same numbers. The scalars travel in a ConfigRecord, the client's
metrics and costs in a MetricRecord; the server rebuilds an UpdateRequest and validates it as the native
aggregator validates a POST.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from aggregator.strategies import LocalStart
from fedbpt_wire.federation import ClientCosts, ClientMetrics, RoundTask, UpdateRequest
from fedbpt_wire.tensors import decode_tensor, encode_tensor

MESSAGE_TYPE = "train"


def _mean(content: RecordDict, record: str) -> np.ndarray:
    # Flower types a record's values as the union of every kind it may hold; this one holds an Array.
    array: Any = content[record]["mean"]
    return array.numpy()


def task_content(round_: int, task: LocalStart, run_id: str, perturb: bool) -> RecordDict:
    task_config: dict[str, Any] = {"round": round_, "sigma": float(task.sigma), "run-id": run_id, "perturb": perturb}
    if task.local_sigma is not None:
        task_config["local-sigma"] = float(task.local_sigma)
    return RecordDict(
        {
            "global": ArrayRecord({"mean": Array(np.asarray(task.mean, dtype=np.float32))}),
            "task": ConfigRecord(task_config),
        }
    )


def round_task(content: RecordDict) -> RoundTask:
    """What `FedBPTClient.run_round` takes: the native task of a selected client."""
    cfg: Any = content["task"]
    mean = _mean(content, "global")
    return RoundTask(
        run_id=str(cfg["run-id"]),
        round=int(cfg["round"]),
        state="open",
        selected=True,
        mean=encode_tensor(mean),
        sigma=float(cfg["sigma"]),
        local_sigma=float(cfg["local-sigma"]) if "local-sigma" in cfg else None,
        perturb=bool(cfg["perturb"]) if "perturb" in cfg else None,
    )


def update_content(client_id: str, update: UpdateRequest) -> RecordDict:
    fit: dict[str, Any] = {
        "client-id": client_id,
        "round": update.round,
        "fitness": update.fitness,
        "sigmas": [float(s) for s in update.sigmas],
        "num-samples": update.num_samples,
    }
    if update.final_sigma is not None:
        fit["final-sigma"] = update.final_sigma
    # A MetricRecord holds flat numbers: the nested comparison travels as "vs_baseline.<field>".
    metrics = {k: v for k, v in update.metrics.model_dump(exclude={"vs_baseline"}).items() if v is not None}
    if update.metrics.vs_baseline is not None:
        metrics |= {f"vs_baseline.{k}": v for k, v in update.metrics.vs_baseline.model_dump().items()}
    metrics |= {f"costs.{k}": v for k, v in update.costs.model_dump().items()}
    return RecordDict(
        {
            "update": ArrayRecord({"mean": Array(decode_tensor(update.mean))}),
            "fit": ConfigRecord(fit),
            "metrics": MetricRecord(metrics),
        }
    )


def update_request(content: RecordDict) -> tuple[str, UpdateRequest]:
    """The claimed client id and the update; raises KeyError, TypeError or pydantic's ValidationError on a
    malformed reply."""
    fit: Any = content["fit"]
    metrics: Any = content["metrics"]
    mean = _mean(content, "update")
    costs = {k.removeprefix("costs."): v for k, v in metrics.items() if k.startswith("costs.")}
    compared = {k.removeprefix("vs_baseline."): v for k, v in metrics.items() if k.startswith("vs_baseline.")}
    plain = {k: v for k, v in metrics.items() if not k.startswith(("costs.", "vs_baseline."))}
    if compared:
        plain["vs_baseline"] = compared
    req = UpdateRequest(
        round=fit["round"],
        mean=encode_tensor(mean),
        fitness=fit["fitness"],
        sigmas=list(fit["sigmas"]),
        num_samples=fit["num-samples"],
        final_sigma=fit.get("final-sigma"),
        metrics=ClientMetrics(**plain),
        costs=ClientCosts(**costs),
    )
    return str(fit["client-id"]), req
