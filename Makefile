# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default (on this kind of machine it comes from local disk). GPU users:
# install the CUDA build of torch 2.13 into $(VENV) first, then run make; see README.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(VENV)/bin/fedpgen simulate

# CI's set: everything but the runs marked `long` (each repeats, on another task or variant, what
# a test in this set runs end to end); test-all runs them too.
test: install
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=30 -m "not long"

test-all: install
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=30

clean:
	rm -rf runs .pytest_cache
