.PHONY: style quality test bench

check_dirs := safety_dpo tests examples benchmarks setup.py
PYTHON ?= python

style:
	ruff check --fix $(check_dirs)
	ruff format $(check_dirs)

quality:
	ruff check $(check_dirs)
	ruff format --check $(check_dirs)

test:
	$(PYTHON) -m pytest -n 2 tests

bench:
	@for f in benchmarks/bench_*.py; do [ -e "$$f" ] || { echo "no benchmarks yet"; break; }; echo "== $$f"; $(PYTHON) $$f || exit 1; done
