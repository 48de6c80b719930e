"""The federated loop end to end: a real service, a real aggregator and client threads over loopback HTTP, on a
causal LM (SmolLM2) and a masked LM (the tiny RoBERTa). What the aggregator reports is checked against what the
clients sent and against scores computed here."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from aggregator.app import create_app as create_aggregator
from aggregator.strategies import ClientUpdate, make_strategy
from fed_clients.aggregator_client import AggregatorClient
from fed_clients.data import ClientData, Example, client_shard, load_splits
from fed_clients.service_client import ServiceClient
from fed_clients.session import run_client
from fed_clients.tasks import get_task
from fedbpt_wire.federation import RunConfig
from fedbpt_wire.projection import initial_prompt
from fedbpt_wire.tensors import decode_tensor
from inference_service.app import create_app as create_service
from inference_service.auth import KeyStore
from inference_service.engine import ScoreBatch
from inference_service.torch_engine import TorchEngine

from ..aggregator.test_round_zero_twin import round_zero_by_twin
from ..conftest import TINY_CORPUS, serve_app

BATCH = 4


@pytest.fixture(scope="module")
def smol(default_model_dir):
    engine = TorchEngine(str(default_model_dir), dtype="float32")
    with serve_app(create_service(engine, KeyStore({"svc-key": None}))) as url:
        yield engine, url


@pytest.fixture(scope="module")
def roberta(tiny_roberta_dir):
    engine = TorchEngine(str(tiny_roberta_dir), dtype="float32")
    with serve_app(create_service(engine, KeyStore({"svc-key": None}))) as url:
        yield engine, url


class Recording(AggregatorClient):
    """The real aggregator client, keeping each update it sends, sent[round][client_id], and each task it is handed
    (the global distribution a round starts from), tasks[round][client_id]."""

    def __init__(self, url: str, sent: dict, tasks: dict):
        super().__init__(url)
        self.sent, self.tasks = sent, tasks

    def round(self, wait=0.0):
        task = super().round(wait)
        if task.selected and task.mean is not None:
            self.tasks.setdefault(task.round, {})[self.client_id] = task
        return task

    def register(self, client_id, num_samples, enroll_key=None, token=None):
        self.client_id = client_id
        return super().register(client_id, num_samples, enroll_key, token=token)

    def submit(self, update):
        self.sent.setdefault(update.round, {})[self.client_id] = update
        return super().submit(update)


def run_federation(service_url, config, shards, task, tmp_path):
    """Every client a thread running the real `run_client` loop; returns the final status, the global state as the
    operator reads it, the clients' service clients, what each client sent and the tasks each was handed."""
    errors, services, sent, tasks = [], [], {}, {}

    def work(k, agg_url):
        service = ServiceClient(service_url, "svc-key")
        services.append(service)
        try:
            run_client(
                service,
                Recording(agg_url, sent, tasks),
                f"client-{k}",
                shards[k],
                task,
                enroll_key="enroll",
                batch_size=BATCH,
                max_idle_s=120,
            )
        except Exception as exc:  # surfaced to the test below
            errors.append(exc)

    with serve_app(create_aggregator(config, str(tmp_path / "agg.db"), enroll_key="enroll")) as agg_url:
        threads = [threading.Thread(target=work, args=(k, agg_url)) for k in range(len(shards))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in threads), "a client did not finish"
        assert not errors, errors
        status = httpx.get(f"{agg_url}/v1/status", timeout=60).json()
        observer = AggregatorClient(agg_url)
        observer.http.set_token("enroll")
        final = observer.global_state()
    return status, final, services, sent, tasks


def zero_shot_val_accuracy(engine, config, shards, task) -> float:
    """Round 0's validation accuracy, computed here: the global mean is 0, so every client scores P0 (init
    'random') on its validation examples; the round's figure weighs each client's by its count."""
    info = engine.info
    p0 = initial_prompt(config.projection_seed, config.prompt_length, info.hidden_size, info.embedding_std)
    correct = total = 0
    for shard in shards:
        texts = [task.render(ex.fields, info.kind) for ex in shard.val]
        logits = engine.score(ScoreBatch(p0[None], texts, list(task.label_words))).logits[0]
        correct += int((logits.argmax(-1) == np.array([ex.label for ex in shard.val])).sum())
        total += len(shard.val)
    return correct / total


