# fvlab: `make demo` and `make test` create .venv when missing and install the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean docs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fvlab fit experiments/ablate_carrier.yaml
	$(VENV)/bin/fvlab report runs/ablate_carrier
	@echo "Compare the variants: $(VENV)/bin/tensorboard --logdir runs/ablate_carrier"

# One pytest worker per core (tests/conftest.py gives each worker one compute thread).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup

bench: $(STAMP)
	$(PY) benchmarks/model_speed.py
	$(PY) benchmarks/fit_overhead.py
	$(PY) benchmarks/precision.py
	$(PY) benchmarks/allocator.py
	$(PY) benchmarks/sweep_overhead.py
	$(PY) benchmarks/sweep_scale.py --burst
	$(PY) benchmarks/throughput_stability.py
	$(PY) benchmarks/gpu.py

# The README's picture: the demo's accuracy against measured throughput.
docs: demo
	mkdir -p docs
	cp runs/ablate_carrier/report/accuracy_vs_throughput.png docs/ablate_carrier_accuracy_vs_throughput.png

clean:
	rm -rf $(VENV) runs .pytest_cache
