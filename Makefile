# Two set-up commands: `make train` and `make test`. Both create .venv (Python 3.12,
# pinned dependencies) when it is missing.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
export PYENV_VERSION ?= 3.12.1

.PHONY: train test venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "jax[cpu]==0.11.2" -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) train.py --config configs/tiny.yaml --workdir runs/tiny

test: venv
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

clean:
	rm -rf $(VENV) runs
