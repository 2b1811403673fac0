# syntax=docker/dockerfile:1
# otc-cli: the `otc` command and docker/setup.py, which prepares the docker compose stack.
# Build from the repository root: docker build -f docker/cli.Dockerfile -t otc-cli .
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
COPY libs/otc-devnet/pyproject.toml libs/otc-devnet/
COPY services/engine/pyproject.toml services/engine/
COPY services/chain-watcher-evm/pyproject.toml services/chain-watcher-evm/
COPY libs/otc-cli/pyproject.toml libs/otc-cli/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --package otc-cli
COPY libs/otc-common libs/otc-common
COPY libs/otc-devnet libs/otc-devnet
COPY services/engine services/engine
COPY services/chain-watcher-evm services/chain-watcher-evm
COPY libs/otc-cli libs/otc-cli
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package otc-cli

FROM ${PYTHON_IMAGE}
# What docker/setup.py writes: the registry, the dev seed, the token state. Named volumes
# mounted on these directories start owned by otc.
RUN groupadd --system --gid 10001 otc \
 && useradd --system --uid 10001 --gid otc --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin otc \
 && mkdir -p /etc/otc /var/lib/otc/seed /var/lib/otc/state \
 && chown 10001:10001 /etc/otc /var/lib/otc/seed /var/lib/otc/state
COPY --from=builder /opt/venv /opt/venv
COPY docker/setup.py /opt/otc/setup.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so that Kubernetes can check runAsNonRoot against the image.
USER 10001:10001
ENTRYPOINT ["otc"]
