# syntax=docker/dockerfile:1
# A federated client: the `client` extra only (numpy, cma, httpx, pydantic, matplotlib); no torch, no model.
# It reads the embedded data from FEDBPT_CACHE_DIR (the shared `assets` volume in compose) and fetches it
# there itself when run alone.
#   docker build -f docker/client.Dockerfile -t fedbpt/client:local .   (from the repository root)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FEDBPT_CACHE_DIR=/cache

WORKDIR /src
COPY . .
RUN pip install ".[client]"

RUN useradd --create-home --uid 10001 --user-group fedbpt \
    && mkdir -p /cache \
    && chown fedbpt:fedbpt /cache
USER fedbpt
WORKDIR /home/fedbpt

# No HEALTHCHECK: a client listens on no port; it exits 0 when the run is done, non-zero on failure.
ENTRYPOINT ["fedbpt"]
CMD ["client", "--service", "http://inference:8000", "--aggregator", "http://aggregator:8100", "--data", "default"]
