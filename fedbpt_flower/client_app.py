"""The ClientApp: one site's FedBPT round, the same `FedBPTClient.run_round` that `fedbpt client` runs.

The site's data and service client are built once per run and node and kept while this process lives (Flower may
start a fresh process per message, which then rebuilds them: every choice in them is seeded, so the round is the
same either way).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fed_clients.client import FedBPTClient
from fed_clients.data import ClientData, check_data, client_shard, load_splits
from fed_clients.partition import train_val_split
from fed_clients.service_client import ServiceClient
from fed_clients.tasks import get_task

from .records import round_task, update_content
from .settings import SiteSettings, run_config_from, site_settings

app = ClientApp()
_clients: dict[tuple[int, int], tuple[str, FedBPTClient]] = {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    key = (context.run_id, context.node_id)
    if key not in _clients:
        _clients[key] = _build(context)
    client_id, client = _clients[key]
    update = client.run_round(round_task(msg.content))
    return Message(update_content(client_id, update), reply_to=msg)


def _build(context: Context) -> tuple[str, FedBPTClient]:
    config = run_config_from(context.run_config)
    site = site_settings(context.run_config, context.node_config, context.node_id)
    task = get_task(site.task)
    data = _site_data(site, task)
    check_data(site.client_id, data, site.data, site.batch_size)
    service = ServiceClient(site.service, site.api_key, verify=site.ca_cert or True)
    return site.client_id, FedBPTClient(site.client_id, service, task, data.train, data.val, config, site.batch_size)


def _site_data(site: SiteSettings, task) -> ClientData:
    """As `fedbpt client --partition K/N`: part K of the shared pool; without a partition, the site's own files."""
    splits = load_splits(site.data, task)
    if site.partition is not None:
        k, n = site.partition
        return client_shard(splits["train"], k, n, site.alpha, site.partition_seed, site.per_class, site.val_fraction)
    if splits["validation"]:
        return ClientData(splits["train"], splits["validation"])
    train_idx, val_idx = train_val_split(np.arange(len(splits["train"])), site.val_fraction, site.partition_seed)
    return ClientData([splits["train"][i] for i in train_idx], [splits["train"][i] for i in val_idx])
