"""One FedBPT client's work in a round: evaluate the global prompt, search locally, report.

The client sees only label-word logits from the service; its examples never leave it except as
texts sent to the service to be scored, and labels never leave it at all: losses are computed here.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import numpy as np

from fedbpt_wire.federation import ClientCosts, ClientMetrics, RoundTask, RunConfig, UpdateRequest
from fedbpt_wire.metrics import debiased_cross_entropy, label_cross_entropy
from fedbpt_wire.projection import Projection, projection_for
from fedbpt_wire.schemas import ModelInfo
from fedbpt_wire.served import ValidationComparison
from fedbpt_wire.tensors import decode_tensor, encode_tensor

from .data import Example
from .evaluation import calibrated_comparison
from .http import RequestFailed
from .local_search import cma_seed, local_search
from .perturb import corpus_words, perturb_examples
from .service_client import ServiceClient, request_chunks
from .tasks import Task, with_placement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    loss: np.ndarray  # [P]
    accuracy: np.ndarray  # [P]


class PromptScorer:
    """Scores z vectors (through the shared projection) on labelled examples via the service."""

    def __init__(self, service: ServiceClient, task: Task, projection: Projection | None, kind: str, max_texts: int):
        self.service = service
        self.task = task
        self.projection = projection
        self.kind = kind
        self.max_texts = max_texts

    @classmethod
    def manual(cls, service: ServiceClient, task: Task, info: ModelInfo) -> PromptScorer:
        """The template alone, no soft prompt: the manual-prompt baseline."""
        return cls(service, task, None, info.kind, info.max_texts)

    @classmethod
    def for_run(cls, service: ServiceClient, task: Task, config: RunConfig, info: ModelInfo) -> PromptScorer:
        """A run's soft prompts (z through its shared projection), placed in the template as the run places them."""
        return cls(
            service,
            with_placement(task, config.prompt_placement),
            projection_for(config, info),
            info.kind,
            info.max_texts,
        )

    def prompts(self, z: np.ndarray | None, population: int = 1) -> np.ndarray:
        if z is None or self.projection is None:
            # No soft prompt: the bare template, i.e. the manual-prompt zero-shot baseline.
            return np.zeros((population, 0, self.service.model_info().hidden_size), np.float32)
        return self.projection(z)

    def logits(self, z: np.ndarray | None, examples: list[Example]) -> np.ndarray:
        """[P, N, C], in as many service calls as the service's `max_texts` and `max_request_tokens` require."""
        texts = [self.task.render(ex.fields, self.kind) for ex in examples]
        words = list(self.task.label_words)
        if z is not None and self.projection is not None:
            z, projection = np.atleast_2d(z), self.projection

            def send(chunk):
                return self.service.score_population(z, projection, chunk, words).logits
        else:
            prompts = self.prompts(z)

            def send(chunk):
                return self.service.score(prompts, chunk, words).logits

        population = 1 if z is None else np.atleast_2d(z).shape[0]
        length = 0 if z is None or self.projection is None else self.projection.prompt_length
        chunks = request_chunks(texts, population, length, self.service.model_info(), self.max_texts)
        return np.concatenate([_split_on_refusal(send, chunk) for chunk in chunks], axis=1)

    def evaluate(self, z: np.ndarray | None, examples: list[Example]) -> Evaluation:
        loss, acc = label_cross_entropy(self.logits(z, examples), np.array([ex.label for ex in examples]))
        return Evaluation(loss, acc)


def _split_on_refusal(send, chunk: list[str]) -> np.ndarray:
    # The client's token estimate is an upper bound for byte-level tokenizers only; where the service still finds
    # a request over its budget (413), half a request is tried, down to one text.
    try:
        return send(chunk)
    except RequestFailed as exc:
        if exc.status != 413 or len(chunk) == 1:
            raise
    half = len(chunk) // 2
    return np.concatenate([_split_on_refusal(send, chunk[:half]), _split_on_refusal(send, chunk[half:])], axis=1)


