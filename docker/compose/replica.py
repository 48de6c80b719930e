"""`fedbpt client ...` for a compose replica, with a `--client-id` that outlives its container.

With `--partition auto/N` the aggregator hands out the parts of the pool keyed by the client's instance
name, by default the host name. A replica's host name is its container id, new after `docker compose down`
and `up`: the new replicas would find every part claimed by the old ones and the run could not go on.
Compose names replica n `<project>-client-<n>` again on every `up`, and Docker's DNS resolves that name to
the container, so the name that resolves to this container's own address is a stable instance name.

Its prompt file goes where the user can reach it: with FEDBPT_PROMPT_DIR set (compose: the `reports`
volume's /reports/<run id>/prompts), to <dir>/<client id>.json unless `--prompt-out` is given, so that
`docker compose cp report:/reports/. ./runs` copies it out with the report.

    python3 replica.py client --service ... --partition auto/N ...   (FEDBPT_REPLICA_PREFIX=<project>-client)
"""

from __future__ import annotations

import os
import socket
import sys

# Compose numbers replicas from 1 and reuses the lowest free numbers; far more than any scale in use.
MAX_REPLICAS = 256


def replica_name(prefix: str) -> str:
    own = socket.gethostbyname(socket.gethostname())
    for n in range(1, MAX_REPLICAS + 1):
        name = f"{prefix}-{n}"
        try:
            if own in socket.gethostbyname_ex(name)[2]:
                return name
        except OSError:  # no such replica (never created, or exited and out of DNS)
            continue
    sys.exit(f"replica: none of {prefix}-1..{MAX_REPLICAS} resolves to this container's address {own}")


def client_argv(argv: list[str], env: dict[str, str], name=replica_name) -> list[str]:
    """The `fedbpt client` argv with this replica's `--client-id` and, under FEDBPT_PROMPT_DIR, its `--prompt-out`."""
    argv = list(argv)
    if "--client-id" not in argv:
        prefix = env.get("FEDBPT_REPLICA_PREFIX")
        if not prefix:
            sys.exit("replica: set FEDBPT_REPLICA_PREFIX to <compose project>-<service>, e.g. fedbpt-client")
        argv += ["--client-id", name(prefix)]
    prompt_dir = env.get("FEDBPT_PROMPT_DIR")
    if prompt_dir and "--prompt-out" not in argv:
        argv += ["--prompt-out", f"{prompt_dir.rstrip('/')}/{argv[argv.index('--client-id') + 1]}.json"]
    return argv


def main() -> None:
    argv = client_argv(sys.argv[1:], dict(os.environ))
    from fedbpt.cli import main as fedbpt

    fedbpt(argv)
    if os.environ.get("FEDBPT_PROMPT_DIR") and "--prompt-out" not in sys.argv[1:]:
        print(
            f"replica: {argv[argv.index('--prompt-out') + 1]} is in the `reports` volume: "
            "`docker compose cp report:/reports/. ./runs` copies it out",
            flush=True,
        )


if __name__ == "__main__":
    main()
