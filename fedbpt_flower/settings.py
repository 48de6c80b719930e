"""Flower's flat run and node configs read into the project's typed settings.

Flower hands both apps the same `run_config` (the app's pyproject, overridden by `flwr run --run-config`), so
the ServerApp and every ClientApp build the same RunConfig from it, as native clients get theirs at registration.
Keys are the RunConfig fields with '-' for '_' (Flower's convention); a site's own values (its service URL, its
data, its part of a shared pool) are node config (`flower-supernode --node-config`), and the service key is the
environment's (FEDBPT_API_KEY): a secret never travels through the SuperLink.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from fedbpt_wire.federation import RunConfig

# Run config keys that are not RunConfig fields: how clients cut their data, and where the server writes its report.
CLIENT_KEYS = {"service", "data", "task", "alpha", "per-class", "partition-seed", "val-fraction", "batch-size"}
SERVER_KEYS = {"report"}


class SettingsError(ValueError):
    """A run or node config the app cannot use; the message names the key."""


def run_config_from(flat: Mapping[str, object]) -> RunConfig:
    fields = set(RunConfig.model_fields)
    values = {}
    for key, value in flat.items():
        name = key.replace("-", "_")
        if name in fields:
            values[name] = value
        elif key not in CLIENT_KEYS | SERVER_KEYS:
            raise SettingsError(
                f"run config: unknown key {key!r} (RunConfig fields with '-', or one of "
                f"{sorted(CLIENT_KEYS | SERVER_KEYS)})"
            )
    try:
        return RunConfig.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SettingsError(f"run config: {'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}") from None


@dataclass(frozen=True)
class SiteSettings:
    """One ClientApp's site: where its service is and which examples it holds."""

    client_id: str
    service: str
    api_key: str | None
    data: str
    task: str
    partition: tuple[int, int] | None  # (K, N): part K of N of a shared pool; None: the whole of `data`
    alpha: float | None  # Dirichlet alpha of the split; None: IID
    per_class: int | None
    partition_seed: int
    val_fraction: float
    batch_size: int
    ca_cert: str | None


def site_settings(run: Mapping[str, Any], node: Mapping[str, Any], node_id: int) -> SiteSettings:
    """Node config first (a site's own), the run config's value as the default (simulation has one config)."""

    def get(key: str, default=None):
        return node.get(key, run.get(key, default))

    service = get("service")
    if not service:
        raise SettingsError(
            "node config: 'service' (the inference service URL) is missing; set it with "
            "--node-config 'service=\"https://...\"' or in the run config"
        )
    partition = None
    if "partition-id" in node or "num-partitions" in node:
        try:
            k, n = int(node["partition-id"]), int(node["num-partitions"])
        except (KeyError, TypeError, ValueError):
            raise SettingsError("node config: 'partition-id' and 'num-partitions' go together, as integers") from None
        if not 0 <= k < n:
            raise SettingsError(f"node config: need 0 <= partition-id < num-partitions, got {k} and {n}")
        partition = (k, n)
    try:
        alpha, per_class = float(get("alpha", 0.0)), int(get("per-class", 0))
        seed, fraction = int(get("partition-seed", 0)), float(get("val-fraction", 0.25))
        batch = int(get("batch-size", 16))
    except (TypeError, ValueError):
        raise SettingsError(
            "run config: alpha, per-class, partition-seed, val-fraction and batch-size must be numbers"
        ) from None
    default_id = f"client-{partition[0]}" if partition else f"node-{node_id}"
    return SiteSettings(
        client_id=str(node.get("client-id", default_id)),
        service=str(service),
        api_key=os.environ.get("FEDBPT_API_KEY"),
        data=str(get("data", "default")),
        task=str(get("task", "rotten_tomatoes")),
        partition=partition,
        # TOML has no null: 0 stands for "none" (an IID split, every example of the pool).
        alpha=alpha if alpha > 0 else None,
        per_class=per_class if per_class > 0 else None,
        partition_seed=seed,
        val_fraction=fraction,
        batch_size=batch,
        ca_cert=str(node["ca-cert"]) if "ca-cert" in node else None,
    )
