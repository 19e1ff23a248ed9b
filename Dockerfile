# One image for every service of docker-compose.yml: GPU workers, the render worker and Flower.
# The base image brings CUDA, torch and torchvision (GLM-4V's processor needs it).
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# Every path a service writes exists in the image and belongs to the glyphq user. Docker fills a new
# named volume from the image's folder, owner included, so the volumes are writable too.
ARG GLYPHQ_UID=10001
RUN useradd --create-home --uid "$GLYPHQ_UID" --user-group glyphq \
    && mkdir -p /hf-cache /compile-cache /data \
    && chown glyphq:glyphq /hf-cache /compile-cache /data

WORKDIR /app
COPY pyproject.toml constraints.txt README.md LICENSE celeryconfig.py ./
COPY producer ./producer
COPY tasks ./tasks
COPY worker ./worker
RUN pip install --no-cache-dir -c constraints.txt '.[worker,render,flower]'

USER glyphq
# HF_HOME: model downloads; GLYPHQ_COMPILE_CACHE_DIR: kernels compiled for static decoding;
# /data: Flower's database. Everything else goes to /tmp and the glyphq user's home.
ENV HF_HOME=/hf-cache \
    GLYPHQ_COMPILE_CACHE_DIR=/compile-cache \
    PYTHONUNBUFFERED=1
VOLUME ["/hf-cache", "/compile-cache", "/data"]
EXPOSE 9808 5555
CMD ["celery", "-A", "glyphq.tasks", "worker", "-l", "info"]
