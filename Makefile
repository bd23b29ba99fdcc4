# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv/ first (reused
# while requirements/, setup.cfg and pyproject.toml are unchanged).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: venv system-tools demo test bench clean help

help:
	@echo "make demo   set up .venv and run the main job on embedded defaults (writes $(DEMO_OUT)/)"
	@echo "make test   set up .venv and run the test suite"
	@echo "make bench  run the benchmarks in bench/"
	@echo "make clean  remove .venv and run outputs"

venv: $(STAMP)

# Install order matters (see requirements/*.txt):
#  1. TensorFlow 2.14.1 with tensorflow-federated's other requirements, resolved together under our
#     own pins (requirements/constraints.txt), so a package both stages need (cryptography, pulled
#     in by google-auth) cannot resolve to a newer release in stage 1 than stage 3 allows;
#  2. tensorflow-federated itself with --no-deps (its jax==0.4.14 pin cannot be served);
#  3. fedkb and everything else under constraints frozen from step 1 plus our own pins.
$(STAMP): requirements/tff-deps.txt requirements/tff.txt requirements/constraints.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23.2" wheel setuptools
	$(PIP) install -q -c requirements/constraints.txt -r requirements/tff-deps.txt
	$(PIP) install -q --no-deps -r requirements/tff.txt
	$(PIP) freeze --exclude-editable | grep -v '^-e ' > $(VENV)/stage1-constraints.txt
	$(PIP) install -q -c $(VENV)/stage1-constraints.txt -c requirements/constraints.txt -e '.[train,server,data,dev]'
	touch $(STAMP)

# The main job: prepare Shakespeare-by-role, a short centralized baseline (the reference line),
# then federated training on an emulated fleet against a real aggregator. 3-5 minutes on 2 cores;
# a second `make demo` reuses the data and baseline (delete $(DEMO_OUT) to redo them).
demo: $(DEMO_OUT)/baseline/metrics.json
	$(VENV)/bin/fedkb simulate --data $(DEMO_OUT)/data --baseline $(DEMO_OUT)/baseline --out $(DEMO_OUT)/simulation

$(DEMO_OUT)/data/stats.json: $(STAMP)
	$(VENV)/bin/fedkb data prepare --dataset shakespeare --out $(DEMO_OUT)/data

$(DEMO_OUT)/baseline/metrics.json: $(DEMO_OUT)/data/stats.json
	$(VENV)/bin/fedkb baseline --data $(DEMO_OUT)/data --out $(DEMO_OUT)/baseline

# System tools two tests need, from Debian's packages: the dashboard's browser test drives chromium
# through its chromedriver (never a browser build downloaded by Selenium Manager), and the fleet's
# "never reads the server's files" test traces the fleet with strace. Installed here when missing
# and we may (root, as in CI, or passwordless sudo); this step never fails the build: without them
# those tests skip, naming what is missing.
SYSTEM_TOOLS := /usr/bin/chromium /usr/bin/chromedriver /usr/bin/strace
APT_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver strace
system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do [ -x $$t ] || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "note: no apt-get and missing:$$missing; the tests that need them will skip"; \
	elif [ "$$(id -u)" = 0 ]; then sh -c '$(APT_INSTALL)' || echo "note: could not install chromium chromium-driver strace: the tests that need them will skip"; \
	elif sudo -n true 2>/dev/null; then sudo sh -c '$(APT_INSTALL)' || echo "note: could not install chromium chromium-driver strace: the tests that need them will skip"; \
	else echo "note: missing$$missing and not root: the tests that need them will skip (apt-get install chromium chromium-driver strace)"; fi

test: $(STAMP) system-tools
	$(PY) -m pytest -q

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs
