# The two commands a user needs: `make package [MODEL=bert]` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
# torch first, so that no later requirement pulls a multi-GB CUDA build; a GPU host may choose another spec.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= triton,tensorrt-rtx,bench,dev
MODEL ?= bert
TASK ?=
ARGS ?=
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN := HF_HUB_OFFLINE=1 $(PY) -m packager

.PHONY: venv package publish smoke bench list test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

package: $(STAMP)
	$(RUN) package $(MODEL) $(if $(TASK),--task $(TASK)) $(ARGS)

publish: $(STAMP)
	$(RUN) publish $(MODEL) $(ARGS)

smoke: $(STAMP)
	$(RUN) smoke $(MODEL) $(ARGS)

bench: $(STAMP)
	$(RUN) bench $(MODEL) $(ARGS)

list: $(STAMP)
	$(RUN) list

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build reports
