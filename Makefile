# fvlab: `make demo` and `make test` create .venv when missing and install the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fvlab fit experiments/ablate_carrier.yaml
	@echo "Compare the variants: $(VENV)/bin/tensorboard --logdir runs/ablate_carrier"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/model_speed.py
	$(PY) benchmarks/fit_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
