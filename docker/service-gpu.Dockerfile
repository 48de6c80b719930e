# The inference service on an NVIDIA GPU: vLLM's official image, the vLLM engine (docs/vllm.md).
# The project goes on top of the image's own vLLM stack: its torch, vllm, triton, flashinfer and transformers
# stay exactly as shipped (pip constraints; vLLM 0.26.0 needs transformers >= 5.5.3 and torch 2.11).
# The embedded default model is converted by the `assets` service (CPU image), not here: see docs/vllm.md.
# Single stage: the vLLM image is the runtime; there is nothing to leave behind but the sources.
#   docker build -f docker/service-gpu.Dockerfile -t fedbpt/service-gpu:local .   (from the repository root)
# Build args and the optional `ca_bundle` secret: docs/docker.md, "Building the images".
ARG BASE_IMAGE=vllm/vllm-openai:v0.26.0
FROM ${BASE_IMAGE}
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FEDBPT_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

COPY docker/pip-install /usr/local/bin/pip-install
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
    python3 -m pip list --format=freeze \
        | grep -iE '^(vllm|torch|torchvision|torchaudio|xformers|triton|flashinfer-python|transformers|tokenizers)==' > /tmp/vllm-pins.txt \
    && cat /tmp/vllm-pins.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 pip-install -c /tmp/vllm-pins.txt ".[service]" \
    && python3 -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"

RUN useradd --create-home --uid 10001 --user-group fedbpt \
    && mkdir -p /cache \
    && chown fedbpt:fedbpt /cache
USER fedbpt
WORKDIR /home/fedbpt

EXPOSE 8000
# vLLM loads and compiles the model before /healthz answers: a long start period.
HEALTHCHECK --interval=10s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["fedbpt"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--engine", "vllm"]