class FedBPTClient:
    def __init__(
        self,
        client_id: str,
        service: ServiceClient,
        task: Task,
        train: list[Example],
        val: list[Example],
        config: RunConfig,
        batch_size: int = 16,
    ):
        if not train:
            raise ValueError(f"client {client_id} has no training examples")
        self.client_id = client_id
        self.service = service
        self.manual_task = task
        self.train = train
        self.val = val
        self.config = config
        self.batch_size = batch_size
        info = service.model_info()
        self.scorer = PromptScorer.for_run(service, task, config, info)
        self.words = corpus_words(train)
        self.tag = zlib.crc32(client_id.encode())
        self._baseline: np.ndarray | None = None

    def baseline_logits(self) -> np.ndarray:
        """The manual prompt (the template alone) on train + validation [N, C]: the baseline every round's
        global prompt competes with. Scored once: it never changes."""
        if self._baseline is None:
            info = self.service.model_info()
            manual = PromptScorer.manual(self.service, self.manual_task, info)
            self._baseline = manual.logits(None, self.train + self.val)[0]
        return self._baseline

    def compare_logits(self, logits: np.ndarray) -> tuple[Evaluation, ValidationComparison]:
        """A prompt's raw metrics on the validation split and its comparison with the baseline there, each read
        out with its bias fitted on the training split, from its logits [N, C] on train + validation."""
        n = len(self.train)
        base = self.baseline_logits()
        train_labels = np.array([ex.label for ex in self.train])
        val_labels = np.array([ex.label for ex in self.val])
        loss, acc = label_cross_entropy(logits[None, n:], val_labels)
        comparison = calibrated_comparison(logits[:n], logits[n:], base[:n], base[n:], train_labels, val_labels)
        return Evaluation(loss, acc), comparison

    def _batches(self, round_id: int) -> list[np.ndarray]:
        """One mini-batch per local iteration, seeded by (run, client, round)."""
        rng = np.random.default_rng([self.config.seed, self.tag, round_id, 5])
        n = len(self.train)
        if n <= self.batch_size:
            return [np.arange(n)] * self.config.local_iterations
        return [np.sort(rng.choice(n, self.batch_size, replace=False)) for _ in range(self.config.local_iterations)]

    def _fitness_parts(
        self, z: np.ndarray, idx: np.ndarray, perturbed: list[Example] | None, bias: np.ndarray | None = None
    ):
        """Loss and accuracy on the batch, and (perturbation on) the loss on its perturbed copy, in ONE call;
        `bias` [C] is added to every logit first (fitness_bias 'fitted')."""
        batch = [self.train[i] for i in idx]
        examples = batch + ([perturbed[i] for i in idx] if perturbed is not None else [])
        labels = np.array([ex.label for ex in examples])
        logits = self.scorer.logits(z, examples)
        if bias is not None:
            logits = logits + bias
        loss, acc = label_cross_entropy(logits[:, : len(batch)], labels[: len(batch)])
        if perturbed is None:
            return loss, acc, loss
        noisy_loss, _ = label_cross_entropy(logits[:, len(batch) :], labels[len(batch) :])
        return loss, acc, loss / np.maximum(noisy_loss, 1e-12)

    def run_round(self, task: RoundTask) -> UpdateRequest:
        cfg = self.config
        usage_before = self.service.usage()
        if task.mean is None:
            raise ValueError(f"round {task.round}: the aggregator sent a task without a mean")
        mean = decode_tensor(task.mean, "mean").astype(np.float64)
        if mean.shape != (cfg.intrinsic_dim,):
            raise ValueError(f"global mean has shape {mean.shape}, expected ({cfg.intrinsic_dim},)")
        metrics = {}
        bias = None
        fitted = cfg.fitness_bias == "fitted"
        if self.val or fitted:
            # One call scores the global mean on train + validation: the round's metrics and the fitted bias.
            mean_logits = self.scorer.logits(mean[None], self.train + self.val)[0]
        if fitted:
            train_labels = np.array([ex.label for ex in self.train])
            bias = debiased_cross_entropy(mean_logits[None, : len(self.train)], train_labels)[1][0]
        if self.val:
            ev, comparison = self.compare_logits(mean_logits)
            metrics = {
                "global_val_loss": float(ev.loss[0]),
                "global_val_accuracy": float(ev.accuracy[0]),
                "val_samples": len(self.val),
                "vs_baseline": comparison,
            }
        perturbed = None
        # The strategy's rule comes with the task; an aggregator from before that field leaves it to the config.
        if cfg.perturb if task.perturb is None else task.perturb:
            perturbed = perturb_examples(self.train, cfg.perturb_rate, self.words, [cfg.seed, self.tag, task.round, 6])
        batches = self._batches(task.round)
        result = local_search(
            lambda z, it: self._fitness_parts(z, batches[it], perturbed, bias)[2],
            mean,
            task.local_sigma or task.sigma or cfg.sigma0,
            cfg.local_popsize,
            cfg.local_iterations,
            cma_seed(cfg.seed, self.tag, task.round),
        )
        # The reported fitness ranks this client's mean against the others' in the merge: measured on the
        # whole local shard, not on whichever mini-batch came last.
        loss, acc, fitness = self._fitness_parts(result.mean[None], np.arange(len(self.train)), perturbed, bias)
        spent = self.service.usage() - usage_before
        log.info(
            "%s round %d: local loss %.4f acc %.3f fitness %.4f sigma %.3f -> %.3f",
            self.client_id,
            task.round,
            loss[0],
            acc[0],
            fitness[0],
            task.local_sigma or 0,
            result.final_sigma,
        )
        return UpdateRequest(
            round=task.round,
            mean=encode_tensor(result.mean),
            fitness=float(fitness[0]),
            sigmas=result.sigmas,
            final_sigma=result.final_sigma,
            num_samples=len(self.train),
            metrics=ClientMetrics(local_loss=float(loss[0]), local_accuracy=float(acc[0]), **metrics),
            costs=ClientCosts(
                queries=spent.queries,
                sequences=spent.sequences,
                tokens=spent.tokens,
                service_bytes_up=spent.bytes_up,
                service_bytes_down=spent.bytes_down,
            ),
        )
