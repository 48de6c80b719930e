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

import numpy as np

from fedbpt_wire.federation import RunStatus

from .launch import SINGLE_THREADED, Children, aggregator_argv, client_argv, free_url, service_argv

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    name: str = field(default_factory=lambda: time.strftime("demo-%Y%m%d-%H%M%S"))
    runs_dir: str = "runs"
    # The budget: "cpu" (the defaults below), "gpu" (PRESETS["gpu"]) or "auto" (gpu where torch sees CUDA).
    preset: str = "auto"
    # Chosen by measurement (docs/design.md, section 6 and "Tuning on two CPU cores"): Amazon review snippets
    # with the verbalizer " terrible"/" great", where SmolLM2's manual prompt is badly calibrated and a tuned
    # prompt has room to help; the prompt between the review and its cue line, starting from zeros; IID shards
    # and no perturbation, since the label prior is what there is to learn here and FedBPT's perturbation
    # (like a label-skewed fitness ranking) works against learning it.
    task: str = "amazon_snippets"  # a built-in task or a task spec file
    data: str = "default"  # the task's embedded data, or a data file (or directory) of your own
    test: str = ""  # held-out test file; empty: the demo holds out test_fraction of --data
    test_fraction: float = 0.2
    model: str = "smollm2-135m-instruct"
    label_words: str = " terrible, great"  # comma-separated verbalizer replacing the task's
    prompt_init: str = "zeros"
    prompt_placement: str = "after-text"
    dtype: str = "auto"
    strategy: str = "fedbpt-noperturb"
    clients: int = 4
    # Sized for 10 minutes on 2 AVX2 cores, where SmolLM2-135M runs ~250 tokens/s in fp32.
    rounds: int = 4
    alpha: float | None = None
    per_class: int = 40
    intrinsic_dim: int = 50
    prompt_length: int = 5
    sigma0: float = 1.0
    local_popsize: int = 8
    local_iterations: int = 2
    batch_size: int = 16
    test_size: int = 1000
    seed: int = 0
    round_timeout_s: float = 600.0


# What a preset sets, unless the command line says otherwise. "gpu" is the setting measured on one H100
# (bench/RESULTS.md, "Enough budget"): the prompt ahead of the text from real token embeddings, L = 20, d = 100,
# 500 labelled examples, 12 rounds of 6 x 16 candidates on batches of 32 (~150k sequences, ~190 s there; hours
# on two CPU cores). "cpu" keeps the defaults above, sized for 10 minutes on 2 AVX2 cores, which that budget
# does not buy: there the tuned prompt learns the label prior and stays under the calibrated baseline.
PRESETS: dict[str, dict[str, object]] = {
    "cpu": {},
    "gpu": {
        "prompt_placement": "ahead",
        "prompt_init": "tokens",
        "prompt_length": 20,
        "intrinsic_dim": 100,
        "per_class": 250,
        "batch_size": 32,
        "local_popsize": 16,
        "local_iterations": 6,
        "rounds": 12,
        "dtype": "float32",
    },
}
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
                acc, loss = rec.val_accuracy, rec.val_loss
                line = (
                    f"round {r + 1}/{self.rounds} {rec.state:<6} | val acc "
                    f"{'n/a' if acc is None else f'{acc:.3f}'} | val loss {'n/a' if loss is None else f'{loss:.4f}'}"
                    f" | queries {rec.queries} | seqs {rec.sequences} | up {_kb(rec.bytes_up)}"
                    f" down {_kb(rec.bytes_down)} | {time.monotonic() - self.t0:.0f} s"
                )
                self.stream.write(("\r" if self.tty else "") + line.ljust(70) + "\n")
                self.stream.flush()


