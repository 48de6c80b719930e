"""Accuracy against scored sequences, from `bench.prompt_study --checkpoints` runs: a table and a plot.

Rows of the same setting (every argument but the seed) are one curve: at each checkpoint the mean and spread over
seeds of the calibrated tuned prompt's test accuracy, beside the calibrated baseline's. Example:

    python -m bench.curve bench/results/2026-12-07-curve.jsonl --plot bench/results/2026-12-07-curve.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

# The arguments that make a setting; the rest (seed, output file, variants string) do not.
SETTING_KEYS = (
    "fitness",
    "basis",
    "placement",
    "init",
    "anchor",
    "prompt_length",
    "intrinsic_dim",
    "popsize",
    "batch_size",
    "sigma0",
    "step_scale",
    "mirrored",
    "bias_every",
    "per_class",
    "dtype",
)
# Runs from before an argument existed ran at what is now its default.
DEFAULTS = {"step_scale": 1.0}


def setting_label(args: dict, varying: list[str]) -> str:
    return ", ".join(f"{k}={args.get(k, DEFAULTS.get(k))}" for k in varying) or "all runs"


def named(where: str) -> tuple[str | None, str]:
    """A filter's optional name ("name: key=value,...") and its pairs."""
    name, sep, pairs = where.partition(":")
    return (name.strip(), pairs) if sep and "=" not in name else (None, where)


def matches(args: dict, where: str) -> bool:
    """Whether a run's arguments hold every `key=value` of a comma-separated filter (values compared as text)."""
    pairs = [kv.split("=", 1) for kv in named(where)[1].split(",") if kv.strip()]
    keys = [(k.strip().replace("-", "_"), v.strip()) for k, v in pairs]
    return all(str(args.get(k, DEFAULTS.get(k))) == v for k, v in keys)


def curves(rows: list[dict], served: str = "mean", names: list[str] | None = None) -> dict[str, list[dict]]:
    """{label: [{sequences, mean, sd, gain, gains, p, seeds}]}, per-seed lists in seed order, checkpoints matched by
    their order in each run. `served`: the search's mean, or the incumbent rule's choice (robust-bias runs).
    `names`: named filters ("name: key=value,..."); a run the first of them matches takes its name as its label."""
    accuracy, p_value = (
        ("tuned_calibrated", "vs_calibrated_p")
        if served == "mean"
        else ("incumbent_calibrated", "incumbent_vs_calibrated_p")
    )
    varying = [k for k in SETTING_KEYS if len({json.dumps(r["args"].get(k, DEFAULTS.get(k))) for r in rows}) > 1]
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        name = next((named(w)[0] for w in names or [] if named(w)[0] and matches(row["args"], w)), None)
        grouped[name or setting_label(row["args"], varying)].append(row)
    out = {}
    for label, runs in grouped.items():
        runs.sort(key=lambda r: r["args"]["seed"])
        points = min(len(r["curve"]) for r in runs)
        series = []
        for i in range(points):
            accs = np.array([r["curve"][i][accuracy] for r in runs])
            gains = accs - np.array([r["calibrated_zero_shot"] for r in runs])
            series.append(
                {
                    "sequences": int(np.mean([r["curve"][i]["sequences"] for r in runs])),
                    "mean": float(accs.mean()),
                    "sd": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                    "gain": float(gains.mean()),
                    "gains": [round(float(g) * 100, 1) for g in gains],
                    "p": [round(r["curve"][i][p_value], 3) for r in runs],
                    "seeds": [r["args"]["seed"] for r in runs],
                }
            )
        out[label] = series
    return out


def plot(table: dict[str, list[dict]], calibrated: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, series in table.items():
        x = [p["sequences"] for p in series]
        y = np.array([p["mean"] for p in series])
        sd = np.array([p["sd"] for p in series])
        ax.plot(x, y, marker="o", label=label)
        ax.fill_between(x, y - sd, y + sd, alpha=0.15)
    ax.axhline(calibrated, color="k", linestyle="--", linewidth=1, label="calibrated manual prompt")
    ax.axhline(calibrated + 0.03, color="k", linestyle=":", linewidth=1, label="calibrated + 3 points")
    ax.set_xlabel("scored sequences (search)")
    ax.set_ylabel("test accuracy, tuned + calibration")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict[str, list[dict]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--plot", type=Path, default=None, help="write the curves as a PNG here")
    ap.add_argument(
        "--served",
        choices=["mean", "incumbent"],
        default="mean",
        help="whose accuracy: the search's mean, or the incumbent rule's choice (robust-bias runs that record it)",
    )
    ap.add_argument(
        "--where",
        action="append",
        default=[],
        help="keep only runs whose arguments match these comma-separated key=value pairs (repeat: any of them), "
        "optionally named for the legend, e.g. --where 'defaults: fitness=ce' --where init=cue",
    )
    args = ap.parse_args(argv)
    rows = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.strip()]
    # Each filter's own message: what a user must change differs (the runs, the filter, or --served).
    rows = [r for r in rows if r.get("curve")]
    if not rows:
        raise SystemExit("no rows with a curve: run bench.prompt_study with --checkpoints")
    rows = [r for r in rows if not args.where or any(matches(r["args"], w) for w in args.where)]
    if not rows:
        raise SystemExit(f"no run matches --where {' / '.join(args.where)}: check the keys and values")
    if args.served == "incumbent":
        rows = [r for r in rows if "incumbent_calibrated" in r["curve"][0]]
        if not rows:
            raise SystemExit("no run records the incumbent: it needs bench.prompt_study --fitness robust-bias runs")
    table = curves(rows, args.served, args.where)
    calibrated = float(np.mean([r["calibrated_zero_shot"] for r in rows]))
    print(f"calibrated manual prompt: {calibrated:.3f} (mean over the runs' seeds)")
    print("| setting | sequences | tuned + calibration | gain (points) per seed | p per seed |")
    print("|---|---|---|---|---|")
    for label, series in table.items():
        for p in series:
            gains = ", ".join(f"{g:+.1f}" for g in p["gains"])
            print(
                f"| {label} | {p['sequences']:,} | {p['mean']:.3f} +- {p['sd']:.3f} | {gains} | "
                f"{', '.join(str(x) for x in p['p'])} |"
            )
    if args.plot:
        plot(table, calibrated, args.plot)
    return table


if __name__ == "__main__":
    main()
