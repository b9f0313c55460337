# The two fresh-machine commands of the README:
#   make serve   installs everything into .venv and serves the bundled model_store/
#   make test    installs everything into .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test container-test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

serve: install
	$(BIN)/dgserve serve

test: install
	$(BIN)/python -m pytest

# Builds the image and runs the compose stack end to end with podman or docker (slow; see docs/deploy.md).
container-test:
	scripts/container_test.sh

# Renders deploy/kubernetes/overlays/cpu and runs it with podman kube play (slow; see docs/deploy.md).
.PHONY: kube-test
kube-test: install
	scripts/kube_play_test.sh

# dgserve on a local Ray cluster: the end-to-end test of tests/ray/ (2 replicas, PostgreSQL,
# a replica killed under load). Slow, so not part of `make test` nor CI (whose `make test`
# runs the fast Ray tests); see docs/deploy.md.
.PHONY: ray-test
ray-test: install
	DGSERVE_RAY_E2E=1 $(BIN)/python -m pytest tests/ray -s

# torch.compile of every bundled model, checked against its eager answers (minutes: CI compiles
# the DG-Net only); run it after changing serving/worker.py's compiling or a bundled model.
.PHONY: compile-test
compile-test: install
	DGSERVE_COMPILE_ALL=1 $(BIN)/python -m pytest tests/serving/test_worker.py -k compiled

# A real server under mixed load, overload bursts included, for 10 minutes (DURATION=seconds to
# change it, SOAK_ARGS for more, e.g. --server-env DGSERVE_SERVER_PROCESSES=1); fails on RSS growth
# over 5 %, an answer neither 2xx nor 503, or a lost request. Not part of `make test`; see
# docs/performance.md.
.PHONY: soak
soak: install
	scripts/soak.sh --duration $(or $(DURATION),600) $(SOAK_ARGS)
