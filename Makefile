# soci-py: `make demo` and `make test` are the two set-up commands; both build .venv through `make venv`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
EXT_SOURCES := $(wildcard ext/*.pyx ext/*.pxd ext/*.h)
PROTO_SOURCES := $(wildcard proto/*/*.proto)

.PHONY: all venv apt test test-fast test-pure lint fmt demo bench deb rpm packages clean

all: venv

apt:
	@bash scripts/ensure-apt.sh

# The stamp is rebuilt when packaging metadata, extension or proto sources change; otherwise `make venv` is a
# no-op. The install uses --no-build-isolation, so setup.py's build requirements (Cython for ext/,
# grpcio-tools for the gRPC code it generates from proto/) are installed first.
$(VENV)/.stamp: pyproject.toml setup.py $(EXT_SOURCES) $(PROTO_SOURCES) scripts/ensure-apt.sh
	@bash scripts/ensure-apt.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip setuptools wheel "Cython>=3.0" "grpcio-tools>=1.60"
	$(PIP) install --no-build-isolation -e '.[test,bench]'
	@touch $@

venv: $(VENV)/.stamp

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The whole suite with the compiled extensions, then again with the pure-Python twins.
test: venv lint
	SOCI_REQUIRE_ALL=1 $(VENV)/bin/pytest -q -p no:cacheprovider
	SOCI_REQUIRE_ALL=1 SOCI_PUREPYTHON=1 $(VENV)/bin/pytest -q -p no:cacheprovider

test-fast: venv
	$(VENV)/bin/pytest -q -x

demo: venv
	$(PY) scripts/demo.py

bench: venv
	$(PY) bench/run.py

# Debian and RPM packages with the systemd units, into dist/ (network needed for the vendored PyPI deps)
deb: venv
	$(PY) scripts/build_packages.py --deb

rpm: venv
	$(PY) scripts/build_packages.py --rpm

packages: venv
	$(PY) scripts/build_packages.py

clean:
	rm -rf $(VENV) build dist *.egg-info soci_fs/_ext/*.so ext/*.c soci_grpc/_proto/*/
