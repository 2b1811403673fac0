# syntax=docker/dockerfile:1
# otc-devnet: the local Unicity-like UTXO chain, served over Electrum on port 50001.
# Build from the repository root: docker build -f docker/devnet.Dockerfile -t otc-devnet .
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
COPY libs/otc-devnet/pyproject.toml libs/otc-devnet/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --package otc-devnet
COPY libs/otc-devnet libs/otc-devnet
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package otc-devnet

FROM ${PYTHON_IMAGE}
# /data holds the chain and the faucet key; a named volume mounted there starts owned by otc.
RUN groupadd --system --gid 10001 otc \
 && useradd --system --uid 10001 --gid otc --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin otc \
 && mkdir /data && chown 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so that Kubernetes can check runAsNonRoot against the image.
USER 10001:10001
EXPOSE 50001
ENTRYPOINT ["otc-devnet"]
CMD ["--host", "0.0.0.0", "--port", "50001", "--data-dir", "/data", "--autominer", "2"]
