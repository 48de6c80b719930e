# syntax=docker/dockerfile:1
# The aggregator: no torch, no model; its state is one SQLite file under /state (a named volume in compose).
#   docker build -f docker/aggregator.Dockerfile -t fedbpt/aggregator:local .   (from the repository root)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
RUN pip install ".[aggregator]"

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
