# The gateway image the Kubernetes manifests run (rollout.kubernetes.image): the package opener (init
# container) and the TLS 1.3 gateway, as a non-root user with a read-only root filesystem.
#   docker build -f envs/gateway.Dockerfile -t registry.internal/ft2prod/gateway:0.1.0 .
#   docker push registry.internal/ft2prod/gateway:0.1.0   # prints the digest: set rollout.kubernetes.image to NAME:TAG@sha256:<digest>
# Not built on our CI machines (no container engine there); the manifests that use it are validated offline.
# With engine.backend pytorch the gateway runs the engine on the pod's GPU: build with TORCH_INDEX set to your CUDA's
# PyTorch index (e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128) so pip installs a CUDA torch.
FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt requirements.lock pyproject.toml ./
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" -r requirements.txt -c requirements.lock
COPY workflow/ workflow/
COPY config/schema.yaml config/schema.yaml
RUN useradd --uid 10001 --no-create-home gateway
USER 10001
ENV PYTHONPATH=/app HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
EXPOSE 8443
ENTRYPOINT []
