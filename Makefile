PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

# Debian packages the tests read: espeak-ng and fortunes (speech), dataset-fashion-mnist and
# fonts-noto-color-emoji (real image datasets), chromium and chromium-driver (the `serve` page, driven
# by selenium in tests/test_serve.py). `make test` installs the missing ones when it runs as root on a
# machine with apt-get.
DEB_PACKAGES := espeak-ng fortunes dataset-fashion-mnist fonts-noto-color-emoji chromium chromium-driver

.PHONY: demo speech-demo test lint install clean debs bench

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# What the tests add: linters and the reference libraries of tests/test_agreement.py.
$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(DEV_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/motfusion demo --out runs/demo

# Text, images and speech in one model; makes its speech data in runs/speech-shapes (needs espeak-ng).
speech-demo: $(STAMP)
	$(VENV)/bin/motfusion demo --recipe speech-demo --out runs/speech-demo

debs:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s $(DEB_PACKAGES) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PACKAGES) >/dev/null; \
	fi

# Style and layering: ruff formats and lints; import-linter keeps imports flowing down the layers
# (pyproject.toml), so a new import cycle fails CI.
lint: $(DEV_STAMP)
	$(VENV)/bin/ruff format --check --quiet src tests benchmarks
	$(VENV)/bin/ruff check --quiet src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

test: $(DEV_STAMP) debs lint
	$(PY) -m pytest -q

# Train-step and attention timings on this host (about 7 minutes on 2 CPU cores): benchmarks/results/.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs
