"""The Python API: run a federation on loopback and get its report, or put a prompt file to use against a service.

    from fedbpt.api import Classifier, local_service, run_federation

    report = run_federation(rounds=2, clients=2)  # the demo's defaults for everything not given
    print(report.served, report.served_test_accuracy, report.prompt_path)
    with local_service() as (url, key), Classifier.open(report.prompt_path, url, key) as clf:
        clf.predict(["A sturdy, well made lamp."])

These are the objects the command line runs (`fedbpt demo`, `fedbpt predict`, `fedbpt evaluate`), not a second
implementation; docs/api.md has the whole surface.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .demo import DemoConfig, config_from, run_demo


@dataclass(frozen=True)
class RunReport:
    """A finished loopback run: test accuracies of every baseline and of what the run serves, on held-out data."""

    name: str
    path: Path  # the run's folder: report.json, rounds.csv, accuracy.png, prompt.json, logs/
    served: str  # "tuned" or "baseline": what the prompt file serves
    served_test_accuracy: float
    zero_shot_test_accuracy: float
    calibrated_zero_shot_test_accuracy: float
    tuned_test_accuracy: float
    tuned_calibrated_test_accuracy: float
    served_vs_calibrated_p: float
    test_examples: int
    rounds: list[dict[str, Any]]  # one row per round: validation accuracy, queries, bytes, seconds
    raw: dict[str, Any]  # report.json as written

    @property
    def prompt_path(self) -> Path:
        """The prompt file to deploy (`Classifier.open`, `fedbpt predict --prompt`)."""
        return self.path / "prompt.json"

    @classmethod
    def from_report(cls, report: Mapping[str, Any], path: Path) -> RunReport:
        names = {f.name for f in dataclasses.fields(cls)} - {"path", "raw"}
        return cls(path=path, raw=dict(report), **{k: report[k] for k in names})


def run_federation(config: DemoConfig | None = None, **settings: Any) -> RunReport:
    """A federated run on loopback: the service on the embedded model, an aggregator and `clients` client
    processes, then every baseline scored on held-out test data; what `fedbpt demo` runs.

    `settings` are DemoConfig fields (e.g. rounds=2, clients=3, task="my_task.json", data="mine.csv") over the
    CPU preset, or over `config` where given; RunConfig fields DemoConfig does not name go in `run={...}`."""
    if config is None:
        config = config_from({"preset": "cpu", **settings}, has_cuda=lambda: False)
    elif settings:
        config = dataclasses.replace(config, **settings)
    report = run_demo(config)
    return RunReport.from_report(report, Path(config.runs_dir) / config.name)


@contextlib.contextmanager
def local_service(
    model: str = DemoConfig.model, dtype: str = "auto", log_dir: str | Path | None = None
) -> Iterator[tuple[str, str]]:
    """`fedbpt serve` as a child process on 127.0.0.1 with a fresh API key: yields (its URL, the key) once it answers,
    and stops it on exit. Its log goes to `log_dir` (default: a temporary folder)."""
    import secrets
    import tempfile

    from .launch import Children, free_url, service_argv

    key = secrets.token_urlsafe(16)
    url, port = free_url()
    with contextlib.ExitStack() as stack:
        folder = Path(log_dir) if log_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        children = stack.enter_context(Children(folder))
        children.start_healthy("service", service_argv(port, model, dtype), url, env={"FEDBPT_API_KEYS": key})
        yield url, key


class Classifier:
    """A prompt file against a service that serves its model: the served prompt (tuned or the baseline) with its
    label bias, as `fedbpt predict` applies it. Checks the key, the model and the label words on opening."""

    def __init__(self, prompt, tuned, manual, service):
        self.prompt, self._tuned, self._manual, self.service = prompt, tuned, manual, service

    @classmethod
    def open(
        cls,
        prompt: str | Path,
        service: str,
        api_key: str | None = None,
        *,
        ca_cert: str | None = None,
        timeout: float = 300.0,
    ) -> Classifier:
        from fed_clients.client import PromptScorer
        from fed_clients.preflight import check_service
        from fed_clients.prompt_file import read_prompt
        from fed_clients.runner import START_RETRIES
        from fed_clients.service_client import ServiceClient

        tuned_prompt = read_prompt(str(prompt))
        client = ServiceClient(
            service, api_key, name="service", timeout=timeout, verify=ca_cert or True, retries=START_RETRIES
        )
        try:
            info = check_service(client, tuned_prompt.placed)
            tuned_prompt.check_model(info)
        except BaseException:
            client.close()
            raise
        # z and the seed travel instead of L x D floats per prompt, where the service takes that form.
        client.prompt_wire = "seed" if info.max_projection_values is not None else "float32"
        tuned = PromptScorer.for_run(client, tuned_prompt.task, tuned_prompt.config, info)
        manual = PromptScorer.manual(client, tuned_prompt.task, info)
        return cls(tuned_prompt, tuned, manual, client)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.prompt.task.names)

    @property
    def queries(self) -> int:
        """Service queries made so far through this classifier."""
        return int(self.service.costs.queries)

    def _examples(self, texts: Iterable[str | Mapping[str, str]]) -> list:
        from fed_clients.data import Example

        fields = self.prompt.task.fields
        out = []
        for text in texts:
            if isinstance(text, str):
                if len(fields) != 1:
                    raise ValueError(f"the task takes {len(fields)} fields {list(fields)}: pass a dict per text")
                out.append(Example({fields[0]: text}, 0))
            else:
                missing = [f for f in fields if f not in text]
                if missing:
                    raise ValueError(f"a text lacks the task's field(s) {missing}")
                out.append(Example({f: str(text[f]) for f in fields}, 0))
        return out

    def logits(self, examples: Sequence, which: str = "served") -> np.ndarray:
        """[N, C] logits of `examples` (fed_clients.data.Example) under the served prompt with its bias ('served'),
        the file's soft prompt as it comes ('tuned') or the template alone ('manual')."""
        if which == "manual" or (which == "served" and self.prompt.served == "baseline"):
            raw = self._manual.logits(None, list(examples))[0]
        elif which in ("served", "tuned"):
            raw = self._tuned.logits((self.prompt.served_z if which == "served" else self.prompt.z)[None], examples)[0]
        else:
            raise ValueError(f"which must be 'served', 'tuned' or 'manual', got {which!r}")
        return self.prompt.read_out(raw) if which == "served" else raw

    def probabilities(self, texts: Iterable[str | Mapping[str, str]]) -> np.ndarray:
        """[N, C] label probabilities of the served prompt, columns in `labels` order."""
        logits = self.logits(self._examples(texts))
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def predict(self, texts: Iterable[str | Mapping[str, str]]) -> list[str]:
        """A label name per text: a plain string where the task has one field, else a dict of its fields."""
        return [self.labels[i] for i in self.probabilities(texts).argmax(-1)]

    def evaluate(self, data: str | Path | Sequence, baseline: bool = False) -> dict[str, Any]:
        """Accuracy, macro-F1 and confusion of the served prompt and of the file's soft prompt without a bias
        ('tuned'), and with `baseline` of the manual prompt, on labelled data (a file as `fedbpt client` reads,
        or fed_clients.data.Example objects)."""
        from fed_clients.data import read_examples
        from fed_clients.evaluation import classification_metrics

        task = self.prompt.task
        examples = read_examples(str(data), task) if isinstance(data, (str, Path)) else list(data)
        labels = np.array([ex.label for ex in examples])
        tuned = self.logits(examples, "tuned")
        manual = self.logits(examples, "manual") if baseline or self.prompt.served == "baseline" else None
        served = self.prompt.read_out(tuned if self.prompt.served == "tuned" else manual)
        results = {
            # What `predict` answers: the served prompt, its label bias applied.
            "served": classification_metrics(labels, served.argmax(-1), task.num_classes),
            # The file's soft prompt read out as it comes, without a bias (the key's meaning before served prompts).
            "tuned": classification_metrics(labels, tuned.argmax(-1), task.num_classes),
        }
        if baseline and manual is not None:
            results["manual"] = classification_metrics(labels, manual.argmax(-1), task.num_classes)
        return {"examples": len(examples), **results}

    def close(self) -> None:
        self.service.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
