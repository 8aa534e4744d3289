# layerscope — the two user commands are `make demo` and `make test`.
SHELL := /bin/bash
# A pipeline fails when any command in it fails (pip filtered through grep below).
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv build wheel stub test test-rust test-python lint demo bench bench-deps clean

# TORCH_INDEX=https://download.pytorch.org/whl/cpu installs a CPU-only torch first (a venv of
# about 1.5 GB instead of 6.3 GB with PyPI's CUDA wheels; torch's index must be reachable).
TORCH_INDEX ?=

# The virtual environment with the package's dependencies (torch from PyPI: large, cached).
$(VENV)/.deps-stamp: pyproject.toml requirements-extra.txt
	@echo "==> [1/2] Python environment in $(VENV): numpy, torch, transformers, matplotlib, test tools"
	@echo "    (first run: about 3.3 GB of downloads and 6.3 GB on disk, 2-8 minutes with the network; later runs skip this)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "maturin>=1.5,<2"
	if [ -n "$(TORCH_INDEX)" ]; then $(PIP) install --progress-bar on --index-url "$(TORCH_INDEX)" torch; fi
	$(PIP) install --progress-bar on -r requirements-extra.txt \
	  | { grep -vE "^(Requirement already satisfied|Ignoring .*: markers)" || true; }
	touch $@

venv: $(VENV)/.deps-stamp

# Release build of the extension, installed into the venv (editable python sources). The
# extras are already in the venv: only the core requirements are checked here.
build: venv
	@echo "==> [2/2] Rust extension (release build; the first one takes 2-4 minutes)"
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH \
	  $(VENV)/bin/maturin develop --release 2>&1 | { grep -vE "^(Requirement already satisfied|Ignoring .*: markers)" || true; }

# The wheel users install (dist/): release, stripped, manylinux-tagged, then checked.
wheel: venv
	rm -f dist/layerscope-*.whl
	$(VENV)/bin/maturin build --release -o dist
	$(PY) tools/check_wheel.py dist

test-rust:
	cargo test --release -p layerscope-core
	cargo clippy --workspace --all-targets -- -D warnings
	cargo fmt --all -- --check
	RUSTDOCFLAGS="-D warnings" cargo doc -q -p layerscope-core --no-deps

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
	RUSTDOCFLAGS="-D warnings" cargo doc -q -p layerscope-core --no-deps
	$(VENV)/bin/ruff check python tests benches tools

test: build test-rust test-python wheel

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
	rm -rf target dist $(VENV)
