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

test: $(STAMP)
	$(BIN)/python -m pytest tests --timeout 600 --durations=10

clean:
	rm -rf output .pytest_cache
