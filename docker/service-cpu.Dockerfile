# The inference service on CPU: slim Python, a CPU build of PyTorch, the PyTorch engine.
# It also runs `fedbpt assets fetch` (the compose `assets` service): the conversion of the embedded default
# model needs torch and transformers 5, which this image has and the vLLM image does not.
#   docker build -f docker/service-cpu.Dockerfile -t fedbpt/service-cpu:local .   (from the repository root)
# Build args and the optional `ca_bundle` secret: docs/docker.md, "Building the images". Needs BuildKit
# (the default of `docker compose build` and of Docker >= 23 with buildx) for the secret mount.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
# Empty TORCH_INDEX_URL: torch comes from the wheelhouse (docker/wheels/) or the pip index, like any package.
ARG TORCH_REQUIREMENT=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
COPY docker/pip-install /usr/local/bin/pip-install
COPY docker/torch-index-check /usr/local/bin/torch-index-check
RUN python3 -m venv /opt/venv
# torch first, in its own layer: `.[service]` then finds it satisfied and keeps that build, and a change to
# the project's code does not reinstall it. An index that does not answer fails at once with one line that
# points at the offline recipe, not after pip's retries with its bare "No matching distribution".
COPY docker/wheels/ /wheels/
RUN --mount=type=secret,id=ca_bundle,required=false \
    if [ -n "$TORCH_INDEX_URL" ]; then python3 /usr/local/bin/torch-index-check "$TORCH_INDEX_URL"; fi \
    && pip-install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_REQUIREMENT"
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
    pip-install ".[service]" \
    && python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# The runtime image: the virtualenv only; the wheelhouse, the sources and the build args stay behind.
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    FEDBPT_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface
COPY --from=build /opt/venv /opt/venv
# Non-root; /cache is created here owned by the user, so an empty named volume mounted on it inherits that.
RUN useradd --create-home --uid 10001 --user-group fedbpt \
    && mkdir -p /cache \
    && chown fedbpt:fedbpt /cache
USER fedbpt
WORKDIR /home/fedbpt

EXPOSE 8000
# No curl in slim images: Python's urllib. Any error (refused, timeout, non-2xx) exits non-zero.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["fedbpt"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--engine", "torch"]
