"""`fedbpt client ...` for a compose replica, with a `--client-id` that outlives its container.

With `--partition auto/N` the aggregator hands out the parts of the pool keyed by the client's instance
name, by default the host name. A replica's host name is its container id, new after `docker compose down`
and `up`: the new replicas would find every part claimed by the old ones and the run could not go on.
Compose names replica n `<project>-client-<n>` again on every `up`, and Docker's DNS resolves that name to
the container, so the name that resolves to this container's own address is a stable instance name.

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


def main() -> None:
    argv = sys.argv[1:]
    if "--client-id" not in argv:
        prefix = os.environ.get("FEDBPT_REPLICA_PREFIX")
        if not prefix:
            sys.exit("replica: set FEDBPT_REPLICA_PREFIX to <compose project>-<service>, e.g. fedbpt-client")
        argv += ["--client-id", replica_name(prefix)]
    from fedbpt.cli import main as fedbpt

    fedbpt(argv)


if __name__ == "__main__":
    main()