def check_the_merges(config, status, final, sent: dict) -> None:
    """The global state the aggregator publishes is what its strategy makes of exactly the updates the clients sent.

    fedavg-z by hand: the n-weighted mean of the last round's means and final step sizes. FedBPT by replaying the
    updates through a fresh strategy (whose merge is checked by hand in test_strategies.py): besides the weighted
    recombination, cma pulls a mean farther than sqrt(d) + 2d / (d + 2) in the ES's own metric back to that distance,
    which depends on the covariance the rounds before built up.
    """
    got = decode_tensor(final.mean)
    if config.strategy == "fedavg-z":
        last = sent[config.rounds - 1]
        n = {cid: u.num_samples for cid, u in last.items()}
        expected = sum(n[c] * decode_tensor(u.mean).astype(np.float64) for c, u in last.items()) / sum(n.values())
        assert final.sigma == pytest.approx(
            sum(n[c] * u.final_sigma for c, u in last.items()) / sum(n.values()), rel=1e-12
        )
        np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6, atol=1e-7)
        return
    replay = make_strategy(config, popsize=len(sent[0]))
    for rec in status["history"]:
        result = replay.merge(
            [
                ClientUpdate(cid, decode_tensor(u.mean), u.fitness, u.sigmas, u.num_samples, u.final_sigma)
                for cid, u in sent[rec["round"]].items()
            ]
        )
        assert (rec["sigma_merged"], rec["sigma_after"]) == (result.sigma_merged, result.sigma_after)
    assert got.tobytes() == replay.mean.astype(np.float32).tobytes() and final.sigma == replay.sigma


def check_round_zero_by_twin(config, status, sent, tasks) -> None:
    """Round 0 against a pycma twin written from the design doc (tests/aggregator/test_round_zero_twin.py; no code of
    aggregator/ in it): the step size the sigma rule set, the one after the tell, and the distribution round 1 hands
    every client. `check_the_merges` replays later rounds through the strategy itself, which this anchors."""
    reports = [(cid, decode_tensor(u.mean).astype(np.float64), u.fitness, list(u.sigmas)) for cid, u in sent[0].items()]
    # The run's bounds leave round 0 alone, so the merge saw exactly these inputs: every mean within clip_multiple x
    # sigma0 x sqrt(d) of the start 0, every step size under 10 x sigma0, and the step size after at most 2 x sigma0.
    radius = config.clip_multiple * config.sigma0 * np.sqrt(config.intrinsic_dim)
    assert all(np.linalg.norm(z) < radius and max(s) < 10 * config.sigma0 for _, z, _, s in reports)
    start = list(tasks[0].values())
    assert all(not decode_tensor(t.mean).any() and t.sigma == t.local_sigma == config.sigma0 for t in start)
    mean, merged, after, local = round_zero_by_twin(config, len(start), reports)
    assert after < 2 * config.sigma0
    rec = status["history"][0]
    assert rec["sigma_merged"] == pytest.approx(merged, rel=1e-12)
    assert rec["sigma_after"] == pytest.approx(after, rel=1e-12)
    assert sorted(tasks[1]) == sorted(sent[0])
    for t in tasks[1].values():
        np.testing.assert_allclose(decode_tensor(t.mean), mean, rtol=1e-6, atol=1e-7)
        assert t.sigma == pytest.approx(after, rel=1e-12) and t.local_sigma == pytest.approx(local, rel=1e-12)


