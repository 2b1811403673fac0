# The two commands a new user needs: `make run` (install, start the dev stack with a demo deal)
# and `make test` (install, lint, type-check, run the tests against real servers).
SHELL := /bin/bash
# uv is installed from PyPI into the machine's Python when it is missing.
UV := python3 -m uv
PYTEST_ARGS ?=

.PHONY: install run test test-long bench bench-quick lint typecheck pytest clean

install:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen
	npm ci --no-audit --no-fund --loglevel=error
	@# The browser tests drive Debian's Chromium (no browser download at test time).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

run: install
	$(UV) run otc dev up --demo

lint:
	$(UV) run ruff check .
	$(UV) run ruff format --check .

typecheck:
	$(UV) run mypy

pytest:
	$(UV) run pytest -q --durations=15 $(PYTEST_ARGS)

test: install lint typecheck pytest

# The long forms of the reliability tests: 200 chaos deals over 2 minutes of faults, 100,000 generated requests.
test-long: install
	OTC_CHAOS_LONG=1 OTC_FUZZ_REQUESTS=100000 $(UV) run pytest -q -s --durations=15 tests/test_chaos.py tests/test_gateway_fuzz.py

# Every benchmark at full size (a table on stdout, JSON in bench/results/); see docs/performance.md.
bench: install
	$(UV) run python -m bench.run_all

# The same at smoke-test sizes (a few minutes).
bench-quick: install
	$(UV) run python -m bench.run_all --quick

clean:
	rm -rf .otc .venv node_modules .pytest_cache .mypy_cache .ruff_cache
