"""One method on one setting of a grid: the baselines in-process against the service, each federated run as
real processes (a fresh aggregator and K `fedbpt client`s, exactly what a user runs), FedPrompt in its own
process.

One inference service serves the whole grid. The bench only watches a federated run: it polls the
aggregator's status, reads the global prompt at the start of every round with the operator key, and scores
those prompts on held-out test data afterwards (queries it makes itself are not charged to the method).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fedbpt_wire.round_table import round_table

from ..launch import Children, FederationResult, LoopbackFederation, PeakMemory, free_url, service_argv, spawn
from .grid import Grid, Setting
from .icl import icl_evaluate, pick_demos

# A federated run's rounds in runs.jsonl.
RUN_COLUMNS = (
    "round",
    "state",
    "val_accuracy",
    "queries",
    "sequences",
    "tokens",
    "service_bytes_up",
    "service_bytes_down",
    "bytes_up",
    "bytes_down",
    "clipped",
    "clients",
)

log = logging.getLogger(__name__)


class Bench:
    def __init__(self, grid: Grid, out: Path, service_url: str | None = None, api_key: str | None = None):
        self.grid, self.out = grid, out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results_path = out / "runs.jsonl"
        self.done = {}
        if self.results_path.exists():
            for line in self.results_path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.done[row["key"]] = row
        self.service_url, self.api_key = service_url, api_key
        self.children = Children(self.logs)
        self.enroll_key = secrets.token_urlsafe(16)
        self.operator_key = secrets.token_urlsafe(16)

    @contextlib.contextmanager
    def service(self):
        started = self.service_url is None
        if started:
            self.api_key = secrets.token_urlsafe(16)
            self.service_url, port = free_url()
            self.children.start_healthy(
                "service",
                service_argv(port, self.grid.model, self.grid.dtype),
                self.service_url,
                env={"FEDBPT_API_KEYS": self.api_key},
            )
        try:
            yield
        finally:
            if started:
                self.children.stop("service")

    def _service_client(self):
        from fed_clients.service_client import ServiceClient

        return ServiceClient(self.service_url, self.api_key, timeout=600)

    # ------------------------------------------------------------------ the grid

    def settings(self) -> list[Setting]:
        g = self.grid
        return [Setting(t, r, a, s) for t in g.tasks for r in g.regimes for a in g.alphas for s in g.seeds]

    def run(self, progress=print) -> list[dict]:
        from fed_clients.data import load_splits
        from fed_clients.tasks import get_task

        settings = self.settings()
        todo = [(s, m) for s in settings for m in self.grid.methods]
        if all(s.key(m) in self.done for s, m in todo):
            return [self.done[s.key(m)] for s, m in todo]
        with self.service():
            for task_name in self.grid.tasks:
                task = get_task(task_name, self.grid.label_words or None)
                splits = load_splits(self.grid.data, task)
                test = splits["test"][: self.grid.test_size]
                for n, (setting, method) in enumerate(todo, 1):
                    if setting.task != task_name:
                        continue
                    key = setting.key(method)
                    if key in self.done:
                        continue
                    t0 = time.monotonic()
                    row = self.run_one(setting, method, task, splits["train"], test)
                    row.update(
                        key=key,
                        method=method,
                        **asdict(setting),
                        partition=setting.partition,
                        wall_seconds=time.monotonic() - t0,
                    )
                    with open(self.results_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    self.done[key] = row
                    progress(
                        f"[{n}/{len(todo)}] {key}: test accuracy {row['test_accuracy']:.4f}, "
                        f"{row.get('queries', 0)} queries, {row['wall_seconds']:.0f} s"
                    )
        return [self.done[s.key(m)] for s in settings for m in self.grid.methods]

    def run_one(self, setting: Setting, method: str, task, train, test) -> dict:
        if method == "zero-shot":
            return self._zero_shot(task, test)
        if method == "calibrated":
            return self._calibrated(setting, task, train, test)
        if method == "icl":
            return self._icl(setting, task, train, test)
        if method == "fedprompt":
            return self._fedprompt(setting, test)
        return self._federated(setting, method, task, test)

    def _pool(self, setting: Setting, train):
        """What the clients hold between them: the few-shot sample of the shared pool."""
        from fed_clients.partition import few_shot

        per_class = self.grid.regimes[setting.regime]
        if not per_class:
            return list(train)
        labels = np.array([ex.label for ex in train])
        return [train[i] for i in few_shot(labels, per_class, setting.seed)]

    def _zero_shot(self, task, test) -> dict:
        # The manual prompt depends on neither seed nor partition: one evaluation per task serves every setting.
        for row in self.done.values():
            if row["method"] == "zero-shot" and row["task"] == task.name:
                return {
                    k: v
                    for k, v in row.items()
                    if k not in ("key", "seed", "regime", "alpha", "partition", "wall_seconds")
                }
        service = self._service_client()
        try:
            info = service.model_info()
            res = icl_evaluate(service, task, [], test, info.kind, info.max_texts)
        finally:
            service.close()
        # The manual prompt costs nothing to train: its only queries are the evaluation's.
        return _untrained_row(
            res["accuracy"],
            res["loss"],
            _correct(res["logits"], test),
            "nothing (a fixed template)",
            test_logits=res["logits"].tolist(),
        )

    def _calibrated(self, setting: Setting, task, train, test) -> dict:
        """The manual prompt with its label bias fitted on the clients' pooled few-shot examples (no tuning)."""
        from fed_clients.evaluation import calibrated_predictions, fit_calibration

        zero = self._zero_shot(task, test)
        pool = self._pool(setting, train)
        service = self._service_client()
        try:
            info = service.model_info()
            fitted = icl_evaluate(service, task, [], pool, info.kind, info.max_texts)
        finally:
            service.close()
        bias = fit_calibration(fitted["logits"], np.array([ex.label for ex in pool]))
        logits = np.asarray(zero["test_logits"])
        correct = calibrated_predictions(logits, bias) == np.array([ex.label for ex in test])
        return _untrained_row(
            float(correct.mean()),
            None,
            correct.astype(int).tolist(),
            "a label bias (C floats) fitted on its own examples",
            queries=fitted["queries"],
            sequences=fitted["sequences"],
            service_bytes_up=fitted["bytes_up"],
            service_bytes_down=fitted["bytes_down"],
        )

    def _icl(self, setting: Setting, task, train, test) -> dict:
        demos = pick_demos(self._pool(setting, train), self.grid.icl_shots, setting.seed)
        service = self._service_client()
        try:
            info = service.model_info()
            res = icl_evaluate(service, task, demos, test, info.kind, info.max_texts)
        finally:
            service.close()
        # Demonstrations travel with every test query: that is ICL's cost, paid at inference, not in training.
        return _untrained_row(
            res["accuracy"],
            res["loss"],
            _correct(res["logits"], test),
            f"{len(demos)} labelled demonstrations",
            inference_tokens_per_example=res["tokens"] / max(1, res["sequences"]),
        )

    def _federated(self, setting: Setting, method: str, task, test) -> dict:
        g = self.grid
        name = setting.key(method).replace("/", "_")
        run_dir = self.out / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        db = run_dir / "aggregator.db"
        if db.exists():
            db.unlink()  # a run cut off half way starts again: its clients are gone
        clients = 1 if method == "centralized" else g.clients
        per_class = g.regimes[setting.regime]
        assert self.service_url is not None, "runs happen inside Bench.service()"
        client_options = [
            {
                "data": g.data,
                "task": setting.task,
                "partition": f"{k}/{clients}",
                "partition_seed": setting.seed,
                "batch_size": g.batch_size,
                "prompt_wire": g.prompt_wire,
                "label_words": g.label_words or None,
                "per_class": per_class or None,
                "alpha": setting.alpha if clients > 1 else None,
                # Tokens and prompt files stay with their run, not in the home folder or the working directory.
                "state_dir": run_dir / "state",
                "prompt_out": run_dir / f"prompt-client-{k}.json",
            }
            for k in range(clients)
        ]
        with Children(self.logs) as run:
            federation = LoopbackFederation(
                run,
                db,
                {"run_id": name, **g.run_config(method, setting.seed, clients)},
                self.service_url,
                self.api_key or "",
                client_options,
                prefix=f"{name}-",
                enroll_key=self.enroll_key,
                operator_key=self.operator_key,
                poll_s=0.2,
            )
            result = federation.run(client_exit_s=120)
        if any(code != 0 for code in result.client_exit_codes):
            raise RuntimeError(f"a client of {name} failed; see {self.logs}")
        return self._score_run(method, task, test, result)

    def _score_run(self, method: str, task, test, result: FederationResult) -> dict:
        from fed_clients.client import PromptScorer
        from fedbpt_wire.metrics import label_cross_entropy
        from fedbpt_wire.tensors import decode_tensor

        g = self.grid
        config, final, means = result.status.config, result.final, result.means
        service = self._service_client()
        try:
            info = service.model_info()
            scorer = PromptScorer.for_run(service, task, config, info)
            curve_set = test[: g.curve_size]
            if method == "local-only":
                # Each client's own prompt, each on its own slice of the test set: the mean over clients of
                # their accuracy, for the price of one pass over the test set.
                own = [decode_tensor(t) for _, t in sorted((final.client_means or {}).items())]
                slices = np.array_split(np.arange(len(test)), len(own))
                correct = np.zeros(len(test), int)
                for z, idx in zip(own, slices):
                    if len(idx):
                        correct[idx] = _correct(
                            scorer.logits(z[None], [test[i] for i in idx])[0], [test[i] for i in idx]
                        )
                test_acc, test_loss, curve = float(correct.mean()), None, []
            else:
                curve = [
                    float(scorer.evaluate(means[r][None], curve_set).accuracy[0]) if r in means else None
                    for r in range(g.rounds + 1)
                ]
                logits = scorer.logits(decode_tensor(final.mean)[None], test)
                correct = np.array(_correct(logits[0], test))
                loss, acc = label_cross_entropy(logits, np.array([ex.label for ex in test]))
                test_acc, test_loss = float(acc[0]), float(loss[0])
        finally:
            service.close()
        rounds = round_table(result.status.history, RUN_COLUMNS)
        return {
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "curve": curve,
            "rounds": rounds,
            "correct": [int(c) for c in correct],
            "queries": sum(r["queries"] for r in rounds),
            "sequences": sum(r["sequences"] for r in rounds),
            "tokens": sum(r["tokens"] for r in rounds),
            "bytes_up": sum(r["bytes_up"] for r in rounds),
            "bytes_down": sum(r["bytes_down"] for r in rounds),
            "service_bytes_up": sum(r["service_bytes_up"] for r in rounds),
            "service_bytes_down": sum(r["service_bytes_down"] for r in rounds),
            "clients": len(result.client_peak_rss_mb),
            "client_rss_mb": max(result.client_peak_rss_mb),
            "client_holds": "no model: API key, d-dim mean, own data",
        }

    def _fedprompt(self, setting: Setting, test) -> dict:
        g = self.grid
        name = setting.key("fedprompt").replace("/", "_")
        spec = {
            "model": g.model,
            "dtype": g.dtype,
            "task": setting.task,
            "data": g.data,
            "clients": g.clients,
            "alpha": setting.alpha,
            "seed": setting.seed,
            "per_class": g.regimes[setting.regime],
            "rounds": g.rounds,
            "local_steps": g.fedprompt_steps,
            "lr": g.fedprompt_lr,
            "prompt_length": g.prompt_length,
            "batch_size": g.batch_size,
            "test_size": g.test_size,
            "curve_size": g.curve_size,
        }
        spec_path, out_path = self.logs / f"{name}.spec.json", self.logs / f"{name}.out.json"
        spec_path.write_text(json.dumps(spec))
        # Its own process: the peak memory of a client that must hold the model is part of the result.
        proc = spawn([str(spec_path), str(out_path)], self.logs / f"{name}.log", module="fedbpt.bench.fedprompt_job")
        memory = PeakMemory([proc])
        while proc.poll() is None:
            memory.sample()
            time.sleep(0.5)
        code, rss = proc.returncode, memory.peak[0]
        if code != 0:
            raise RuntimeError(f"FedPrompt for {name} exited with {code}; see {self.logs / (name + '.log')}")
        res = json.loads(out_path.read_text())
        rounds = [
            {
                "round": r["round"],
                "state": "merged",
                "queries": 0,
                "sequences": 0,
                "tokens": 0,
                "bytes_up": r["bytes_up"],
                "bytes_down": r["bytes_down"],
                "service_bytes_up": 0,
                "service_bytes_down": 0,
                "val_accuracy": None,
                "clients": g.clients,
            }
            for r in res["rounds"]
        ]
        return {
            "test_accuracy": res["test_accuracy"],
            "test_loss": res["test_loss"],
            "curve": [res["initial_curve_accuracy"]] + [r["curve_accuracy"] for r in res["rounds"]],
            "rounds": rounds,
            "queries": 0,
            "sequences": 0,
            "tokens": 0,
            "bytes_up": res["bytes_up"],
            "bytes_down": res["bytes_down"],
            "service_bytes_up": 0,
            "service_bytes_down": 0,
            "clients": g.clients,
            "client_rss_mb": rss,
            "client_holds": f"the model ({res['client_model_bytes'] / 2**20:.0f} MiB of weights) and gradients",
        }


def _untrained_row(
    accuracy: float,
    loss: float | None,
    correct: list[int],
    holds: str,
    *,
    queries: int = 0,
    sequences: int = 0,
    service_bytes_up: int = 0,
    service_bytes_down: int = 0,
    **extra,
) -> dict:
    """A method without federated training (zero-shot, calibrated, in-context): no rounds, no aggregator bytes,
    and only the service queries it spends fitting anything before the test."""
    return {
        "test_accuracy": accuracy,
        "test_loss": loss,
        "queries": queries,
        "sequences": sequences,
        **extra,
        "correct": correct,
        "bytes_up": 0,
        "bytes_down": 0,
        "service_bytes_up": service_bytes_up,
        "service_bytes_down": service_bytes_down,
        "curve": [],
        "rounds": [],
        "client_rss_mb": None,
        "client_holds": holds,
    }


def _correct(logits, examples) -> list[int]:
    """Per test example, 1 where the prediction is right: what the paired tests compare."""
    return (np.asarray(logits).argmax(-1) == np.array([ex.label for ex in examples])).astype(int).tolist()
