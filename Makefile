.PHONY: setup test lint

PYTEST_ARGS ?=

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check clearmlfs tests scripts
