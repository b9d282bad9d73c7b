# GPU image for training and evaluation. TensorFlow (with CUDA) comes from the base image;
# pip installs the rest of requirements.txt without touching it.
FROM tensorflow/tensorflow:2.21.0-gpu

WORKDIR /opt/m2cnn-tf
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY requirements.txt .
RUN sed '/^# Development/,$d' requirements.txt | grep -v '^tensorflow==' \
        > /tmp/requirements-docker.txt \
    && pip install --no-cache-dir -r /tmp/requirements-docker.txt \
    && rm /tmp/requirements-docker.txt
COPY . .

ENV TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
ENTRYPOINT ["python"]
CMD ["train.py", "--help"]
