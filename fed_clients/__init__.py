"""FedBPT clients: local data, the shared projection, CMA-ES over z, and HTTP clients of the two servers.

Depends on numpy, cma, httpx and pydantic only: a client never installs torch or a model.
"""