def run_demo(cfg: DemoConfig) -> dict:
    import fedbpt_assets as assets
    from fed_clients.aggregator_client import AggregatorClient
    from fed_clients.client import PromptScorer
    from fed_clients.data import load_splits
    from fed_clients.evaluation import calibrated_predictions, fit_calibration, mcnemar_exact
    from fed_clients.partition import few_shot
    from fed_clients.prompt_file import prompt_payload, write_prompt
    from fed_clients.service_client import ServiceClient
    from fed_clients.tasks import TASKS, get_task, parse_label_words, with_placement
    from fedbpt_wire.metrics import label_cross_entropy
    from fedbpt_wire.projection import projection_for
    from fedbpt_wire.served import ServedChoice
    from fedbpt_wire.tensors import decode_tensor

    t_start = time.monotonic()
    # The task and its verbalizer first: a bad one fails here, before any process starts.
    task = get_task(cfg.task)
    if cfg.label_words:
        task = task.with_label_words(parse_label_words(cfg.label_words))
    out = Path(cfg.runs_dir) / cfg.name
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if cfg.data == "default":
        assets.fetch_all()
        splits = load_splits("default", task)
        client_data = "default"
    else:
        splits = own_splits(cfg, task)
        # The clients partition the pool from one file, as they would their own files on separate machines.
        client_data = str(write_examples(out / "data" / "train.jsonl", splits["train"], task))
    task_ref = cfg.task if cfg.task in TASKS else str(Path(cfg.task).resolve())
    api_key, enroll_key, operator_key = (secrets.token_urlsafe(16) for _ in range(3))
    svc_url, svc_port = free_url()
    agg_url, agg_port = free_url()
    run_config = {
        "strategy": cfg.strategy,
        "rounds": cfg.rounds,
        "intrinsic_dim": cfg.intrinsic_dim,
        "prompt_length": cfg.prompt_length,
        "sigma0": cfg.sigma0,
        "local_popsize": cfg.local_popsize,
        "local_iterations": cfg.local_iterations,
        "seed": cfg.seed,
        "projection_seed": cfg.seed,
        "min_clients": cfg.clients,
        "prompt_init": cfg.prompt_init,
        "prompt_placement": cfg.prompt_placement,
        "round_timeout_s": cfg.round_timeout_s,
    }
    procs = Children(out / "logs")
    try:
        procs.start("service", service_argv(svc_port, cfg.model, cfg.dtype), env={"FEDBPT_API_KEYS": api_key})
        procs.start(
            "aggregator",
            aggregator_argv(agg_port, out / "aggregator.db", run_config),
            env={"FEDBPT_ENROLL_KEY": enroll_key, "FEDBPT_OPERATOR_KEY": operator_key, **SINGLE_THREADED},
        )
        print(f"starting the service ({cfg.model}) and the aggregator; logs in {out / 'logs'}", flush=True)
        procs.wait_healthy("service", svc_url)
        procs.wait_healthy("aggregator", agg_url)
        for k in range(cfg.clients):
            argv = client_argv(
                svc_url,
                agg_url,
                data=client_data,
                task=task_ref,
                partition=f"{k}/{cfg.clients}",
                per_class=cfg.per_class,
                partition_seed=cfg.seed,
                batch_size=cfg.batch_size,
                prompt_wire="seed",
                prompt_out=out / "logs" / f"prompt-client-{k}.json",
                state_dir=out / "state",
                label_words=cfg.label_words or None,
                alpha=cfg.alpha,
            )
            procs.start(
                f"client-{k}", argv, env={"FEDBPT_API_KEY": api_key, "FEDBPT_ENROLL_KEY": enroll_key, **SINGLE_THREADED}
            )
        print(f"{cfg.clients} clients, {cfg.rounds} rounds, strategy {cfg.strategy}", flush=True)
        progress = Progress(cfg.rounds)
        observer = AggregatorClient(agg_url, token=operator_key)
        while True:
            procs.check()
            status = observer.status()
            progress.update(status)
            if status.state == "done":
                break
            time.sleep(0.5)
        final = observer.global_state()
        observer.close()
        config = status.config

        test = splits["test"][: cfg.test_size]
        print(
            f"evaluating zero-shot, calibrated zero-shot and the tuned prompt on {len(test)} held-out test examples",
            flush=True,
        )
        service = ServiceClient(svc_url, api_key, prompt_wire="seed")
        info = service.model_info()
        projection = projection_for(config, info)
        # The calibrated baseline: the manual prompt's label bias fitted on every labelled example the
        # clients hold (what they could do without tuning anything), applied to the test set.
        # The clients' shards (train and validation) together are the run's few-shot pool.
        train_labels = np.array([ex.label for ex in splits["train"]])
        pool = few_shot(train_labels, cfg.per_class, cfg.seed) if cfg.per_class else np.arange(len(train_labels))
        own = [splits["train"][i] for i in pool]
        zero_scorer = PromptScorer(service, task, None, info.kind, info.max_texts)
        bias = fit_calibration(zero_scorer.logits(None, own)[0], np.array([ex.label for ex in own]))
        zero_logits = zero_scorer.logits(None, test)[0]
        tuned_scorer = PromptScorer(
            service, with_placement(task, config.prompt_placement), projection, info.kind, info.max_texts
        )
        own_labels = np.array([ex.label for ex in own])
        z_final = decode_tensor(final.mean)
        tuned_logits = tuned_scorer.logits(z_final[None], test)[0]
        # The same bias correction on top of the tuned prompt: what separation the prompt adds beyond a bias.
        tuned_bias = fit_calibration(tuned_scorer.logits(z_final[None], own)[0], own_labels)
        # What the run serves, as the aggregator chose it on the clients' validation splits; its read-out bias
        # fitted on the same examples as the baseline's, so that serving the baseline is the calibrated baseline.
        choice = final.served or ServedChoice(
            served="baseline", reason="the run validated no global prompt against the baseline: serving the baseline"
        )
        z_served = decode_tensor(choice.mean) if choice.mean is not None else z_final
        if choice.served == "baseline":
            served_logits, served_bias = zero_logits, bias
        elif np.array_equal(z_served, z_final):
            served_logits, served_bias = tuned_logits, tuned_bias
        else:
            served_logits = tuned_scorer.logits(z_served[None], test)[0]
            served_bias = fit_calibration(tuned_scorer.logits(z_served[None], own)[0], own_labels)
    finally:
        procs.stop_all()
    labels = np.array([ex.label for ex in test])
    zero_ok = zero_logits.argmax(-1) == labels
    cal_ok = calibrated_predictions(zero_logits, bias) == labels
    tuned_ok = tuned_logits.argmax(-1) == labels
    tuned_cal_ok = calibrated_predictions(tuned_logits, tuned_bias) == labels
    served_ok = calibrated_predictions(served_logits, served_bias) == labels
    zero_loss = float(label_cross_entropy(zero_logits[None], labels)[0][0])
    tuned_loss = float(label_cross_entropy(tuned_logits[None], labels)[0][0])
    report = {
        "name": cfg.name,
        "config": asdict(cfg),
        "run_config": config.model_dump(mode="json"),
        "model": info.model_dump(),
        "test_examples": len(test),
        "zero_shot_test_accuracy": float(zero_ok.mean()),
        "zero_shot_test_loss": zero_loss,
        "calibrated_zero_shot_test_accuracy": float(cal_ok.mean()),
        "calibration_examples": len(own),
        "tuned_test_accuracy": float(tuned_ok.mean()),
        "tuned_test_loss": tuned_loss,
        # Exact McNemar p-values on the same test examples: a gain is a gain only well below 0.05.
        "tuned_vs_zero_shot_p": mcnemar_exact(tuned_ok, zero_ok),
        "tuned_vs_calibrated_p": mcnemar_exact(tuned_ok, cal_ok),
        "tuned_calibrated_test_accuracy": float(tuned_cal_ok.mean()),
        "tuned_calibrated_vs_calibrated_p": mcnemar_exact(tuned_cal_ok, cal_ok),
        # What a user deploys: the prompt the run chose on validation (tuned or the baseline) with its bias.
        "served": choice.served,
        "served_test_accuracy": float(served_ok.mean()),
        "served_vs_calibrated_p": mcnemar_exact(served_ok, cal_ok),
        "served_selection": choice.model_dump(mode="json", exclude={"mean"}),
        "label_words": list(task.label_words),
        "rounds": [
            {
                "round": rec.round,
                "state": rec.state,
                "val_accuracy": rec.val_accuracy,
                "val_loss": rec.val_loss,
                "queries": rec.queries,
                "sequences": rec.sequences,
                "tokens": rec.tokens,
                "bytes_up": rec.bytes_up,
                "bytes_down": rec.bytes_down,
                "service_bytes": rec.service_bytes,
                "clients": len(rec.reporters),
                "seconds": (rec.closed_at or rec.opened_at) - rec.opened_at,
            }
            for rec in status.history
        ],
        "wall_seconds": time.monotonic() - t_start,
    }
    write_report(out, report)
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
        info, config, task, z_served, metrics, f"fedbpt demo {cfg.name}", choice=choice, bias=served_bias
    )
    write_prompt(out / "prompt.json", payload)
    print(
        f"test accuracy on {len(test)} examples: zero-shot {report['zero_shot_test_accuracy']:.4f} | calibrated "
        f"zero-shot {report['calibrated_zero_shot_test_accuracy']:.4f} | tuned {report['tuned_test_accuracy']:.4f} "
        f"(McNemar p {report['tuned_vs_zero_shot_p']:.2g} vs zero-shot, {report['tuned_vs_calibrated_p']:.2g} vs "
        f"calibrated) | tuned + calibration {report['tuned_calibrated_test_accuracy']:.4f} "
        f"(p {report['tuned_calibrated_vs_calibrated_p']:.2g} vs calibrated) | served: {choice.served} "
        f"{report['served_test_accuracy']:.4f} (p {report['served_vs_calibrated_p']:.2g} vs calibrated) | "
        f"{report['wall_seconds']:.0f} s | report: {out / 'report.json'}\n"
        f"served prompt: {choice.reason}"
    )
    return report


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


def run(args: argparse.Namespace) -> None:
    values = {k: getattr(args, k) for k in DemoConfig.__dataclass_fields__ if getattr(args, k, None) is not None}
    if values.get("alpha") == 0:
        values["alpha"] = None
    cfg = config_from(values, _torch_sees_cuda)
    print(
        f"preset {cfg.preset}: {cfg.rounds} rounds of {cfg.local_iterations} x {cfg.local_popsize} candidates",
        flush=True,
    )
    run_demo(cfg)
