# The front door. Every target creates or updates .venv by itself, so on a fresh machine
# `make serve` and `make test` are the only commands anyone needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamps record which extras are installed; they are rebuilt whenever pyproject.toml changes.
SERVE_STAMP := $(VENV)/.installed-serve
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: help serve test test-fast web web-if-possible models bench bench-capture bench-remote lint loadtest audit clean

help:
	@echo "make serve   - run the service on the shipped models (installs .[serve])"
	@echo "make test    - run the whole test suite (installs .[serve,train,dev])"
	@echo "make web     - build the capture web app into service/web/static (needs Node.js 20+ and npm)"
	@echo "make models  - train, evaluate and export the four models into models/"
	@echo "make bench   - benchmark the service against a naive baseline and the inference floor"
	@echo "make lint    - ruff and mypy"
	@echo "make loadtest - overload and soak the service over loopback"
	@echo "make audit   - bandit on service/, pip-audit on the installed packages"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[serve]'
	@touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[serve,train,dev]'
	@touch $@ $(SERVE_STAMP)

# The capture web app (web/, TypeScript): type-checked and bundled by esbuild into service/web/static/, which
# the service serves at /capture/. Rebuilt when a source or the lock file changes; npm installs exactly the
# lock file's versions. Without npm, `make serve` still serves the API and /capture/ says how to build it.
WEB_BUILD := service/web/static/build.json
WEB_SOURCES := $(wildcard web/src/*.ts web/src/*/*.ts web/public/*) web/build.mjs web/package-lock.json web/tsconfig.json
WEB_MODULES := web/node_modules/.package-lock.json

$(WEB_MODULES): web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(WEB_BUILD): $(WEB_SOURCES) $(WEB_MODULES)
	cd web && npm run --silent typecheck && npm run --silent build

web: $(WEB_BUILD)

# Builds the web app when npm is there; says so and goes on when it is not (the API does not need it).
web-if-possible:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory web; \
	else echo "warning: npm not found: the capture app at /capture/ is not built (install Node.js 20+ and npm)" >&2; fi

# Host, port, models and limits come from CERVIGATE_* variables or a .env file (README: Configuration).
serve: $(SERVE_STAMP) web-if-possible
	$(BIN)/python -m service

# The browser tests need the built app (and Chromium: .ci/run installs it).
test: $(DEV_STAMP) web
	$(BIN)/python -m pytest

# Everything but the tests marked slow, for a quick local loop (CI always runs the full `make test`).
test-fast: $(DEV_STAMP) web
	$(BIN)/python -m pytest -m "not slow"

# Train, evaluate and export the four models into models/, each with a copy of its evaluation report
# (runs/ keeps checkpoints and held-out predictions). The detector goes first: the segmenter, severity and quality
# tasks measure on the crops its fold models take (runs/detector); the segmenter before severity: severity's
# held-out figures read each photo's map from the segmenter's outer-fold model that held its case out
# (runs/segmenter/folds, severity's default --segmenter-folds), its shipped fit the exported segmenter's maps.
MODEL_TASKS := detector segmenter severity quality
RUNS := runs
models: $(DEV_STAMP)
	$(BIN)/python -m training.data fetch-negatives
	@set -e; for task in $(MODEL_TASKS); do \
		echo "== $$task"; \
		$(BIN)/python -m training train $$task --output-dir $(RUNS)/$$task; \
		$(BIN)/python -m training evaluate $$task --run-dir $(RUNS)/$$task; \
		$(BIN)/python -m training export $$task --run-dir $(RUNS)/$$task --models-dir models; \
		rm -rf models/$$task/report && cp -r $(RUNS)/$$task/report models/$$task/report; \
	done

# CerviGate over HTTP vs a naive PyTorch service vs the decode + inference floor, interleaved in one run:
# writes bench/out/summary.json, table.md and latency.png (7 min here with the two 12 MP HEIC workloads). Never
# part of `make test`.
bench: $(DEV_STAMP)
	$(BIN)/python -m bench.run --out bench/out

# The capture app in Chromium with the fake atlas camera: preview frames per second against the gate's round
# trip, and the time from "hold still" to an auto-captured assessment: bench/out/capture.json (about 1 min).
bench-capture: $(DEV_STAMP) web
	$(BIN)/python -m bench.capture --out bench/out

# Atlas photos through the service with the models in process and in front of a V2 (Open Inference Protocol)
# server, KServe's model server in its own .kserve-venv, interleaved: bench/out/remote.json (about 1 min).
bench-remote: $(DEV_STAMP)
	$(BIN)/python -m bench.remote --out bench/out

# Capacity, 60 s of overload at 4x capacity (503 + Retry-After shedding), the minute after, a 10,000-request soak
# (RSS growth) and the deadline-storm scenario, over loopback against servers it starts: bench/out/loadtest.json.
# 9 min here; CI runs a short variant.
loadtest: $(DEV_STAMP)
	$(BIN)/python -m bench.loadtest --out bench/out

# Static security checks of the code that ships (bandit: any medium or high finding fails) and known
# vulnerabilities in the installed packages (pip-audit; it needs the PyPI/OSV APIs and says which it could not reach).
audit: $(DEV_STAMP)
	$(BIN)/bandit -q -r service --severity-level medium
	@out=$$($(BIN)/pip-audit --progress-spinner off --skip-editable 2>&1); status=$$?; echo "$$out"; \
	unaudited=$$(echo "$$out" | grep -c "could not be audited"); \
	if [ "$$unaudited" -gt 0 ]; then \
		echo "warning: pip-audit could not fetch vulnerability data for $$unaudited packages (PyPI JSON API unreachable?)" >&2; \
	fi; exit $$status

lint: $(DEV_STAMP) $(WEB_MODULES)
	cd web && npm run --silent typecheck
	$(BIN)/ruff check service training tests bench
	$(BIN)/ruff format --check service training tests bench
	$(BIN)/mypy service training bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache web/node_modules service/web/static
