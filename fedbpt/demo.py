"""`fedbpt demo`: the whole stack on loopback: service, aggregator and K client processes, then a report.

Every part is a real server or process speaking HTTP, exactly as on separate machines.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedbpt_wire.federation import RunConfig, RunStatus
from fedbpt_wire.options import add_setting_flags, given
from fedbpt_wire.presets import DEMO_DATA, DEMO_RUN, GPU_BUDGET

from .launch import Children, FederationResult, LoopbackFederation, free_url, service_argv

log = logging.getLogger(__name__)


# The RunConfig fields a DemoConfig names; the demo takes the rest of RunConfig's (but the run id, the clients
# needed and the projection seed, which the demo sets) as flags too, into DemoConfig.run.
RUN_FIELDS = (
    "prompt_init",
    "prompt_placement",
    "strategy",
    "rounds",
    "intrinsic_dim",
    "prompt_length",
    "sigma0",
    "local_popsize",
    "local_iterations",
    "seed",
    "round_timeout_s",
)
_FURTHER = [f for f in RunConfig.model_fields if f not in (*RUN_FIELDS, "run_id", "min_clients", "projection_seed")]
_RUN_DEFAULTS = RunConfig.model_fields


@dataclass
class DemoConfig:
    name: str = field(default_factory=lambda: time.strftime("demo-%Y%m%d-%H%M%S"))
    runs_dir: str = "runs"
    # The budget: "cpu" (the defaults below), "gpu" (PRESETS["gpu"]) or "auto" (gpu where torch sees CUDA).
    preset: str = "auto"
    # Chosen by measurement (docs/design.md, section 6 and "Tuning on two CPU cores"): Amazon review snippets
    # with the verbalizer " terrible"/" great", where SmolLM2's manual prompt is badly calibrated and a tuned
    # prompt has room to help; the run's settings are fedbpt_wire.presets.DEMO_RUN (the prompt between the review
    # and its cue line, from zeros; IID shards and no perturbation, since the label prior is what there is to
    # learn here and FedBPT's perturbation, like a label-skewed fitness ranking, works against learning it).
    task: str = "amazon_snippets"  # a built-in task or a task spec file
    data: str = "default"  # the task's embedded data, or a data file (or directory) of your own
    test: str = ""  # held-out test file; empty: the demo holds out test_fraction of --data
    test_fraction: float = 0.2
    model: str = "smollm2-135m-instruct"
    label_words: str = " terrible, great"  # comma-separated verbalizer replacing the task's
    prompt_init: str = DEMO_RUN["prompt_init"]
    prompt_placement: str = DEMO_RUN["prompt_placement"]
    dtype: str = "auto"
    strategy: str = DEMO_RUN["strategy"]
    clients: int = 4
    # Sized for 10 minutes on 2 AVX2 cores, where SmolLM2-135M runs ~250 tokens/s in fp32.
    rounds: int = DEMO_RUN["rounds"]
    alpha: float | None = None
    per_class: int = DEMO_DATA["per_class"]
    intrinsic_dim: int = DEMO_RUN["intrinsic_dim"]
    prompt_length: int = DEMO_RUN["prompt_length"]
    sigma0: float = _RUN_DEFAULTS["sigma0"].default
    local_popsize: int = DEMO_RUN["local_popsize"]
    local_iterations: int = DEMO_RUN["local_iterations"]
    batch_size: int = DEMO_DATA["batch_size"]
    test_size: int = 1000
    seed: int = _RUN_DEFAULTS["seed"].default
    round_timeout_s: float = _RUN_DEFAULTS["round_timeout_s"].default
    # Any other RunConfig field, as its flag set it (e.g. {"clip_multiple": 2.0}).
    run: dict[str, Any] = field(default_factory=dict)

    def run_config(self) -> dict[str, Any]:
        """The aggregator's RunConfig fields (but the run id), checked: a bad value fails here, before any process
        starts."""
        values = {
            **{f: getattr(self, f) for f in RUN_FIELDS},
            **self.run,
            "projection_seed": self.seed,
            "min_clients": self.clients,
        }
        RunConfig(run_id=self.name, **values)
        return values


# What a preset sets, unless the command line says otherwise: "cpu" keeps the defaults above, "gpu" is the budget
# measured on one H100 (fedbpt_wire.presets.GPU_BUDGET), which 2 CPU cores cannot buy in 10 minutes: there the
# tuned prompt learns the label prior and the served prompt is the calibrated baseline.
PRESETS: dict[str, dict[str, object]] = {"cpu": {}, "gpu": dict(GPU_BUDGET)}
PRESET_FIELDS = sorted({k for values in PRESETS.values() for k in values})


def resolve_preset(name: str, has_cuda) -> str:
    """The preset a `--preset` value means; `has_cuda()` is asked only for "auto"."""
    if name not in (*PRESETS, "auto"):
        raise ValueError(f"--preset must be one of {', '.join((*PRESETS, 'auto'))}, got {name!r}")
    if name != "auto":
        return name
    return "gpu" if has_cuda() else "cpu"


def config_from(values: dict, has_cuda) -> DemoConfig:
    """A DemoConfig from what the command line set: its preset's values first, then the flags given."""
    preset = resolve_preset(str(values.get("preset") or "auto"), has_cuda)
    return DemoConfig(**{**PRESETS[preset], **values, "preset": preset})


