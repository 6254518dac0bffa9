# Two entry points (see README.md): `make demo` and `make test`. Both install into .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,convert,serve,test]'
	# open-clip-torch only carries the real CLIP BPE merges for test tokenizers; its own
	# dependencies (torchvision, timm) are never imported, and would drag in another torch.
	$(PY) -m pip install --quiet --no-deps open-clip-torch==3.3.0
	touch $@

demo: $(STAMP)
	$(PY) -m convert.demo --out demo-output

test: $(STAMP)
	$(PY) -m pytest -q tests --durations=20 -n auto --maxprocesses 2 --dist loadfile

clean:
	rm -rf $(VENV) demo-output
