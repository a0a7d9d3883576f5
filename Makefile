# Set-up, tests and demo. `make demo` and `make test` work on a fresh clone: both create
# .venv first (see scripts/setup_env.sh), which is instant once it exists.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: venv test demo docs clean

venv:
	@PYTHON="$(PYTHON)" VENV="$(VENV)" bash scripts/setup_env.sh

# The reader page's browser test drives the system Chromium: installed here when missing (apt-get, as root);
# where it cannot be, that test fails saying how to install it (it never skips).
test: venv
	@bash scripts/install_browser.sh || echo "make test: no Chromium; tests/serve/test_web_page.py will fail" >&2
	$(VPY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(VPY) -m spikingbrain.cli demo

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on any warning.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) build dist site .pytest_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
