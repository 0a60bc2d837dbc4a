# backup-agent: common tasks. `make demo` shows the tool working; `make test` is the test suite
# (CI runs it through .ci/run). Every target that needs the tools runs `setup` first, which is
# idempotent and fast when nothing changed.

VENV := .venv

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-quick test-qemu10 lint bench clean

help:
	@echo "make setup   install Debian packages, create $(VENV), install the project"
	@echo "make demo    setup, then back up sample disks and a running VM through pipes, restore, check"
	@echo "make test    setup, then ruff, mypy, pytest on the system's QEMU, and the QEMU tests on QEMU 10"
	@echo "make test-quick    the quick loop: pytest -m 'not slow' on the system's QEMU, no lint"
	@echo "make test-qemu10   the QEMU tests (pytest -m qemu) on QEMU 10 only"
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

# The whole suite on the system's QEMU (7.2 on Debian 12), then every test that drives QEMU
# (marker qemu) again on QEMU 10.0 from bookworm-backports, unpacked into .cache/qemu10 by
# scripts/fetch-qemu.sh (docs/QEMU.md). PYTEST_ARGS narrows both runs.
test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-qemu10

# The quick loop while working: every test but those marked slow (1 s or more each; about a
# quarter of the full run's time). Tests marked root skip, saying why, when not run as root.
test-quick: setup
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

test-qemu10: setup
	dir=$$(bash scripts/fetch-qemu.sh) && \
	    echo "pytest -m qemu on $$("$$dir/bin/qemu-system-x86_64" --version | head -1)" && \
	    BA_QEMU_DIR=$$dir $(VENV)/bin/pytest -q -m qemu $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) demo-out
