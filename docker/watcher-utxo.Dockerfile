# syntax=docker/dockerfile:1
# chain-watcher-utxo: follows one UTXO chain over Electrum (--chain UNICITY); port 8081.
# Build from the repository root: docker build -f docker/watcher-utxo.Dockerfile -t otc-watcher-utxo .
ARG PYTHON_IMAGE=python:3.11-slim
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS builder
COPY --from=uv /uv /usr/local/bin/uv
# The venv is built against the final image's own interpreter (same base image), never a
# downloaded one, so its python symlink resolves after the copy.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
# Third-party dependencies come from the lock alone, so this layer is rebuilt only when
# uv.lock or a pyproject changes, and is shared by every image with the same dependencies.
COPY pyproject.toml uv.lock ./
COPY libs/otc-common/pyproject.toml libs/otc-common/
COPY services/chain-watcher-utxo/pyproject.toml services/chain-watcher-utxo/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --package otc-watcher-utxo
COPY libs/otc-common libs/otc-common
COPY services/chain-watcher-utxo services/chain-watcher-utxo
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package otc-watcher-utxo

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 otc \
 && useradd --system --uid 10001 --gid otc --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin otc
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OTC_HTTP_PORT=8081
# Numeric, so that Kubernetes can check runAsNonRoot against the image.
USER 10001:10001
EXPOSE 8081
ENTRYPOINT ["python", "-m", "otc_watcher_utxo"]
