"""The bench's report: a table per grid (means over seeds with their spread, paired tests against zero-shot
and the calibrated baseline, costs per client and round), the comparison with the paper, the curves, and
the size of one population's upload in each prompt wire form."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fed_clients.data import load_splits
from fed_clients.evaluation import mcnemar_exact
from fed_clients.tasks import get_task
from fedbpt_wire.projection import Projection
from fedbpt_wire.schemas import ProjectedPrompts, ScoreRequest
from fedbpt_wire.tensors import encode_tensor

from .grid import LABELS, Grid

# RoBERTa-large, non-IID SST-2 (FedBPT paper, Table 2), beside which ours is read.
PAPER_SST2 = {"fedbpt": 86.47, "fedavg-z": 84.17, "zero-shot": 83.6, "icl": 79.7, "fedprompt": 85.55}


def first_reaching(curve: list[float | None], fraction: float = 0.95) -> int | None:
    """Index of the first point at `fraction` of the curve's last value."""
    if not curve or curve[-1] is None:
        return None
    target = fraction * curve[-1]
    return next(i for i, a in enumerate(curve) if a is not None and a >= target)


def paired_p(rs: list[dict], baseline: list[dict]) -> float | None:
    """Exact McNemar p of a method against a baseline, pooling the (seed, test example) pairs of all seeds."""
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
        per_client_round = [
            (r["bytes_up"] / (r["clients"] * len(r["rounds"])), r["bytes_down"] / (r["clients"] * len(r["rounds"])))
            for r in rs
            if r["rounds"] and r.get("clients")
        ]
        to95 = []
        for r in rs:
            i = first_reaching(r["curve"])
            if i is not None and r["rounds"]:
                to95.append((sum(x["queries"] for x in r["rounds"][:i]), sum(x["sequences"] for x in r["rounds"][:i])))
        rss = [r["client_rss_mb"] for r in rs if r.get("client_rss_mb") is not None]
        zero, calibrated = (groups.get((task, regime, partition, m), []) for m in ("zero-shot", "calibrated"))
        out.append(
            {
                "task": task,
                "regime": regime,
                "partition": partition,
                "method": method,
                "seeds": len(rs),
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
            }
        )
    return out


