"""`fedbpt bench`: every method on the same model, data, partitions and seeds; accuracy against the queries
and bytes it took, measured on the wire.

One inference service serves the whole grid. Each federated run gets a fresh aggregator process and K
client processes (`fedbpt client`, exactly what a user runs); the bench only watches: it polls the
aggregator's status, reads the global prompt at the start of every round with the operator key, and
scores those prompts on held-out test data afterwards (queries it makes itself are not charged to the
method). Every finished run is appended to `runs.jsonl` at once, so an interrupted grid resumes where it
stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import httpx
import numpy as np

from fedbpt_wire.federation import STRATEGIES

log = logging.getLogger(__name__)

BLACK_BOX = STRATEGIES
METHODS = ("zero-shot", "calibrated", "icl", *BLACK_BOX, "fedprompt")
LABELS = {"zero-shot": "zero-shot (manual prompt)", "calibrated": "calibrated zero-shot",
          "icl": "in-context (5 demos)", "fedbpt": "FedBPT",
          "fedbpt-noperturb": "FedBPT w/o perturbation", "fedavg-z": "FedBBT (FedAvg of z)",
          "centralized": "centralized BBT", "local-only": "local-only BBT", "fedprompt": "FedPrompt (white-box)"}
# RoBERTa-large, non-IID SST-2 (FedBPT paper, Table 2), beside which ours is read.
PAPER_SST2 = {"fedbpt": 86.47, "fedavg-z": 84.17, "zero-shot": 83.6, "icl": 79.7, "fedprompt": 85.55}


@dataclass
class Grid:
    name: str
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    tasks: tuple[str, ...] = ("rotten_tomatoes", "amazon_snippets")
    data: str = "default"  # 'default' (each task's embedded set), 'hf', or a directory
    # Few-shot: examples per class in the whole pool, as the paper's 40; None = every training example.
    regimes: dict[str, int | None] = field(default_factory=lambda: {"few-shot": 40})
    alphas: tuple[float | None, ...] = (0.5,)  # Dirichlet alpha; None = IID
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    clients: int = 10
    rounds: int = 4
    intrinsic_dim: int = 50
    prompt_length: int = 5
    popsize: int = 4
    local_iterations: int = 2
    batch_size: int = 8
    sigma0: float = 1.0
    test_size: int = 300
    curve_size: int = 100  # test examples the per-round curves are scored on
    icl_shots: int = 5
    fedprompt_steps: int = 4
    fedprompt_lr: float = 0.01
    prompt_wire: str = "seed"
    prompt_init: str = "zeros"
    prompt_placement: str = "after-text"
    label_words: str = ""  # comma-separated verbalizer replacing each task's, e.g. " terrible, great"
    clip_multiple: float = 4.0  # the aggregator's bound on a client mean's distance (0: none)
    robust_merge: str = "none"  # fedavg-z's merge: none (weighted mean), median, trimmed-mean

    @classmethod
    def from_file(cls, path: str | Path) -> "Grid":
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - {"paper", "notes"})
        if unknown:
            raise ValueError(f"{path}: unknown grid keys {unknown}; known: {sorted(known)}")
        for key in ("tasks", "alphas", "seeds", "methods"):
            if key in raw:
                raw[key] = tuple(raw[key])
        bad = sorted(set(raw.get("methods", ())) - set(METHODS))
        if bad:
            raise ValueError(f"{path}: unknown methods {bad}; known: {list(METHODS)}")
        return cls(**{k: v for k, v in raw.items() if k in known})


GRIDS = {
    # Under 10 minutes on 2 cores: the demo's setting, one seed, a 200-example test slice.
    "quick": Grid("quick", tasks=("amazon_snippets",), label_words=" terrible, great", alphas=(None,), seeds=(0,),
                  methods=("zero-shot", "calibrated", "fedbpt-noperturb", "fedavg-z"), clients=4, rounds=2,
                  popsize=8, intrinsic_dim=50, local_iterations=2, batch_size=16, test_size=200, curve_size=50),
    # About an hour on 2 AVX2 cores (SmolLM2-135M in fp32 runs ~250 tokens/s there): the demo's setting
    # (Amazon snippets, " terrible"/" great", prompt after the text from zeros, IID), 3 seeds, the tuned methods
    # against zero-shot and the calibrated zero-shot, on the whole 1,000-example test split.
    "default": Grid("default", tasks=("amazon_snippets",), label_words=" terrible, great", alphas=(None,),
                    clients=4, rounds=4, popsize=8, intrinsic_dim=50, local_iterations=2, batch_size=16,
                    methods=("zero-shot", "calibrated", "fedbpt", "fedbpt-noperturb", "fedavg-z"), test_size=1000,
                    curve_size=50),
    # Both embedded tasks, both regimes, IID and three Dirichlet alphas: hours on a CPU, for a long run by hand.
    "full": Grid("full", regimes={"few-shot": 40, "larger": 400}, alphas=(None, 1.0, 0.5, 0.1)),
}


@dataclass(frozen=True)
class Setting:
    task: str
    regime: str
    alpha: float | None
    seed: int

    @property
    def partition(self) -> str:
        return "iid" if self.alpha is None else f"dir{self.alpha:g}"

    def key(self, method: str) -> str:
        return f"{self.task}/{self.regime}/{self.partition}/seed{self.seed}/{method}"


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set so far (VmHWM), None once it is gone.

    Read from /proc while it runs: the kernel's rusage for a child also counts the bench's own memory,
    which the child held between fork and exec.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """The highest VmHWM seen of each watched process; VmHWM only grows, so the last reading is the peak."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.peak = [0.0] * len(procs)

    def sample(self) -> None:
        for i, p in enumerate(self.procs):
            value = peak_rss_mb(p.pid)
            if value is not None:
                self.peak[i] = max(self.peak[i], value)


