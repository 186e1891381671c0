.PHONY: setup test test-fast demo lint bench

PYTEST_ARGS ?=

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

# No server, no mount: the filesystem driven through its Operations class over in-memory buckets.
test-fast: setup
	.venv/bin/python -m pytest tests/fast $(PYTEST_ARGS)

demo:
	bash scripts/demo.sh

lint: setup
	.venv/bin/ruff check clearmlfs tests scripts
	.venv/bin/mypy

bench: setup
	.venv/bin/python scripts/bench.py
