"""`fedbpt enroll-codes`: one-time enroll codes from the aggregator, one per data owner.

Each code registers one new client id, once (`fedbpt client --enroll-key CODE`); a leaked code costs one id, not
the run, as the shared enroll key would. Once codes are minted on an aggregator without an enroll key, registering
takes a code.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aggregator", required=True, help="aggregator URL")
    parser.add_argument(
        "--operator-key",
        default=os.environ.get("FEDBPT_OPERATOR_KEY"),
        help="the aggregator's operator key (env FEDBPT_OPERATOR_KEY)",
    )
    parser.add_argument("--count", type=int, default=1, help="codes to mint, 1-1000 (default 1)")
    parser.add_argument("--output", default=None, metavar="FILE", help="write the codes here (mode 0600), one per line")
    parser.add_argument("--ca-cert", default=None, metavar="FILE", help="CA certificate (PEM) to trust for HTTPS")
    parser.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout, seconds")


def run(args: argparse.Namespace) -> int:
    import httpx

    from fed_clients.errors import FatalError, unreachable
    from fed_clients.http import RequestFailed, RetryingClient
    from fedbpt_wire.federation import EnrollCodes, EnrollCodesRequest

    if not args.operator_key:
        raise ValueError("--operator-key (or FEDBPT_OPERATOR_KEY) is needed: only the operator mints enroll codes")
    body = EnrollCodesRequest(count=args.count).model_dump()
    http = RetryingClient(
        args.aggregator, args.operator_key, timeout=args.timeout, verify=args.ca_cert or True, retries=2
    )
    try:
        codes = EnrollCodes.model_validate(http.request("POST", "/v1/enroll-codes", body)).codes
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        raise unreachable("aggregator", args.aggregator, exc) from None
    except RequestFailed as exc:
        raise FatalError(
            f"the aggregator at {args.aggregator} refused the codes (HTTP {exc.status}: {exc.detail})"
        ) from None
    finally:
        http.close()
    if args.output:
        path = Path(args.output)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(codes) + "\n")
        print(f"{len(codes)} enroll codes written to {path}: give each data owner one (fedbpt client --enroll-key)")
    else:
        print("\n".join(codes))
    return 0
