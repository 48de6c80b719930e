"""The FedBPT aggregator: rounds, client sampling, the global search distribution, durable state.

Imports no torch. `aggregator.app.create_app` and `aggregator.server.serve` need fastapi, uvicorn
and cma; `aggregator.cli` imports them only when it serves, so the `fedbpt` CLI can register the
flags on an install without them.
"""
