# The README's two commands: `make demo` and `make test`. Both run the idempotent set-up first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export QT_QPA_PLATFORM ?= offscreen
export GDAL_CACHEMAX ?= 256
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-fast lint demo plugin install-plugin clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow" tests

lint: setup
	$(PY) -m ruff check engine training sarmae_qgis tests benchmarks scripts

demo: setup
	$(PY) scripts/demo.py $(if $(INPUT),--input $(INPUT),)

plugin: setup
	$(PY) scripts/build_plugin.py --output dist

install-plugin: plugin
	$(PY) scripts/build_plugin.py --output dist --install

clean:
	rm -rf build dist demo_output .pytest_cache
