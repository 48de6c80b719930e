"""`fedbpt predict` and `fedbpt evaluate`: a tuned prompt file put to use against a service.

Only the service is needed besides the prompt file: it holds the model, the file holds everything else (the
projection's seed and z, the template, the label words).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
from pathlib import Path

# Rows handed to the scorer at once: it splits them further to the service's limits; this bounds memory only.
ROWS_PER_STEP = 256


def _service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, metavar="FILE", help="a prompt file (fedbpt-prompt/1 or /2)")
    parser.add_argument("--service", required=True, help="inference service URL (serving the prompt's model)")
    parser.add_argument("--api-key", default=os.environ.get("FEDBPT_API_KEY"), help="service key (env FEDBPT_API_KEY)")
    parser.add_argument("--ca-cert", default=None, metavar="FILE", help="CA certificate (PEM) to trust for HTTPS")
    parser.add_argument("--timeout", type=float, default=300.0, help="HTTP timeout per request, seconds")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    _service_arguments(parser)
    parser.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help="texts to classify: .csv, .tsv, .jsonl or .parquet with the template's columns",
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="predictions (.csv, .tsv or .jsonl): the input's columns, `prediction` (a label name) "
        "and `p_<label>` per label (default: <input>.predictions.csv)",
    )


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _service_arguments(parser)
    parser.add_argument("--data", required=True, metavar="FILE", help="labelled examples, as for `fedbpt client`")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also score the manual prompt (the template alone, no soft prompt) on the same data",
    )
    parser.add_argument("--output", default=None, metavar="FILE", help="also write the numbers as JSON")


def _open(args: argparse.Namespace):
    from .api import Classifier

    return Classifier.open(args.prompt, args.service, args.api_key, ca_cert=args.ca_cert, timeout=args.timeout)


class _Writer:
    def __init__(self, path: Path, columns: list[str]):
        self.path = path
        self.file = open(path, "w", newline="", encoding="utf-8")
        self.jsonl = path.suffix.lower() == ".jsonl"
        if not self.jsonl:
            self.csv = csv.DictWriter(
                self.file,
                fieldnames=columns,
                extrasaction="ignore",
                delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
            )
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.jsonl:
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            self.csv.writerow(row)

    def close(self) -> None:
        self.file.close()


def predict(args: argparse.Namespace) -> int:
    from fed_clients.data import read_inputs

    clf = _open(args)
    task = clf.prompt.task
    out = Path(args.output or Path(args.input).with_suffix(".predictions.csv"))
    if out.suffix.lower() not in (".csv", ".tsv", ".jsonl"):
        raise ValueError(f"--output {out}: expected a .csv, .tsv or .jsonl file")
    rows = read_inputs(args.input, task)
    writer = None
    done = 0
    tty = sys.stderr.isatty()
    try:
        while True:
            step = [row for _, row in itertools.islice(rows, ROWS_PER_STEP)]
            if not step:
                break
            if writer is None:
                probs_cols = [f"p_{name}" for name in task.names]
                writer = _Writer(out, [*step[0], "prediction", *probs_cols])
            probs = clf.probabilities(step)
            for row, p in zip(step, probs):
                row["prediction"] = task.names[int(p.argmax())]
                row.update({f"p_{name}": round(float(q), 6) for name, q in zip(task.names, p)})
                writer.write(row)
            done += len(step)
            line = f"predicted {done} texts ({clf.queries} service queries)"
            print("\r" + line if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    finally:
        if writer is not None:
            writer.close()
        clf.close()
    if writer is None:
        raise ValueError(f"{args.input}: no rows to classify")
    if tty:
        print(file=sys.stderr)
    print(f"{done} predictions written to {out}")
    return 0


def _matrix(confusion: list[list[int]], names: tuple[str, ...]) -> str:
    width = max(8, *(len(n) for n in names)) + 2
    lines = [" " * width + "".join(f"{n:>{width}}" for n in names) + "   <- predicted"]
    for name, row in zip(names, confusion):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> int:
    with _open(args) as clf:
        results = clf.evaluate(args.data, baseline=args.baseline)
    prompt, task = clf.prompt, clf.prompt.task
    n = results.pop("examples")
    print(f"{args.data}: {n} examples, task {task.name}, model {prompt.model['name']}")
    served_title = "served: " + ("tuned + bias" if prompt.served == "tuned" else "manual + bias")
    for which, title in (
        ("served", served_title),
        ("tuned", "tuned prompt, no bias"),
        ("manual", "manual prompt (baseline)"),
    ):
        if which in results:
            r = results[which]
            print(f"{title:<26} accuracy {r['accuracy']:.4f}   macro-F1 {r['macro_f1']:.4f}")
    for which in results:
        print(f"\nconfusion matrix, {which} (rows: true label)\n{_matrix(results[which]['confusion'], task.names)}")
    if args.output:
        Path(args.output).write_text(
            json.dumps(
                {
                    "data": str(args.data),
                    "labels": list(task.names),
                    "service_queries": clf.queries,
                    "served_prompt": prompt.served,
                    **results,
                },
                indent=2,
            )
        )
    return 0
