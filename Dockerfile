# GPU worker and Flower image. The base image brings CUDA, torch and torchvision (GLM-4V's processor needs it).
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml constraints.txt README.md celeryconfig.py ./
COPY producer ./producer
COPY tasks ./tasks
COPY worker ./worker
RUN pip install --no-cache-dir -c constraints.txt '.[worker,render,flower]' \
    && useradd --create-home --uid 1000 glyphq
USER glyphq
ENV HF_HOME=/hf-cache PYTHONUNBUFFERED=1
CMD ["celery", "-A", "tasks", "worker", "-l", "info"]
