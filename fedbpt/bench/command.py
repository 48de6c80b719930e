"""`fedbpt bench`: run a grid (fedbpt.bench.grid) against one service, resuming where a previous run stopped, then
write its tables and plots."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from .grid import GRIDS, Grid


def add_arguments(parser) -> None:
    parser.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        default="default",
        help="quick: under 10 minutes on 2 cores; default: about an hour; full: every setting",
    )
    parser.add_argument("--quick", action="store_const", const="quick", dest="grid", help="same as --grid quick")
    parser.add_argument("--config", default=None, help="a grid as JSON (e.g. configs/paper-roberta-large.json)")
    parser.add_argument(
        "--out",
        default=None,
        help="results directory (default bench/results/<date>-<grid>); an existing one resumes: finished runs are kept",
    )
    parser.add_argument(
        "--task",
        default=None,
        metavar="NAME|FILE",
        help="run the grid on this task only: a built-in task or a task spec file (its name picks the "
        "embedded data, e.g. a spec named amazon_snippets with your own template and words)",
    )
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
        import fedbpt_assets as assets

        assets.fetch_all()
    # The runs and the report only once there is a grid to run: `fedbpt --help` stays light.
    from .report import write_report
    from .runs import Bench

    bench = Bench(grid, out, args.service, args.api_key)
    total = len(bench.settings()) * len(grid.methods)
    print(f"grid {grid.name}: {total} runs ({len(bench.done)} already in {out}); logs in {out / 'logs'}", flush=True)
    t0 = time.monotonic()
    rows = bench.run(progress=lambda line: print(line, flush=True))
    print(write_report(grid, rows, out))
    print(f"\n{len(rows)} runs in {time.monotonic() - t0:.0f} s; results in {out}")
