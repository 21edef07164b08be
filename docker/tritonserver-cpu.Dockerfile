# A CPU Triton server from Debian packages and PyPI only. Built by scripts/triton_image.py (`make triton-image`),
# which labels it with its backends and writes the build context: requirements.txt (the lock's pins of what the
# python-backend models import), pytriton.txt (the lock's nvidia-pytriton), host-ca.crt (the host's CA bundle, for
# pip) and backends/ (the built onnxruntime backend, or empty).
ARG BASE
FROM ${BASE}

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv libpython3.11 libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The models' imports in a venv (hash-checked, exactly the lock's versions); the wheel's server beside it, not
# imported, so it is installed alone into its own folder.
ARG PIP_INDEX_URL
COPY requirements.txt pytriton.txt host-ca.crt /tmp/build/
RUN export PIP_CERT=/tmp/build/host-ca.crt PIP_INDEX_URL="${PIP_INDEX_URL}" PIP_DISABLE_PIP_VERSION_CHECK=1 \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -q --no-cache-dir --no-deps --require-hashes -r /tmp/build/requirements.txt \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip install -q --no-cache-dir --no-deps --require-hashes --target /opt/pytriton \
        -r /tmp/build/pytriton.txt \
    && rm -rf /tmp/build

# The python backend of the wheel, with the stub for this Python; then the onnxruntime backend when one was given.
ENV PATH=/opt/venv/bin:${PATH} \
    LD_LIBRARY_PATH=/opt/pytriton/nvidia_pytriton.libs \
    LANG=C.UTF-8
RUN server=/opt/pytriton/pytriton/tritonserver \
    && mkdir -p /opt/tritonserver/backends/python \
    && cp "${server}/backends/python/libtriton_python.so" "${server}/backends/python/triton_python_backend_utils.py" \
        "${server}/python_backend_stubs/3.11/triton_python_backend_stub" /opt/tritonserver/backends/python/
COPY backends/ /opt/tritonserver/backends/
COPY tritonserver /usr/local/bin/tritonserver

# Every library the server and its backends link is found, and the models' imports load.
RUN ! ldd /opt/pytriton/pytriton/tritonserver/bin/tritonserver /opt/tritonserver/backends/*/*.so \
        /opt/tritonserver/backends/python/triton_python_backend_stub | grep "not found" \
    && python3 -c "import numpy, onnxruntime, tokenizers"
