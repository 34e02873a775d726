# The prediction service (api.py) on CPU, as a non-root user.  The model is not in the image: mount it.
#
#   docker build -t cater-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/models:/app/models:ro" cater-serve
#   docker run --rm -p 8000:8000 -v "$PWD/models:/app/models:ro" -e CATER_MODEL_PATH=models/cnn.onnx cater-serve
#
# Build arguments: BASE_IMAGE (any Debian-like image with python3 >= 3.11 and its venv module), TORCH_PACKAGES and
# TORCH_PIP_ARGS (where the CPU-only PyTorch wheels come from), EXTRA_PACKAGES (timm, for fine-tuned backbones).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ARG EXTRA_PACKAGES="timm>=1.0.20"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# PyTorch in a layer of its own: changing requirements-serve.txt does not download it again.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install ${TORCH_PIP_ARGS} ${TORCH_PACKAGES}
COPY requirements-serve.txt /tmp/
RUN /opt/venv/bin/pip install -r /tmp/requirements-serve.txt ${EXTRA_PACKAGES}

FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 CATER_MODEL_PATH=models/cnn.pt \
    CATER_HOST=0.0.0.0 CATER_PORT=8000
RUN useradd --uid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin cater
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root *.py ./
COPY --chown=root:root ui ./ui
# readable by the service's user whatever the umask of the checkout they came from
RUN chmod 0644 ./*.py && chmod -R u=rwX,go=rX ./ui
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# api.py runs uvicorn with the request-header deadline and the connection bound (CATER_* settings, serve_config.py)
CMD ["python3", "api.py"]
