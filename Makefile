# The two commands a new user needs: `make run` (install, start the dev stack with a demo deal)
# and `make test` (install, lint, type-check, run the tests against real servers).
SHELL := /bin/bash
# uv is installed from PyPI into the machine's Python when it is missing.
UV := python3 -m uv
PYTEST_ARGS ?=

.PHONY: install run test lint typecheck pytest clean

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

clean:
	rm -rf .otc .venv node_modules .pytest_cache .mypy_cache .ruff_cache