def _torch_sees_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


class Progress:
    """A bar per round while clients report, and one summary line when the round merges."""

    def __init__(self, rounds: int, stream=sys.stdout):
        self.rounds = rounds
        self.stream = stream
        self.printed: set[int] = set()
        self.tty = stream.isatty()
        self.t0 = time.monotonic()

    def update(self, status: RunStatus) -> None:
        for rec in status.history:
            r = rec.round
            if rec.state == "open":
                if self.tty:
                    line = (
                        f"round {r + 1}/{self.rounds} {_bar(len(rec.reporters), len(rec.selected))} "
                        f"{len(rec.reporters)}/{len(rec.selected)} clients"
                    )
                    self.stream.write("\r" + line.ljust(70))
                    self.stream.flush()
            elif r not in self.printed:
                self.printed.add(r)
                acc, loss, v = rec.val_accuracy, rec.val_loss, rec.vs_baseline
                # The raw accuracy reads the label words as they come; the served choice reads both prompts with
                # their fitted biases, which is what a user deploys (and, under a fitted fitness bias, the only
                # accuracy the search improves).
                served = (
                    f" | with bias {v.tuned_accuracy:.3f} vs baseline {v.baseline_accuracy:.3f} ({v.examples})"
                    if v is not None and v.examples
                    else ""
                )
                line = (
                    f"round {r + 1}/{self.rounds} {rec.state:<6} | val acc "
                    f"{'n/a' if acc is None else f'{acc:.3f}'} | val loss {'n/a' if loss is None else f'{loss:.4f}'}"
                    f"{served} | queries {rec.queries} | seqs {rec.sequences} | up {_kb(rec.bytes_up)}"
                    f" down {_kb(rec.bytes_down)} | {time.monotonic() - self.t0:.0f} s"
                )
                self.stream.write(("\r" if self.tty else "") + line.ljust(70) + "\n")
                self.stream.flush()


@dataclass
class DemoData:
    """The demo's task and data: the pool the clients split (with the reference they load it by) and the test set."""

    task: Any
    task_ref: str  # a built-in task's name, or the spec file's absolute path
    train: list
    test: list
    client_data: str  # what each client's --data names: "default", or the pool written to one file


@dataclass
class Scores:
    """Per test example logits of each prompt the report compares, with the biases fitted on the clients' pool."""

    zero: np.ndarray
    bias: np.ndarray  # the manual prompt's: the calibrated baseline
    tuned: np.ndarray
    tuned_bias: np.ndarray
    served: np.ndarray
    served_bias: np.ndarray
    z_served: np.ndarray
    choice: Any  # ServedChoice
    info: Any  # the service's ModelInfo
    calibration_examples: int


def run_demo(cfg: DemoConfig) -> dict:
    """Config -> federated run on loopback -> evaluation on held-out data -> report.json, rounds.csv, a plot and
    the prompt file to deploy."""
    t_start = time.monotonic()
    run_settings = cfg.run_config()  # a bad setting fails here, before any process starts
    data = demo_data(cfg)
    out = Path(cfg.runs_dir) / cfg.name
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    api_key = secrets.token_urlsafe(16)
    svc_url, svc_port = free_url()
    procs = Children(out / "logs")
    try:
        procs.start("service", service_argv(svc_port, cfg.model, cfg.dtype), env={"FEDBPT_API_KEYS": api_key})
        print(f"starting the service ({cfg.model}) and the aggregator; logs in {out / 'logs'}", flush=True)
        procs.wait_healthy("service", svc_url)
        federation = LoopbackFederation(
            procs, out / "aggregator.db", run_settings, svc_url, api_key, _client_options(cfg, data, out), poll_s=0.5
        )
        federation.start_aggregator()
        print(f"{cfg.clients} clients, {cfg.rounds} rounds, strategy {cfg.strategy}", flush=True)
        result = federation.run(on_status=Progress(cfg.rounds).update)
        test = data.test[: cfg.test_size]
        print(
            f"evaluating zero-shot, calibrated zero-shot and the tuned prompt on {len(test)} held-out test examples",
            flush=True,
        )
        scores = score_prompts(cfg, data, result, svc_url, api_key, test)
    finally:
        procs.stop_all()
    report = demo_report(cfg, data, result, scores, test, time.monotonic() - t_start)
    write_report(out, report)
    _write_served_prompt(cfg, out, report, data, result, scores)
    print(_summary(report, scores.choice, out))
    return report


