# The aggregator: no torch, no model; its state is one SQLite file under /state (a named volume in compose).
#   docker build -f docker/aggregator.Dockerfile -t fedbpt/aggregator:local .   (from the repository root)
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
    pip-install ".[aggregator]"

# The runtime image: the virtualenv only; the sources and the build args stay behind.
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 --user-group fedbpt \
    && mkdir -p /state \
    && chown fedbpt:fedbpt /state
USER fedbpt
WORKDIR /home/fedbpt

EXPOSE 8100
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8100/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["fedbpt"]
CMD ["aggregator", "--host", "0.0.0.0", "--port", "8100", "--db", "/state/aggregator.db"]