def first_reaching(curve: list[float | None], fraction: float = 0.95) -> int | None:
    """Index of the first point at `fraction` of the curve's last value."""
    if not curve or curve[-1] is None:
        return None
    target = fraction * curve[-1]
    return next(i for i, a in enumerate(curve) if a is not None and a >= target)


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
        self._service_proc: subprocess.Popen | None = None
        self.enroll_key = secrets.token_urlsafe(16)
        self.operator_key = secrets.token_urlsafe(16)

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "a") as out:  # the child keeps its own descriptor
            return subprocess.Popen([sys.executable, "-m", "fedbpt.cli", *args], stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def _wait_healthy(self, url: str, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}; see {self.logs}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise TimeoutError(f"{what} did not answer within {timeout:.0f} s")

    @contextlib.contextmanager
    def service(self):
        from fedbpt.loopback import free_port

        if self.service_url is None:
            self.api_key = secrets.token_urlsafe(16)
            port = free_port()
            self.service_url = f"http://127.0.0.1:{port}"
            self._service_proc = self._spawn("service", ["serve", "--port", str(port), "--model", self.grid.model,
                                                         "--dtype", self.grid.dtype],
                                             env={"FEDBPT_API_KEYS": self.api_key})
            self._wait_healthy(self.service_url, self._service_proc, "the inference service")
        try:
            yield
        finally:
            if self._service_proc is not None:
                self._service_proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._service_proc.wait(30)
                if self._service_proc.poll() is None:
                    self._service_proc.kill()

    def _service_client(self):
        from fed_clients.service_client import ServiceClient

        return ServiceClient(self.service_url, self.api_key, timeout=600)

    # ------------------------------------------------------------------ the grid

    def settings(self) -> list[Setting]:
        g = self.grid
        return [Setting(t, r, a, s) for t in g.tasks for r in g.regimes for a in g.alphas for s in g.seeds]

    def run(self, progress=print) -> list[dict]:
        from fed_clients.data import load_splits
        from fed_clients.tasks import get_task, parse_label_words

        settings = self.settings()
        todo = [(s, m) for s in settings for m in self.grid.methods]
        if all(s.key(m) in self.done for s, m in todo):
            return [self.done[s.key(m)] for s, m in todo]
        with self.service():
            for task_name in self.grid.tasks:
                task = get_task(task_name)
                if self.grid.label_words:
                    task = task.with_label_words(parse_label_words(self.grid.label_words))
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
                    row.update(key=key, method=method, **asdict(setting), partition=setting.partition,
                               wall_seconds=time.monotonic() - t0)
                    with open(self.results_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    self.done[key] = row
                    progress(f"[{n}/{len(todo)}] {key}: test accuracy {row['test_accuracy']:.4f}, "
                             f"{row.get('queries', 0)} queries, {row['wall_seconds']:.0f} s")
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
        from bench.baselines import icl_evaluate

        # The manual prompt depends on neither seed nor partition: one evaluation per task serves every setting.
        for row in self.done.values():
            if row["method"] == "zero-shot" and row["task"] == task.name:
                return {k: v for k, v in row.items() if k not in ("key", "seed", "regime", "alpha", "partition",
                                                                  "wall_seconds")}
        service = self._service_client()
        try:
            info = service.model_info()
            res = icl_evaluate(service, task, [], test, info.kind, info.max_texts)
        finally:
            service.close()
        # The manual prompt costs nothing to train: its only queries are the evaluation's.
        return {"test_accuracy": res["accuracy"], "test_loss": res["loss"], "queries": 0, "sequences": 0,
                "test_logits": res["logits"].tolist(), "correct": _correct(res["logits"], test),
                "bytes_up": 0, "bytes_down": 0, "service_bytes_up": 0, "service_bytes_down": 0, "curve": [],
                "rounds": [], "client_rss_mb": None, "client_holds": "nothing (a fixed template)"}

    def _calibrated(self, setting: Setting, task, train, test) -> dict:
        """The manual prompt with its label bias fitted on the clients' pooled few-shot examples (no tuning)."""
        from bench.baselines import icl_evaluate
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
        return {"test_accuracy": float(correct.mean()), "test_loss": None, "queries": fitted["queries"],
                "sequences": fitted["sequences"], "bytes_up": 0, "bytes_down": 0,
                "service_bytes_up": fitted["bytes_up"], "service_bytes_down": fitted["bytes_down"], "curve": [],
                "rounds": [], "correct": correct.astype(int).tolist(), "client_rss_mb": None,
                "client_holds": "a label bias (C floats) fitted on its own examples"}

    def _icl(self, setting: Setting, task, train, test) -> dict:
        from bench.baselines import icl_evaluate, pick_demos

        demos = pick_demos(self._pool(setting, train), self.grid.icl_shots, setting.seed)
        service = self._service_client()
        try:
            info = service.model_info()
            res = icl_evaluate(service, task, demos, test, info.kind, info.max_texts)
        finally:
            service.close()
        # Demonstrations travel with every test query: that is ICL's cost, paid at inference, not in training.
        return {"test_accuracy": res["accuracy"], "test_loss": res["loss"], "queries": 0, "sequences": 0,
                "correct": _correct(res["logits"], test),
                "bytes_up": 0, "bytes_down": 0, "service_bytes_up": 0, "service_bytes_down": 0, "curve": [],
                "rounds": [], "inference_tokens_per_example": res["tokens"] / max(1, res["sequences"]),
                "client_rss_mb": None, "client_holds": f"{len(demos)} labelled demonstrations"}

    def _federated(self, setting: Setting, method: str, task, test) -> dict:
        from fed_clients.aggregator_client import AggregatorClient
        from fedbpt.loopback import free_port
        from fedbpt_wire.tensors import decode_tensor

        g = self.grid
        run_dir = self.out / "runs" / setting.key(method).replace("/", "_")
        run_dir.mkdir(parents=True, exist_ok=True)
        db = run_dir / "aggregator.db"
        if db.exists():
            db.unlink()  # a run cut off half way starts again: its clients are gone
        clients = 1 if method == "centralized" else g.clients
        port = free_port()
        agg_url = f"http://127.0.0.1:{port}"
        name = setting.key(method).replace("/", "_")
        agg = self._spawn(f"{name}-aggregator", [
            "aggregator", "--port", str(port), "--db", str(db), "--run-id", name, "--strategy", method,
            "--rounds", str(g.rounds), "--intrinsic-dim", str(g.intrinsic_dim), "--prompt-length", str(g.prompt_length),
            "--sigma0", str(g.sigma0), "--local-popsize", str(g.popsize), "--local-iterations", str(g.local_iterations),
            "--seed", str(setting.seed), "--projection-seed", str(setting.seed), "--min-clients", str(clients),
            "--prompt-init", g.prompt_init, "--prompt-placement", g.prompt_placement,
            "--round-timeout", "3600", "--clip-multiple", str(g.clip_multiple), "--robust-merge", g.robust_merge],
            env={"FEDBPT_ENROLL_KEY": self.enroll_key, "FEDBPT_OPERATOR_KEY": self.operator_key})
        procs = []
        try:
            self._wait_healthy(agg_url, agg, "the aggregator")
            per_class = g.regimes[setting.regime]
            for k in range(clients):
                args = ["client", "--service", self.service_url, "--aggregator", agg_url, "--data", g.data,
                        "--task", setting.task, "--partition", f"{k}/{clients}", "--partition-seed", str(setting.seed),
                        "--batch-size", str(g.batch_size), "--prompt-wire", g.prompt_wire]
                if g.label_words:
                    args += ["--label-words", g.label_words]
                if per_class:
                    args += ["--per-class", str(per_class)]
                if setting.alpha is not None and clients > 1:
                    args += ["--alpha", str(setting.alpha)]
                procs.append(self._spawn(f"{name}-client-{k}", args,
                                         env={"FEDBPT_API_KEY": self.api_key, "FEDBPT_ENROLL_KEY": self.enroll_key}))
            memory = PeakMemory(procs)
            observer = AggregatorClient(agg_url, timeout=60)
            observer.http.set_token(self.operator_key)
            means: dict[int, np.ndarray] = {}
            while True:
                for p in procs:
                    if p.poll() not in (None, 0):
                        raise RuntimeError(f"a client of {name} exited with {p.returncode}; see {self.logs}")
                state = observer.global_state()
                if state.state != "waiting":
                    # The mean handed out at the start of round r (or, once done, the final one).
                    means.setdefault(state.round if state.state == "running" else g.rounds, decode_tensor(state.mean))
                memory.sample()
                if state.state == "done":
                    break
                time.sleep(0.2)
            final = observer.global_state()
            status = httpx.get(f"{agg_url}/v1/status", timeout=60,
                               headers={"Authorization": f"Bearer {self.operator_key}"}).json()
            observer.close()
            codes = [p.wait(120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            agg.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                agg.wait(30)
        if any(code != 0 for code in codes):
            raise RuntimeError(f"a client of {name} failed; see {self.logs}")
        return self._score_run(setting, method, task, test, status, means, final, memory.peak)

    def _score_run(self, setting, method, task, test, status, means, final, rss) -> dict:
        from fed_clients.client import PromptScorer
        from fed_clients.tasks import with_placement
        from fedbpt_wire.federation import RunConfig
        from fedbpt_wire.metrics import label_cross_entropy
        from fedbpt_wire.projection import projection_for
        from fedbpt_wire.tensors import decode_tensor

        g = self.grid
        config = RunConfig.model_validate(status["config"])
        service = self._service_client()
        try:
            info = service.model_info()
            scorer = PromptScorer(service, with_placement(task, config.prompt_placement),
                                  projection_for(config, info), info.kind, info.max_texts)
            curve_set = test[: g.curve_size]
            if method == "local-only":
                # Each client's own prompt, each on its own slice of the test set: the mean over clients of
                # their accuracy, for the price of one pass over the test set.
                own = [decode_tensor(t) for _, t in sorted(final.client_means.items())]
                slices = np.array_split(np.arange(len(test)), len(own))
                correct = np.zeros(len(test), int)
                for z, idx in zip(own, slices):
                    if len(idx):
                        correct[idx] = _correct(scorer.logits(z[None], [test[i] for i in idx])[0],
                                                [test[i] for i in idx])
                test_acc, test_loss, curve = float(correct.mean()), None, []
            else:
                curve = [float(scorer.evaluate(means[r][None], curve_set).accuracy[0]) if r in means else None
                         for r in range(g.rounds + 1)]
                logits = scorer.logits(decode_tensor(final.mean)[None], test)
                correct = np.array(_correct(logits[0], test))
                loss, acc = label_cross_entropy(logits, np.array([ex.label for ex in test]))
                test_acc, test_loss = float(acc[0]), float(loss[0])
        finally:
            service.close()
        history = status["history"]
        rounds = [{k: r[k] for k in ("round", "state", "queries", "sequences", "tokens", "bytes_up", "bytes_down",
                                     "service_bytes_up", "service_bytes_down", "val_accuracy", "clipped")}
                  | {"clients": len(r["reporters"])} for r in history]
        return {
            "test_accuracy": test_acc, "test_loss": test_loss, "curve": curve, "rounds": rounds,
            "correct": [int(c) for c in correct],
            "queries": sum(r["queries"] for r in rounds), "sequences": sum(r["sequences"] for r in rounds),
            "tokens": sum(r["tokens"] for r in rounds),
            "bytes_up": sum(r["bytes_up"] for r in rounds), "bytes_down": sum(r["bytes_down"] for r in rounds),
            "service_bytes_up": sum(r["service_bytes_up"] for r in rounds),
            "service_bytes_down": sum(r["service_bytes_down"] for r in rounds),
            "clients": len(rss), "client_rss_mb": max(rss), "client_holds": "no model: API key, d-dim mean, own data",
        }

    def _fedprompt(self, setting: Setting, test) -> dict:
        g = self.grid
        name = setting.key("fedprompt").replace("/", "_")
        spec = {"model": g.model, "dtype": g.dtype, "task": setting.task, "data": g.data, "clients": g.clients,
                "alpha": setting.alpha, "seed": setting.seed, "per_class": g.regimes[setting.regime],
                "rounds": g.rounds, "local_steps": g.fedprompt_steps, "lr": g.fedprompt_lr,
                "prompt_length": g.prompt_length, "batch_size": g.batch_size, "test_size": g.test_size,
                "curve_size": g.curve_size}
        spec_path, out_path = self.logs / f"{name}.spec.json", self.logs / f"{name}.out.json"
        spec_path.write_text(json.dumps(spec))
        with open(self.logs / f"{name}.log", "a") as log_file:
            # Its own process: the peak memory of a client that must hold the model is part of the result.
            proc = subprocess.Popen([sys.executable, "-m", "bench.fedprompt_job", str(spec_path), str(out_path)],
                                    stdout=log_file, stderr=subprocess.STDOUT)
        memory = PeakMemory([proc])
        while proc.poll() is None:
            memory.sample()
            time.sleep(0.5)
        code, rss = proc.returncode, memory.peak[0]
        if code != 0:
            raise RuntimeError(f"FedPrompt for {name} exited with {code}; see {self.logs / (name + '.log')}")
        res = json.loads(out_path.read_text())
        rounds = [{"round": r["round"], "state": "merged", "queries": 0, "sequences": 0, "tokens": 0,
                   "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"], "service_bytes_up": 0,
                   "service_bytes_down": 0, "val_accuracy": None, "clients": g.clients} for r in res["rounds"]]
        return {"test_accuracy": res["test_accuracy"], "test_loss": res["test_loss"],
                "curve": [res["initial_curve_accuracy"]] + [r["curve_accuracy"] for r in res["rounds"]],
                "rounds": rounds, "queries": 0, "sequences": 0, "tokens": 0,
                "bytes_up": res["bytes_up"], "bytes_down": res["bytes_down"], "service_bytes_up": 0,
                "service_bytes_down": 0, "clients": g.clients, "client_rss_mb": rss,
                "client_holds": f"the model ({res['client_model_bytes'] / 2**20:.0f} MiB of weights) and gradients"}


# ---------------------------------------------------------------------- report


def _correct(logits, examples) -> list[int]:
    """Per test example, 1 where the prediction is right: what the paired tests compare."""
    return (np.asarray(logits).argmax(-1) == np.array([ex.label for ex in examples])).astype(int).tolist()


def paired_p(rs: list[dict], baseline: list[dict]) -> float | None:
    """Exact McNemar p of a method against a baseline, pooling the (seed, test example) pairs of all seeds."""
    from fed_clients.evaluation import mcnemar_exact

    base = {r["seed"]: r for r in baseline}
    mine, theirs = [], []
    for r in rs:
        other = base.get(r["seed"])
        if other is None or "correct" not in r or "correct" not in other or len(r["correct"]) != len(other["correct"]):
            return None
        mine += r["correct"]
        theirs += other["correct"]
    return mcnemar_exact(np.array(mine, bool), np.array(theirs, bool)) if mine else None


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def _kib(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (task, regime, partition, method): means over seeds, costs per client and round."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["regime"], row["partition"], row["method"]), []).append(row)
    out = []
    for (task, regime, partition, method), rs in groups.items():
        per_client_round = [(r["bytes_up"] / (r["clients"] * len(r["rounds"])),
                             r["bytes_down"] / (r["clients"] * len(r["rounds"])))
                            for r in rs if r["rounds"] and r.get("clients")]
        to95 = []
        for r in rs:
            i = first_reaching(r["curve"])
            if i is not None and r["rounds"]:
                to95.append((sum(x["queries"] for x in r["rounds"][:i]), sum(x["sequences"] for x in r["rounds"][:i])))
        rss = [r["client_rss_mb"] for r in rs if r.get("client_rss_mb") is not None]
        zero, calibrated = (groups.get((task, regime, partition, m), []) for m in ("zero-shot", "calibrated"))
        out.append({
            "task": task, "regime": regime, "partition": partition, "method": method, "seeds": len(rs),
            "accuracy": _mean_std([r["test_accuracy"] for r in rs]),
            "accuracy_mean": float(np.mean([r["test_accuracy"] for r in rs])),
            "p_vs_zero_shot": paired_p(rs, zero) if method != "zero-shot" else None,
            "p_vs_calibrated": paired_p(rs, calibrated) if method not in ("zero-shot", "calibrated") else None,
            "queries": float(np.mean([r["queries"] for r in rs])),
            "sequences": float(np.mean([r["sequences"] for r in rs])),
            "queries_to_95": float(np.mean([q for q, _ in to95])) if to95 else None,
            "sequences_to_95": float(np.mean([s for _, s in to95])) if to95 else None,
            "up_per_client_round": float(np.mean([u for u, _ in per_client_round])) if per_client_round else None,
            "down_per_client_round": float(np.mean([d for _, d in per_client_round])) if per_client_round else None,
            "bytes_total": float(np.mean([r["bytes_up"] + r["bytes_down"] for r in rs])),
            "service_bytes_total": float(np.mean([r["service_bytes_up"] + r["service_bytes_down"] for r in rs])),
            "client_rss_mb": max(rss) if rss else None,
            "client_holds": rs[0]["client_holds"],
            "wall_seconds": float(np.mean([r["wall_seconds"] for r in rs])),
        })
    return out


def _num(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = ("task", "regime", "partition", "method", "test acc % (mean ± std)", "McNemar p vs zero-shot / calibrated",
           "queries", "sequences",
           "queries / sequences to 95%", "KiB up / down per client-round (aggregator link)", "KiB total (aggregator link)",
           "KiB total (service link)", "client peak RSS MiB", "client holds", "wall s")


def markdown_table(summary: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in summary:
        cells = [s["task"], s["regime"], s["partition"], LABELS.get(s["method"], s["method"]), s["accuracy"],
                 f"{_num(s['p_vs_zero_shot'], '.2g')} / {_num(s['p_vs_calibrated'], '.2g')}", _num(s["queries"]), _num(s["sequences"]),
                 f"{_num(s['queries_to_95'])} / {_num(s['sequences_to_95'])}",
                 f"{_kib(s['up_per_client_round'])} / {_kib(s['down_per_client_round'])}", _kib(s["bytes_total"]),
                 _kib(s["service_bytes_total"]), _num(s["client_rss_mb"]), s["client_holds"],
                 _num(s["wall_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_comparison(summary: list[dict]) -> str:
    """Each setting's methods as gaps to FedBPT, beside the paper's RoBERTa-large non-IID SST-2 numbers."""
    out = []
    settings = sorted({(s["task"], s["regime"], s["partition"]) for s in summary})
    for task, regime, partition in settings:
        ours = {s["method"]: s["accuracy_mean"] for s in summary
                if (s["task"], s["regime"], s["partition"]) == (task, regime, partition)}
        if "fedbpt" not in ours:
            continue
        out.append(f"\n{task}, {regime}, {partition} (ours: SmolLM2-135M unless the grid says otherwise)\n")
        out.append("| method | paper acc % | paper gap to FedBPT | our acc % | our gap to FedBPT |")
        out.append("|---|---|---|---|---|")
        for method in sorted(ours, key=lambda m: -ours[m]):
            paper = PAPER_SST2.get(method)
            paper_gap = None if paper is None else paper - PAPER_SST2["fedbpt"]
            out.append(f"| {LABELS.get(method, method)} | {_num(paper, '.2f')} | {_num(paper_gap, '+.2f')} | "
                       f"{100 * ours[method]:.1f} | {100 * (ours[method] - ours['fedbpt']):+.1f} |")
    return "\n".join(out)


def _curves(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per method: round, cumulative queries, cumulative aggregator-link bytes, accuracy; means over seeds."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r["curve"]:
            by_method.setdefault(r["method"], []).append(r)
    out = {}
    for method, rs in by_method.items():
        n = min(len(r["curve"]) for r in rs)
        acc = np.array([[np.nan if a is None else a for a in r["curve"][:n]] for r in rs], dtype=float)
        queries = np.array([np.concatenate([[0], np.cumsum([x["queries"] for x in r["rounds"]])])[:n] for r in rs])
        sent = np.array([np.concatenate([[0], np.cumsum([x["bytes_up"] + x["bytes_down"] for x in r["rounds"]])])[:n]
                         for r in rs])
        out[method] = (np.arange(n), queries.mean(0), sent.mean(0), np.nanmean(acc, 0))
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(rows)
    flat = {r["method"]: np.mean([x["test_accuracy"] for x in rows if x["method"] == r["method"]])
            for r in rows if not r["curve"]}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, (rounds, queries, sent, acc) in curves.items():
        label = LABELS.get(method, method)
        axes[0].plot(rounds, acc, marker="o", label=label)
        if method != "fedprompt":  # no service queries: a white-box client runs the model itself
            axes[1].plot(queries, acc, marker="o", label=label)
        axes[2].plot(sent / 1024, acc, marker="o", label=label)
    for method, acc in flat.items():
        for ax in axes:
            ax.axhline(acc, linestyle="--", linewidth=1, color="grey" if method == "zero-shot" else "black")
        axes[0].annotate(LABELS.get(method, method), (0, acc), fontsize=7, va="bottom")
    for ax, xlabel in zip(axes, ("round", "cumulative service queries", "cumulative KiB, client <-> aggregator")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (curve subset)")
        ax.grid(alpha=0.3)
    axes[2].set_xscale("symlog")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wire_sizes(texts: list[str], label_words: list[str]) -> list[dict]:
    """Bytes of one population's score request in each prompt wire form, as the client serialises it."""
    from fedbpt_wire.projection import Projection
    from fedbpt_wire.schemas import ProjectedPrompts, ScoreRequest
    from fedbpt_wire.tensors import encode_tensor

    cases = [("SmolLM2-135M", 5, 5, 576, 100, 16),
             ("paper (RoBERTa-large, popsize 20)", 20, 50, 1024, 500, 32)]
    out = []
    for name, pop, length, hidden, dim, n in cases:
        batch = (texts * (n // len(texts) + 1))[:n]
        projection = Projection(0, dim, length, hidden, 0.02, 1.0)
        z = np.random.default_rng(0).standard_normal((pop, dim))
        sizes = {}
        for form in ("float32", "float16"):
            req = ScoreRequest(prompts=encode_tensor(projection(z), form), texts=batch, label_words=label_words)
            sizes[form] = len(req.model_dump_json(exclude_none=True))
        req = ScoreRequest(projected=ProjectedPrompts(z=encode_tensor(z, "float32"), projection=projection.spec),
                           texts=batch, label_words=label_words)
        sizes["seed"] = len(req.model_dump_json(exclude_none=True))
        texts_only = len(ScoreRequest(prompts=encode_tensor(np.zeros((pop, 0, hidden))), texts=batch,
                                      label_words=label_words).model_dump_json(exclude_none=True))
        out.append({"case": name, "P": pop, "L": length, "D": hidden, "d": dim, "N": n, **sizes,
                    "texts_and_framing": texts_only})
    return out


def wire_table(rows: list[dict]) -> str:
    lines = ["| case | P x L x D (d) | N texts | float32 KiB | float16 KiB | seed + z KiB | seed / float32 | "
             "of which texts KiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['P']} x {r['L']} x {r['D']} ({r['d']}) | {r['N']} | {r['float32'] / 1024:.1f} | "
                     f"{r['float16'] / 1024:.1f} | {r['seed'] / 1024:.1f} | {r['seed'] / r['float32']:.3f} | "
                     f"{r['texts_and_framing'] / 1024:.1f} |")
    return "\n".join(lines)


def write_report(grid: Grid, rows: list[dict], out: Path) -> str:
    import csv

    from fed_clients.data import load_splits
    from fed_clients.tasks import get_task

    summary = summarize(rows)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    flat_keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=flat_keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "rounds.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "round", "curve_accuracy_at_start", "queries", "sequences", "bytes_up", "bytes_down",
                         "service_bytes_up", "service_bytes_down", "val_accuracy"])
        for r in rows:
            for i, x in enumerate(r["rounds"]):
                acc = r["curve"][i] if i < len(r["curve"]) else None
                writer.writerow([r["key"], x["round"], acc, x["queries"], x["sequences"], x["bytes_up"],
                                 x["bytes_down"], x["service_bytes_up"], x["service_bytes_down"], x["val_accuracy"]])
    for setting in sorted({(r["task"], r["regime"], r["partition"]) for r in rows}):
        chosen = [r for r in rows if (r["task"], r["regime"], r["partition"]) == setting]
        # A task may be a spec file's path: its slashes must not become directories.
        plot(chosen, out / f"curves_{'_'.join(setting).replace('/', '_')}.png", " / ".join(setting))
    task = get_task(grid.tasks[0])
    sample = [task.render(ex.fields, "causal") for ex in load_splits(grid.data, task)["train"][:32]]
    wire = wire_sizes(sample, list(task.label_words))
    text = "\n\n".join([
        f"# fedbpt bench: grid `{grid.name}`, {time.strftime('%Y-%m-%d')}",
        f"Model {grid.model} ({grid.dtype}); {grid.clients} clients; {grid.rounds} rounds; d = {grid.intrinsic_dim}, "
        f"L = {grid.prompt_length}, popsize {grid.popsize}, {grid.local_iterations} local iterations of "
        f"{grid.batch_size} examples; test {grid.test_size} examples (curves on the first {grid.curve_size}); "
        f"seeds {list(grid.seeds)}. Queries and bytes are training costs, measured on the wire; "
        "evaluation queries are the bench's own and not counted. Bytes on the aggregator link include idle polling.",
        markdown_table(summary),
        "## Against the paper (RoBERTa-large, non-IID SST-2, Table 2)" + paper_comparison(summary),
        "## One population's upload to the service, by prompt wire form (measured JSON bodies)\n\n" + wire_table(wire),
    ])
    (out / "results.md").write_text(text + "\n")
    (out / "grid.json").write_text(json.dumps(asdict(grid), indent=2))
    return text


def add_arguments(parser) -> None:
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default",
                        help="quick: under 10 minutes on 2 cores; default: about an hour; full: every setting")
    parser.add_argument("--quick", action="store_const", const="quick", dest="grid", help="same as --grid quick")
    parser.add_argument("--config", default=None, help="a grid as JSON (e.g. configs/paper-roberta-large.json)")
    parser.add_argument("--out", default=None, help="results directory (default bench/results/<date>-<grid>); "
                                                    "an existing one resumes: finished runs are kept")
    parser.add_argument("--task", default=None, metavar="NAME|FILE",
                        help="run the grid on this task only: a built-in task or a task spec file (its name picks the "
                             "embedded data, e.g. a spec named amazon_snippets with your own template and words)")
    parser.add_argument("--service", default=None, help="use this running service instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("FEDBPT_API_KEY"))


def run(args) -> None:
    grid = Grid.from_file(args.config) if args.config else GRIDS[args.grid]
    if getattr(args, "task", None):
        from fed_clients.tasks import get_task

        get_task(args.task)  # a bad name or spec fails here, not in the first run's log
        grid = replace(grid, tasks=(args.task,))
    out = Path(args.out or f"bench/results/{time.strftime('%Y-%m-%d')}-{grid.name}")
    out.mkdir(parents=True, exist_ok=True)
    if grid.data == "default" or grid.model == Grid.model:
        from fedbpt import assets

        assets.fetch_all()
    bench = Bench(grid, out, args.service, args.api_key)
    total = len(bench.settings()) * len(grid.methods)
    print(f"grid {grid.name}: {total} runs ({len(bench.done)} already in {out}); logs in {out / 'logs'}", flush=True)
    t0 = time.monotonic()
    rows = bench.run(progress=lambda line: print(line, flush=True))
    print(write_report(grid, rows, out))
    print(f"\n{len(rows)} runs in {time.monotonic() - t0:.0f} s; results in {out}")
