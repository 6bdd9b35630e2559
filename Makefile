# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv if missing, then distils the embedded default (scikit-learn digits) end to end
#   make test   creates .venv if missing, then runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test env clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/distillset run recipes/digits.yaml

# the suite runs in one pytest-xdist worker per core (at most 4: each holds its own torch); JOBS=1 runs it serially
JOBS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1)))")

test: $(STAMP)
	$(BIN)/python -m pytest tests -n $(JOBS) --dist worksteal --timeout 600 --durations=10

clean:
	rm -rf output .pytest_cache
