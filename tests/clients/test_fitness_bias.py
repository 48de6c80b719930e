"""fitness_bias 'fitted': a client scores its round at one label bias, fitted on its whole training split at the
global mean, with no extra service call. Checked against a real service on loopback (the tiny RoBERTa) and the
arithmetic redone here from the engine's own logits."""

from __future__ import annotations

import numpy as np
import pytest

from fed_clients.client import FedBPTClient
from fed_clients.data import Example
from fed_clients.service_client import ServiceClient
from fed_clients.tasks import get_task
from fedbpt_wire.federation import RoundTask, RunConfig
from fedbpt_wire.metrics import debiased_cross_entropy, label_cross_entropy
from fedbpt_wire.projection import projection_for
from fedbpt_wire.tensors import decode_tensor, encode_tensor
from inference_service.app import create_app
from inference_service.auth import KeyStore
from inference_service.engine import ScoreBatch
from inference_service.torch_engine import TorchEngine

from ..conftest import TINY_CORPUS, serve_app


@pytest.fixture(scope="module")
def served(tiny_roberta_dir):
    engine = TorchEngine(str(tiny_roberta_dir), dtype="float32")
    with serve_app(create_app(engine, KeyStore({"k": None}))) as url:
        yield engine, url


def one_round(url, bias_rule: str, mean: np.ndarray):
    task = get_task("sst2")
    examples = [Example({"text": t}, int("great" in t)) for t in TINY_CORPUS]
    config = RunConfig(
        run_id="bias",
        strategy="fedbpt-noperturb",
        perturb=False,
        rounds=1,
        intrinsic_dim=8,
        prompt_length=3,
        local_popsize=4,
        local_iterations=2,
        fitness_bias=bias_rule,
    )
    service = ServiceClient(url, "k")
    client = FedBPTClient("c", service, task, examples[:6], examples[6:], config, batch_size=4)
    task_msg = RoundTask(
        run_id="bias", round=0, state="open", selected=True, mean=encode_tensor(mean), sigma=1.0, local_sigma=1.0
    )
    update = client.run_round(task_msg)
    return client, config, task, update


def test_the_round_is_scored_at_the_bias_fitted_on_the_whole_training_split(served):
    engine, url = served
    mean = np.linspace(-1, 1, 8)
    plain_client, _, _, plain = one_round(url, "none", mean)
    client, config, task, update = one_round(url, "fitted", mean)

    # No extra call: the global mean's logits on train + validation serve the metrics and the bias.
    assert update.costs.queries == plain.costs.queries and update.costs.sequences == plain.costs.sequences

    projection = projection_for(config, engine.info)
    words = list(task.label_words)

    def engine_logits(z: np.ndarray, examples) -> np.ndarray:
        texts = [task.render(ex.fields, engine.info.kind) for ex in examples]
        return engine.score(ScoreBatch(projection(z[None]), texts, words)).logits[0]

    labels = np.array([ex.label for ex in client.train])
    bias = debiased_cross_entropy(engine_logits(mean, client.train)[None], labels)[1][0]
    assert np.abs(bias).max() > 1e-3, "the tiny model's prior should need a bias, or this test shows nothing"
    # The reported local loss is the final mean's cross-entropy on the whole training split at that bias.
    final = decode_tensor(update.mean).astype(np.float64)
    loss, _ = label_cross_entropy((engine_logits(final, client.train) + bias)[None], labels)
    assert update.metrics.local_loss == pytest.approx(float(loss[0]), rel=1e-5)
    raw, _ = label_cross_entropy(engine_logits(final, client.train)[None], labels)
    assert update.metrics.local_loss != pytest.approx(float(raw[0]), rel=1e-3)
    # The validation metrics are the global mean's, unbiased, as without the rule.
    assert update.metrics.global_val_loss == pytest.approx(plain.metrics.global_val_loss, rel=1e-6)
