# `make demo` and `make test` work on a fresh machine: both create .venv and install on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# The CPU build of torch on these machines; a GPU user can pass e.g. TORCH_SPEC="torch>=2.6".
TORCH_SPEC ?= torch==2.13.0
# Demo pipeline: sft, dpo (SFT→DPO) or grpo (SFT→GRPO).
TRAINER ?= sft

.PHONY: install demo toy-assets bench-tax bench-speed test lint format clean

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[test]"
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(PYTHON) -m trl_nullspace.demo --trainer $(TRAINER)

# Writes outputs/toy (tiny model + datasets) for the offline recipes in recipes/configs/toy_*.yaml.
toy-assets: $(INSTALLED)
	$(PYTHON) -m trl_nullspace.toy_assets outputs/toy

# Alignment tax per method (plain TRL, null-space variants, OGPSA-style, LoRA), 3 seeds, CPU, ~4 min.
bench-tax: $(INSTALLED)
	$(PYTHON) -m benchmarks.tax

# Step time and peak memory vs plain TRL in the same run; `BENCH_ARGS="--preset gpu"` on a GPU.
bench-speed: $(INSTALLED)
	$(PYTHON) -m benchmarks.speed $(BENCH_ARGS)

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