def demo_data(cfg: DemoConfig) -> DemoData:
    """The task and its verbalizer first (a bad one fails before any process starts), then the data."""
    import fedbpt_assets as assets
    from fed_clients.data import load_splits
    from fed_clients.tasks import TASKS, get_task

    task = get_task(cfg.task, cfg.label_words)
    task_ref = cfg.task if cfg.task in TASKS else str(Path(cfg.task).resolve())
    if cfg.data == "default":
        assets.fetch_all()
        splits = load_splits("default", task)
        return DemoData(task, task_ref, splits["train"], splits["test"], "default")
    splits = own_splits(cfg, task)
    # The clients partition the pool from one file, as they would their own files on separate machines.
    path = write_examples(Path(cfg.runs_dir) / cfg.name / "data" / "train.jsonl", splits["train"], task)
    return DemoData(task, task_ref, splits["train"], splits["test"], str(path))


def _client_options(cfg: DemoConfig, data: DemoData, out: Path) -> list[dict[str, Any]]:
    return [
        {
            "data": data.client_data,
            "task": data.task_ref,
            "partition": f"{k}/{cfg.clients}",
            "per_class": cfg.per_class,
            "partition_seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "prompt_wire": "seed",
            "prompt_out": out / "logs" / f"prompt-client-{k}.json",
            "state_dir": out / "state",
            "label_words": cfg.label_words or None,
            "alpha": cfg.alpha,
        }
        for k in range(cfg.clients)
    ]


