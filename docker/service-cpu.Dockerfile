# syntax=docker/dockerfile:1
# The inference service on CPU: slim Python, the CPU build of PyTorch, the PyTorch engine.
# It also runs `fedbpt assets fetch` (the compose `assets` service): the conversion of the embedded default
# model needs torch and transformers 5, which this image has and the vLLM image does not.
#   docker build -f docker/service-cpu.Dockerfile -t fedbpt/service-cpu:local .   (from the repository root)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FEDBPT_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface

# The CPU wheel first, from PyTorch's own index: `.[service]` then finds torch satisfied and keeps it.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY . .
RUN pip install ".[service]"

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
