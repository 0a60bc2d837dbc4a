# backup-agent: common tasks. `make demo` shows the tool working; `make test` is the test suite
# (CI runs it through .ci/run). Every target that needs the tools runs `setup` first, which is
# idempotent and fast when nothing changed.

VENV := .venv

.DEFAULT_GOAL := help
.PHONY: help setup demo test lint bench clean

help:
	@echo "make setup   install Debian packages, create $(VENV), install the project"
	@echo "make demo    setup, then back up sample disks and a running VM through pipes, restore, check"
	@echo "make test    setup, then ruff, mypy and pytest"
	@echo "make lint    setup, then ruff and mypy only"
	@echo "make bench   setup, then run the benchmarks (bench/run.py)"
	@echo "make clean   remove $(VENV) and demo-out/"

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh
	bash scripts/demo-live.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q

bench: setup
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) demo-out
