# Two commands on a fresh machine (no GPU, no dataset download):
#   make demo   # create .venv, install lnsgd, run the quickstart demo
#   make test   # create .venv, install lnsgd with test extras, run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision pins that pip resolves from a local wheel cache where one exists;
# the package itself only asks for torch>=2.4 / torchvision>=0.19.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= runs/demo

.PHONY: venv demo quickstart test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) || $(PY) -m pip install -q "torch>=2.4" "torchvision>=0.19"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/lnsgd demo --out $(DEMO_OUT) --force

quickstart: venv
	$(VENV)/bin/lnsgd train recipes/quickstart.yaml --force

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check lnsgd tests

clean:
	rm -rf $(VENV) runs .pytest_cache
