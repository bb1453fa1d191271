# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   -- set up .venv and run the embedded demo (train, sample, compare, report)
#   make test   -- set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fewstep-installed
OUT    ?= runs/demo

.PHONY: demo test setup clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first (the CPU build on local disk), then the project; the project's torch
# range admits 2.13.0 so nothing else is pulled.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,text]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fewstep demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

bench: $(STAMP)
	$(PY) bench/teacher.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
