# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# No model hub exists here or in CI: fail fast instead of retrying for minutes.
export HF_HUB_OFFLINE := 1

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "setuptools>=70" wheel
	# torch pinned and installed first: an unpinned torch resolves to a multi-GB CUDA build; triton 3.7.1 is the
	# version torch 2.13 pins (its interpreter runs the kernel tests on CPU).
	$(BIN)/pip install -q torch==2.13.0 triton==3.7.1 numpy pillow pyyaml tqdm matplotlib tensorboard pytest
	# diffusers/transformers/peft/accelerate: the real-model adapters and reward models, tested offline on tiny
	# models the tests build; ninja: torch's JIT build of the C++ extension (csrc/).
	$(BIN)/pip install -q transformers==5.23.0 diffusers==0.42.1 peft==0.21.2 accelerate==1.15.0 ninja
	# DeepSpeed (ZeRO on CPU with gloo in the tests; no ops prebuilt), bitsandbytes (8-bit AdamW), selenium (drives
	# Debian's headless chromium in the labelling-page test), wandb (--log-with wandb; tested offline)
	DS_BUILD_OPS=0 $(BIN)/pip install -q deepspeed==0.19.8 bitsandbytes==0.50.2 selenium==4.51.0 wandb==0.31.0
	# No build isolation: a build env would pull another torch (see environment notes).
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fdfo_fast.demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/pip install -q ruff && $(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo_out .pytest_cache
