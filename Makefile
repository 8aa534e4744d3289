# layerscope — the two user commands are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS ?= torch,plot,test
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv build stub test test-rust test-python lint demo bench bench-deps clean

# The virtual environment with the package's dependencies (torch from PyPI: large, cached).
$(VENV)/.deps-stamp: pyproject.toml requirements-extra.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "maturin>=1.5,<2"
	$(PIP) install -q -r requirements-extra.txt
	touch $@

venv: $(VENV)/.deps-stamp

# Release build of the extension, installed into the venv (editable python sources).
build: venv
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH \
	  $(VENV)/bin/maturin develop --release --extras $(EXTRAS) -q

test-rust:
	cargo test --release -p layerscope-core
	cargo clippy --workspace --all-targets -- -D warnings
	cargo fmt --all -- --check

# The extension's type stub, generated from the compiled module (tools/stubgen.py).
stub: build
	$(PY) tools/stubgen.py

test-python: build
	$(VENV)/bin/ruff check python tests benches tools
	$(PY) tools/stubgen.py --check
	$(PY) -m pytest -q tests

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches tools

test: build test-rust test-python

demo: build
	$(VENV)/bin/layerscope demo

# The peer libraries the benchmarks compare against (not needed by tests or the demo).
$(VENV)/.bench-stamp: $(VENV)/.deps-stamp
	$(PIP) install -q "pytorch-cka==1.1.3" "ckatorch==1.0.3"
	touch $@

bench-deps: $(VENV)/.bench-stamp

bench: build bench-deps
	cargo bench -p layerscope-core
	$(PY) benches/bench_all.py

clean:
	rm -rf target $(VENV)
