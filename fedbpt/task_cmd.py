"""`fedbpt task`: print a built-in task as a spec file to start from, or check a spec file."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["list", "show", "check"],
        help="list: the built-in tasks; show NAME|FILE: the task as a spec (JSON); check FILE: validate a spec file",
    )
    parser.add_argument("task", nargs="?", metavar="NAME|FILE")


def run(args: argparse.Namespace) -> int:
    from fed_clients.tasks import TASKS, get_task

    if args.action == "list":
        for name, task in sorted(TASKS.items()):
            print(f"{name:<16} {len(task.label_words)} classes  {task.description}")
        return 0
    if not args.task:
        raise ValueError(f"fedbpt task {args.action} needs a task name or a spec file")
    task = get_task(args.task)
    if args.action == "show":
        print(json.dumps(task.to_spec(), indent=2))
    else:
        labels = ", ".join(f"{n} -> {w!r}" for n, w in zip(task.names, task.label_words))
        print(
            f"{args.task}: task {task.name}, columns {', '.join(task.fields)}, label column {task.label_column!r}, "
            f"labels {labels}"
        )
    return 0
