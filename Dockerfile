# syntax=docker/dockerfile:1
# fashion-search HTTP API (and, with another command, the web page) in a container.
#
#   docker build -t fashion-search .                                    # CPU PyTorch, python:3.11-slim
#   docker build -t fashion-search:cuda --build-arg TORCH_VARIANT=cu128 .   # CUDA PyTorch
#   docker run -p 8000:8000 -v ./index:/index:ro -v ./catalog:/catalog:ro -v ./models:/models:ro fashion-search
#
# Volumes: /index (from `fashion-search index`), /catalog (the images it was built from), /models
# (fine-tuned checkpoints; OpenCLIP's downloaded weights under /models/hf). docs/DEPLOY.md has the rest.

# Any Debian-like image: python:3.11-slim by default; a plain Debian base gets Debian's Python 3.11.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS python
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log; \
    fi

FROM python AS build
# Where PyTorch comes from: PyTorch's own index for a variant (cpu, cu126, cu128, ...), with PyPI for
# its dependencies. TORCH_INDEX_URL="" takes torch from pip's ordinary sources (PyPI's default torch
# wheel is a CUDA build), e.g. with PIP_ARGS="--find-links /wheels" for a local wheel folder.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG TORCH_PACKAGES="torch torchvision"
ARG PYPI_INDEX_URL=https://pypi.org/simple
# Extra options for every pip install in this stage (a mirror, --find-links, a constraint file, ...).
ARG PIP_ARGS=""
ARG EXTRAS=serve,ui
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv
# pip's cache is a build cache mount (kept between builds, never in the image).
# A build secret `ca` (a CA bundle for a TLS-intercepting proxy) is used when given, never stored.
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    /opt/venv/bin/pip install $PIP_ARGS \
        ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL" --extra-index-url "$PYPI_INDEX_URL"} \
        $TORCH_PACKAGES
# TORCHVISION_WITHOUT_OPS=1: a CPU torch beside PyPI's CUDA-linked torchvision (deploy/build-local.sh
# does this where only those wheels are at hand); see deploy/torchvision_without_ops.py.
ARG TORCHVISION_WITHOUT_OPS=0
COPY deploy/torchvision_without_ops.py /tmp/
RUN if [ "$TORCHVISION_WITHOUT_OPS" = 1 ]; then /opt/venv/bin/python /tmp/torchvision_without_ops.py; fi
COPY pyproject.toml README.md /src/
COPY src /src/src
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    /opt/venv/bin/pip install $PIP_ARGS --index-url "$PYPI_INDEX_URL" "/src[$EXTRAS]" \
    && /opt/venv/bin/python -c "import fashion_search, torch, torchvision, open_clip, faiss, fastapi, uvicorn" \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

FROM python AS runtime
ARG UID=10001
RUN useradd --uid "${UID}" --user-group --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /index /catalog /models/hf \
    && chown app:app /index /catalog /models /models/hf
COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py /usr/local/bin/fashion-search-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models/hf \
    FASHION_SEARCH_PORT=8000
VOLUME ["/index", "/catalog", "/models"]
USER app
WORKDIR /home/app
EXPOSE 8000
# GET /health on $FASHION_SEARCH_PORT (or $FASHION_SEARCH_HEALTH_URL); the start period covers loading the model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "/usr/local/bin/fashion-search-healthcheck"]
ENTRYPOINT ["fashion-search"]
CMD ["serve", "--index", "/index", "--host", "0.0.0.0", "--port", "8000"]