def check_the_rounds(status, config, shards, services, sent, perturb: bool) -> None:
    history = status["history"]
    assert status["state"] == "done" and [r["state"] for r in history] == ["merged"] * config.rounds
    n_val = sum(len(s.val) for s in shards)
    for rec in history:
        assert sorted(rec["reporters"]) == ["client-0", "client-1"] == sorted(sent[rec["round"]])
        # Per client and round: the global prompt on local training + validation (its comparison with the baseline),
        # one call per local iteration, the final mean; in a client's first round, the baseline once.
        first = rec["round"] == 0
        assert rec["queries"] == 2 * (1 + config.local_iterations + 1 + first)
        expected = 0
        for shard in shards:
            copies = 2 if perturb else 1
            b = min(BATCH, len(shard.train)) * copies
            held = len(shard.train) + len(shard.val)
            # The final mean's fitness is measured on the whole shard (and its perturbed copy), not a batch.
            expected += held * (1 + first) + config.local_iterations * config.local_popsize * b
            expected += len(shard.train) * copies
        assert rec["sequences"] == expected
        pooled = rec["vs_baseline"]
        assert pooled["examples"] == n_val and pooled["tuned_correct"] - pooled["tuned_only"] == (
            pooled["baseline_correct"] - pooled["baseline_only"]
        )
        # The validation accuracy is the clients' correct answers over all their validation examples.
        assert abs(rec["val_accuracy"] * n_val - round(rec["val_accuracy"] * n_val)) < 1e-9
        reported = [u.metrics for u in sent[rec["round"]].values()]
        assert rec["val_accuracy"] == pytest.approx(
            sum(m.val_samples * m.global_val_accuracy for m in reported) / n_val, rel=1e-12
        )
    # A round's upload is kilobytes: the mean (d floats) and a few sigmas, never a prompt or a model.
    assert all(0 < rec["bytes_up"] < 2 * 8 * 1024 and rec["bytes_down"] > 0 for rec in history)
    assert sum(s.costs.queries for s in services) == sum(r["queries"] for r in history)


@pytest.mark.parametrize("strategy", ["fedbpt", "fedavg-z"])
def test_two_rounds_two_clients_on_a_causal_lm(smol, default_data_dir, tmp_path, strategy):
    engine, url = smol
    task = get_task("rotten_tomatoes")
    train = load_splits("default", task)["train"]
    shards = [client_shard(train, k, 2, alpha=0.5, seed=0, per_class=6) for k in range(2)]
    config = RunConfig(
        run_id="e2e",
        strategy=strategy,
        rounds=2,
        intrinsic_dim=16,
        prompt_length=2,
        local_popsize=4,
        local_iterations=2,
        min_clients=2,
        round_timeout_s=300,
    )
    status, final, services, sent, tasks = run_federation(url, config, shards, task, tmp_path)
    check_the_rounds(status, config, shards, services, sent, perturb=strategy == "fedbpt")
    assert status["history"][0]["val_accuracy"] == pytest.approx(
        zero_shot_val_accuracy(engine, config, shards, task), rel=1e-12
    )
    if config.strategy != "fedavg-z":
        check_round_zero_by_twin(config, status, sent, tasks)
    check_the_merges(config, status, final, sent)


@pytest.mark.parametrize(
    "strategy,rule,bias,basis",
    [
        ("fedbpt", "pooled", "none", "normal"),
        ("fedbpt-noperturb", "paper-eq6", "none", "normal"),
        ("fedbpt", "pooled", "fitted", "embeddings"),
    ],
)
def test_two_rounds_two_clients_on_a_masked_lm(roberta, tmp_path, strategy, rule, bias, basis):
    """The masked-LM path end to end: the template's {mask} is the model's <mask>, the prompt follows <s>. The
    second run takes the paper's sigma rule, and its clients' fitness is the plain loss; the third scores its
    candidates at a fitted label bias through the embedding basis (seed + z), with the same calls and sequences."""
    engine, url = roberta
    task = get_task("sst2")  # " bad" / " great": single tokens of the tiny vocabulary
    examples = [Example({"text": t}, int("great" in t)) for t in TINY_CORPUS] * 2
    shards = [ClientData(examples[k::2][:5], examples[k::2][5:]) for k in range(2)]
    config = RunConfig(
        run_id="masked",
        strategy=strategy,
        sigma_rule=rule,
        fitness_bias=bias,
        projection_basis=basis,
        rounds=2,
        intrinsic_dim=8,
        prompt_length=3,
        local_popsize=4,
        local_iterations=2,
        min_clients=2,
        round_timeout_s=300,
    )
    status, final, services, sent, tasks = run_federation(url, config, shards, task, tmp_path)
    assert engine.info.kind == "masked"
    check_the_rounds(status, config, shards, services, sent, perturb=strategy == "fedbpt")
    assert status["history"][0]["val_accuracy"] == pytest.approx(
        zero_shot_val_accuracy(engine, config, shards, task), rel=1e-12
    )
    check_round_zero_by_twin(config, status, sent, tasks)
    check_the_merges(config, status, final, sent)