def _num(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = (
    "task",
    "regime",
    "partition",
    "method",
    "test acc % (mean ± std)",
    "McNemar p vs zero-shot / calibrated",
    "queries",
    "sequences",
    "queries / sequences to 95%",
    "KiB up / down per client-round (aggregator link)",
    "KiB total (aggregator link)",
    "KiB total (service link)",
    "client peak RSS MiB",
    "client holds",
    "wall s",
)


def markdown_table(summary: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in summary:
        cells = [
            s["task"],
            s["regime"],
            s["partition"],
            LABELS.get(s["method"], s["method"]),
            s["accuracy"],
            f"{_num(s['p_vs_zero_shot'], '.2g')} / {_num(s['p_vs_calibrated'], '.2g')}",
            _num(s["queries"]),
            _num(s["sequences"]),
            f"{_num(s['queries_to_95'])} / {_num(s['sequences_to_95'])}",
            f"{_kib(s['up_per_client_round'])} / {_kib(s['down_per_client_round'])}",
            _kib(s["bytes_total"]),
            _kib(s["service_bytes_total"]),
            _num(s["client_rss_mb"]),
            s["client_holds"],
            _num(s["wall_seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_comparison(summary: list[dict]) -> str:
    """Each setting's methods as gaps to FedBPT, beside the paper's RoBERTa-large non-IID SST-2 numbers."""
    out = []
    settings = sorted({(s["task"], s["regime"], s["partition"]) for s in summary})
    for task, regime, partition in settings:
        ours = {
            s["method"]: s["accuracy_mean"]
            for s in summary
            if (s["task"], s["regime"], s["partition"]) == (task, regime, partition)
        }
        if "fedbpt" not in ours:
            continue
        out.append(f"\n{task}, {regime}, {partition} (ours: SmolLM2-135M unless the grid says otherwise)\n")
        out.append("| method | paper acc % | paper gap to FedBPT | our acc % | our gap to FedBPT |")
        out.append("|---|---|---|---|---|")
        for method in sorted(ours, key=lambda m: -ours[m]):
            paper = PAPER_SST2.get(method)
            paper_gap = None if paper is None else paper - PAPER_SST2["fedbpt"]
            out.append(
                f"| {LABELS.get(method, method)} | {_num(paper, '.2f')} | {_num(paper_gap, '+.2f')} | "
                f"{100 * ours[method]:.1f} | {100 * (ours[method] - ours['fedbpt']):+.1f} |"
            )
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
        sent = np.array(
            [np.concatenate([[0], np.cumsum([x["bytes_up"] + x["bytes_down"] for x in r["rounds"]])])[:n] for r in rs]
        )
        out[method] = (np.arange(n), queries.mean(0), sent.mean(0), np.nanmean(acc, 0))
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(rows)
    flat = {
        r["method"]: np.mean([x["test_accuracy"] for x in rows if x["method"] == r["method"]])
        for r in rows
        if not r["curve"]
    }
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
    cases = [("SmolLM2-135M", 5, 5, 576, 100, 16), ("paper (RoBERTa-large, popsize 20)", 20, 50, 1024, 500, 32)]
    out = []
    for name, pop, length, hidden, dim, n in cases:
        batch = (texts * (n // len(texts) + 1))[:n]
        projection = Projection(0, dim, length, hidden, 0.02, 1.0)
        z = np.random.default_rng(0).standard_normal((pop, dim))
        sizes = {}
        for form in ("float32", "float16"):
            req = ScoreRequest(prompts=encode_tensor(projection(z), form), texts=batch, label_words=label_words)
            sizes[form] = len(req.model_dump_json(exclude_none=True))
        req = ScoreRequest(
            projected=ProjectedPrompts(z=encode_tensor(z, "float32"), projection=projection.spec),
            texts=batch,
            label_words=label_words,
        )
        sizes["seed"] = len(req.model_dump_json(exclude_none=True))
        texts_only = len(
            ScoreRequest(
                prompts=encode_tensor(np.zeros((pop, 0, hidden))), texts=batch, label_words=label_words
            ).model_dump_json(exclude_none=True)
        )
        out.append(
            {
                "case": name,
                "P": pop,
                "L": length,
                "D": hidden,
                "d": dim,
                "N": n,
                **sizes,
                "texts_and_framing": texts_only,
            }
        )
    return out


def wire_table(rows: list[dict]) -> str:
    lines = [
        "| case | P x L x D (d) | N texts | float32 KiB | float16 KiB | seed + z KiB | seed / float32 | "
        "of which texts KiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['P']} x {r['L']} x {r['D']} ({r['d']}) | {r['N']} | {r['float32'] / 1024:.1f} | "
            f"{r['float16'] / 1024:.1f} | {r['seed'] / 1024:.1f} | {r['seed'] / r['float32']:.3f} | "
            f"{r['texts_and_framing'] / 1024:.1f} |"
        )
    return "\n".join(lines)


def write_report(grid: Grid, rows: list[dict], out: Path) -> str:
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
        table = csv.writer(f)
        table.writerow(
            [
                "key",
                "round",
                "curve_accuracy_at_start",
                "queries",
                "sequences",
                "bytes_up",
                "bytes_down",
                "service_bytes_up",
                "service_bytes_down",
                "val_accuracy",
            ]
        )
        for r in rows:
            for i, x in enumerate(r["rounds"]):
                acc = r["curve"][i] if i < len(r["curve"]) else None
                table.writerow(
                    [
                        r["key"],
                        x["round"],
                        acc,
                        x["queries"],
                        x["sequences"],
                        x["bytes_up"],
                        x["bytes_down"],
                        x["service_bytes_up"],
                        x["service_bytes_down"],
                        x["val_accuracy"],
                    ]
                )
    for setting in sorted({(r["task"], r["regime"], r["partition"]) for r in rows}):
        chosen = [r for r in rows if (r["task"], r["regime"], r["partition"]) == setting]
        # A task may be a spec file's path: its slashes must not become directories.
        plot(chosen, out / f"curves_{'_'.join(setting).replace('/', '_')}.png", " / ".join(setting))
    task = get_task(grid.tasks[0])
    sample = [task.render(ex.fields, "causal") for ex in load_splits(grid.data, task)["train"][:32]]
    wire = wire_sizes(sample, list(task.label_words))
    text = "\n\n".join(
        [
            f"# fedbpt bench: grid `{grid.name}`, {time.strftime('%Y-%m-%d')}",
            f"Model {grid.model} ({grid.dtype}); {grid.clients} clients; {grid.rounds} rounds; "
            f"d = {grid.intrinsic_dim}, "
            f"L = {grid.prompt_length}, popsize {grid.popsize}, {grid.local_iterations} local iterations of "
            f"{grid.batch_size} examples; test {grid.test_size} examples (curves on the first {grid.curve_size}); "
            f"seeds {list(grid.seeds)}. Queries and bytes are training costs, measured on the wire; "
            "evaluation queries are the bench's own and not counted. "
            "Bytes on the aggregator link include idle polling.",
            markdown_table(summary),
            "## Against the paper (RoBERTa-large, non-IID SST-2, Table 2)" + paper_comparison(summary),
            "## One population's upload to the service, by prompt wire form (measured JSON bodies)\n\n"
            + wire_table(wire),
        ]
    )
    (out / "results.md").write_text(text + "\n")
    (out / "grid.json").write_text(json.dumps(asdict(grid), indent=2))
    return text
