"""Wire schemas and the tensor codec shared by the service, the clients and the aggregator.

Kept free of torch and transformers so a client installs only numpy, pydantic and httpx.
"""
