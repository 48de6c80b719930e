# A federated client: the `client` extra only (numpy, cma, httpx, pydantic, matplotlib); no torch, no model.
# It reads the embedded data from FEDBPT_CACHE_DIR (the shared `assets` volume in compose) and fetches it
# there itself when run alone. It also carries the compose stack's two helpers (docker/compose/): the
# replicas' launcher and the one-shot `report`.
#   docker build -f docker/client.Dockerfile -t fedbpt/client:local .   (from the repository root)
# Build args and the optional `ca_bundle` secret: docs/docker.md, "Building the images".
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
COPY docker/pip-install /usr/local/bin/pip-install
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fedbpt/ fedbpt/
COPY fedbpt_wire/ fedbpt_wire/
COPY fedbpt_assets/ fedbpt_assets/
COPY fedbpt_flower/ fedbpt_flower/
COPY inference_service/ inference_service/
COPY fed_clients/ fed_clients/
COPY aggregator/ aggregator/
RUN --mount=type=secret,id=ca_bundle,required=false \
    pip-install ".[client]"

# The runtime image: the virtualenv and the compose helpers; the sources and the build args stay behind.
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    FEDBPT_CACHE_DIR=/cache
COPY --from=build /opt/venv /opt/venv
COPY docker/compose/ /opt/fedbpt-compose/
# /reports and /state: created owned by the user, so the empty volumes mounted on them are writable.
RUN useradd --create-home --uid 10001 --user-group fedbpt \
    && mkdir -p /cache /reports /state \
    && chown fedbpt:fedbpt /cache /reports /state
USER fedbpt
WORKDIR /home/fedbpt

# No HEALTHCHECK: a client listens on no port; it exits 0 when the run is done, non-zero on failure.
ENTRYPOINT ["fedbpt"]
CMD ["client", "--service", "http://inference:8000", "--aggregator", "http://aggregator:8100", "--data", "default"]