def score_prompts(
    cfg: DemoConfig, data: DemoData, result: FederationResult, svc_url: str, api_key: str, test: list
) -> Scores:
    """The manual prompt, the last global mean and the served prompt on the test set, each with its label bias
    fitted on every labelled example the clients hold (what they could do without tuning anything)."""
    from fed_clients.client import PromptScorer
    from fed_clients.evaluation import fit_calibration
    from fed_clients.partition import few_shot
    from fed_clients.service_client import ServiceClient
    from fedbpt_wire.served import ServedChoice
    from fedbpt_wire.tensors import decode_tensor

    config = result.status.config
    service = ServiceClient(svc_url, api_key, prompt_wire="seed")
    info = service.model_info()
    # The clients' shards (train and validation) together are the run's few-shot pool.
    train_labels = np.array([ex.label for ex in data.train])
    pool = few_shot(train_labels, cfg.per_class, cfg.seed) if cfg.per_class else np.arange(len(train_labels))
    own = [data.train[i] for i in pool]
    own_labels = np.array([ex.label for ex in own])
    zero_scorer = PromptScorer.manual(service, data.task, info)
    bias = fit_calibration(zero_scorer.logits(None, own)[0], own_labels)
    zero_logits = zero_scorer.logits(None, test)[0]
    tuned_scorer = PromptScorer.for_run(service, data.task, config, info)

    def scored(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The same bias correction on top of a tuned prompt: what separation the prompt adds beyond a bias.
        return tuned_scorer.logits(z[None], test)[0], fit_calibration(tuned_scorer.logits(z[None], own)[0], own_labels)

    z_final = decode_tensor(result.final.mean)
    tuned_logits, tuned_bias = scored(z_final)
    # What the run serves, as the aggregator chose it on the clients' validation splits; its read-out bias
    # fitted on the same examples as the baseline's, so that serving the baseline is the calibrated baseline.
    choice = result.final.served or ServedChoice(
        served="baseline", reason="the run validated no global prompt against the baseline: serving the baseline"
    )
    z_served = decode_tensor(choice.mean) if choice.mean is not None else z_final
    if choice.served == "baseline":
        served_logits, served_bias = zero_logits, bias
    elif np.array_equal(z_served, z_final):
        served_logits, served_bias = tuned_logits, tuned_bias
    else:
        served_logits, served_bias = scored(z_served)
    return Scores(
        zero_logits, bias, tuned_logits, tuned_bias, served_logits, served_bias, z_served, choice, info, len(own)
    )


def demo_report(
    cfg: DemoConfig, data: DemoData, result: FederationResult, s: Scores, test: list, wall_seconds: float
) -> dict:
    from fed_clients.evaluation import calibrated_predictions, mcnemar_exact
    from fedbpt_wire.metrics import label_cross_entropy
    from fedbpt_wire.round_table import round_table

    labels = np.array([ex.label for ex in test])
    zero_ok = s.zero.argmax(-1) == labels
    cal_ok = calibrated_predictions(s.zero, s.bias) == labels
    tuned_ok = s.tuned.argmax(-1) == labels
    tuned_cal_ok = calibrated_predictions(s.tuned, s.tuned_bias) == labels
    served_ok = calibrated_predictions(s.served, s.served_bias) == labels
    return {
        "name": cfg.name,
        "config": asdict(cfg),
        "run_config": result.status.config.model_dump(mode="json"),
        "model": s.info.model_dump(),
        "test_examples": len(test),
        "zero_shot_test_accuracy": float(zero_ok.mean()),
        "zero_shot_test_loss": float(label_cross_entropy(s.zero[None], labels)[0][0]),
        "calibrated_zero_shot_test_accuracy": float(cal_ok.mean()),
        "calibration_examples": s.calibration_examples,
        "tuned_test_accuracy": float(tuned_ok.mean()),
        "tuned_test_loss": float(label_cross_entropy(s.tuned[None], labels)[0][0]),
        # Exact McNemar p-values on the same test examples: a gain is a gain only well below 0.05.
        "tuned_vs_zero_shot_p": mcnemar_exact(tuned_ok, zero_ok),
        "tuned_vs_calibrated_p": mcnemar_exact(tuned_ok, cal_ok),
        "tuned_calibrated_test_accuracy": float(tuned_cal_ok.mean()),
        "tuned_calibrated_vs_calibrated_p": mcnemar_exact(tuned_cal_ok, cal_ok),
        # What a user deploys: the prompt the run chose on validation (tuned or the baseline) with its bias.
        "served": s.choice.served,
        "served_test_accuracy": float(served_ok.mean()),
        "served_vs_calibrated_p": mcnemar_exact(served_ok, cal_ok),
        "served_selection": s.choice.model_dump(mode="json", exclude={"mean"}),
        "label_words": list(data.task.label_words),
        "rounds": round_table(result.status.history),
        "wall_seconds": wall_seconds,
    }


def _write_served_prompt(
    cfg: DemoConfig, out: Path, report: dict, data: DemoData, result: FederationResult, s: Scores
) -> None:
    from fed_clients.prompt_file import prompt_payload, write_prompt

    metrics = {
        k: report[k]
        for k in (
            "test_examples",
            "zero_shot_test_accuracy",
            "calibrated_zero_shot_test_accuracy",
            "tuned_test_accuracy",
            "served_test_accuracy",
        )
    }
    payload = prompt_payload(
        s.info,
        result.status.config,
        data.task,
        s.z_served,
        metrics,
        f"fedbpt demo {cfg.name}",
        choice=s.choice,
        bias=s.served_bias,
    )
    write_prompt(out / "prompt.json", payload)


def _summary(report: dict, choice, out: Path) -> str:
    return (
        f"test accuracy on {report['test_examples']} examples: zero-shot {report['zero_shot_test_accuracy']:.4f} | "
        f"calibrated zero-shot {report['calibrated_zero_shot_test_accuracy']:.4f} | tuned "
        f"{report['tuned_test_accuracy']:.4f} (McNemar p {report['tuned_vs_zero_shot_p']:.2g} vs zero-shot, "
        f"{report['tuned_vs_calibrated_p']:.2g} vs calibrated) | tuned + calibration "
        f"{report['tuned_calibrated_test_accuracy']:.4f} (p {report['tuned_calibrated_vs_calibrated_p']:.2g} vs "
        f"calibrated) | served: {choice.served} {report['served_test_accuracy']:.4f} "
        f"(p {report['served_vs_calibrated_p']:.2g} vs calibrated) | {report['wall_seconds']:.0f} s | report: "
        f"{out / 'report.json'}\nserved prompt: {choice.reason}"
    )


def own_splits(cfg: DemoConfig, task) -> dict:
    """A user's data: the pool the clients split, and a test set (given, or held out of the pool, seeded)."""
    from fed_clients.data import load_splits, read_examples

    pool = load_splits(cfg.data, task)
    train = pool["train"] + pool["validation"]
    test = read_examples(cfg.test, task) if cfg.test else pool["test"]
    if not test:
        order = np.random.default_rng([cfg.seed, 7]).permutation(len(train))
        n_test = max(1, int(round(len(train) * cfg.test_fraction)))
        test = [train[i] for i in np.sort(order[:n_test])]
        train = [train[i] for i in np.sort(order[n_test:])]
    if len(train) < 2 * cfg.clients:
        raise ValueError(f"{cfg.data}: {len(train)} examples left for {cfg.clients} clients; each needs at least 2")
    return {"train": train, "validation": [], "test": test}


def write_examples(path: Path, examples, task) -> Path:
    """JSONL with the task's columns and its label column, labels by name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({**ex.fields, task.label_column: task.names[ex.label]}, ensure_ascii=False) + "\n")
    return path


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    rows = report["rounds"]
    with open(out / "rounds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["round"])
        writer.writeheader()
        writer.writerows(rows)
    plot_rounds(rows, report, out / "accuracy.png")


def plot_rounds(rows: list[dict], report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = [r for r in rows if r["val_accuracy"] is not None]
    cumulative, total = [], 0
    for r in rows:
        total += r["queries"]
        if r["val_accuracy"] is not None:
            cumulative.append(total)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, xs, label in (
        (axes[0], [r["round"] + 1 for r in merged], "round"),
        (axes[1], cumulative, "cumulative service queries"),
    ):
        ax.plot(xs, [r["val_accuracy"] for r in merged], marker="o", label="global prompt, clients' validation")
        ax.axhline(report["zero_shot_test_accuracy"], color="grey", linestyle="--", label="zero-shot (test)")
        ax.axhline(
            report["calibrated_zero_shot_test_accuracy"],
            color="orange",
            linestyle="-.",
            label="calibrated zero-shot (test)",
        )
        ax.axhline(report["tuned_test_accuracy"], color="green", linestyle=":", label="tuned (test)")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['name']}: {report['run_config']['strategy']} on {report['config']['task']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name in RUN_FIELDS or name == "run":
            continue
        if name == "name":
            parser.add_argument(flag, default=None, help="run name (default: demo-<timestamp>)")
        elif name == "alpha":
            parser.add_argument(flag, type=float, default=value, help="Dirichlet alpha; 0 for IID")
        elif name == "preset":
            parser.add_argument(
                flag,
                choices=[*PRESETS, "auto"],
                default=value,
                help="budget: cpu (10 minutes on 2 cores), gpu (the setting measured on one H100), "
                "auto (gpu where torch sees CUDA); flags given on the command line win",
            )
        elif name in PRESET_FIELDS:
            # None: "not given", so the preset's value applies.
            parser.add_argument(flag, type=type(value), default=None, help=f"default: the preset's (cpu: {value})")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    # The run's settings: type, choices and help from RunConfig (fedbpt_wire.options), defaults the demo's.
    named = {f: getattr(defaults, f) for f in RUN_FIELDS}
    add_setting_flags(parser, RunConfig, only=[f for f in RUN_FIELDS if f not in PRESET_FIELDS], defaults=named)
    add_setting_flags(
        parser,
        RunConfig,
        only=[f for f in RUN_FIELDS if f in PRESET_FIELDS],
        defaults=named,
        not_given=True,
        help_default="(default: the preset's; cpu: {default})",
    )
    add_setting_flags(
        parser.add_argument_group("further run settings (as `fedbpt aggregator` takes them)"),
        RunConfig,
        only=_FURTHER,
        not_given=True,
    )


def values_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """What the command line set, as DemoConfig keywords (None: left to the preset)."""
    values = {k: getattr(args, k) for k in DemoConfig.__dataclass_fields__ if getattr(args, k, None) is not None}
    if values.get("alpha") == 0:
        values["alpha"] = None
    further = given(args, _FURTHER)
    if further:
        values["run"] = further
    return values


def run(args: argparse.Namespace) -> None:
    cfg = config_from(values_from_args(args), _torch_sees_cuda)
    print(
        f"preset {cfg.preset}: {cfg.rounds} rounds of {cfg.local_iterations} x {cfg.local_popsize} candidates",
        flush=True,
    )
    run_demo(cfg)
