# Osprey developer commands. `make serve` and `make test` are the two commands a fresh
# machine needs (see README.md); everything they depend on is installed on the way.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STORE  ?= model_store
# The KServe SDK pins protobuf/grpcio versions of its own: it gets a virtualenv of its own,
# which the tests drive as a real client.
KSERVE_VENV ?= .venv-kserve
# Ray (retraining jobs on a Ray cluster, tests/e2e/test_retraining_ray.py) pins packages of its
# own too; the tests start a real local head from this virtualenv.
RAY_VENV ?= .venv-ray

.PHONY: setup install-torch examples serve stop test test-torchserve system-packages bench bench-quick bench-packages

# torch is the one package whose wheel depends on the machine. On PyPI the Linux torch is the
# CUDA build (a multi-GB download); without a GPU the CPU build from PyTorch's index does.
#   make setup                    CPU wheels, unless nvidia-smi sees a GPU (then PyPI's CUDA build)
#   make setup TORCH_CUDA=cu128   that CUDA build from PyTorch's index (cu126, cu128, ...)
#   make setup TORCH_INDEX=URL    any other index (a mirror); TORCH_INDEX=pypi: the default index only
# The chosen index is added with --extra-index-url and only when it answers, so a machine that
# reaches only the default index (or its own mirror) installs from there as before.
TORCH_VERSION ?= 2.13.0
TORCH_SPEC    ?= torch==$(TORCH_VERSION)
TORCH_CUDA    ?=
TORCH_INDEX   ?=
PYTORCH_WHL   := https://download.pytorch.org/whl

$(BIN)/python:
	@echo "==> creating the virtual environment $(VENV) ($(PYTHON))"
	$(PYTHON) -m venv $(VENV)

install-torch: $(BIN)/python
	@index="$(TORCH_INDEX)"; why="TORCH_INDEX"; \
	if [ -z "$$index" ]; then \
	  if [ -n "$(TORCH_CUDA)" ]; then index="$(PYTORCH_WHL)/$(TORCH_CUDA)"; why="TORCH_CUDA=$(TORCH_CUDA)"; \
	  elif nvidia-smi -L >/dev/null 2>&1; then index=pypi; why="a GPU is present: PyPI's Linux torch is the CUDA build"; \
	  else index="$(PYTORCH_WHL)/cpu"; why="no GPU (nvidia-smi -L)"; fi; \
	fi; \
	if [ "$$index" = pypi ]; then \
	  echo "==> installing $(TORCH_SPEC) from the default index ($$why)"; \
	  $(BIN)/pip install "$(TORCH_SPEC)"; \
	elif $(BIN)/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' \
	     "$${index%/}/torch/" >/dev/null 2>&1; then \
	  echo "==> installing $(TORCH_SPEC) with $$index as an extra index ($$why)"; \
	  $(BIN)/pip install --extra-index-url "$$index" "$(TORCH_SPEC)"; \
	else \
	  echo "==> $$index does not answer ($$why): installing $(TORCH_SPEC) from the default index"; \
	  $(BIN)/pip install "$(TORCH_SPEC)"; \
	fi

# A virtual environment with torch first (above: an unpinned torch pulls the CUDA build), then
# Osprey and its test tools.
$(BIN)/.installed: pyproject.toml | $(BIN)/python
	@$(MAKE) --no-print-directory install-torch
	@echo "==> installing Osprey with its test tools: pip install -e '.[test]' (pyproject.toml)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

$(STORE)/digits_cnn.mar: | $(BIN)/.installed
	@echo "==> training and packaging the example models into $(STORE) (osprey examples)"
	$(BIN)/osprey examples --out $(STORE)

examples: $(STORE)/digits_cnn.mar

# Serves every example model in the background on 127.0.0.1 (8080 inference, 8081
# management, 8082 metrics, 7070/7071 gRPC). Token auth is off for this local trial run.
serve: examples
	$(BIN)/osprey serve --model-store $(STORE) --models all --disable-token-auth

stop:
	$(BIN)/osprey stop

# Real services and tools the tests use, from Debian's packages: Prometheus and promtool,
# redis-server, amtool (the Compose stack's Alertmanager config), tini (the image's PID 1),
# HAProxy (the load balancer in front of the replicas; Debian puts it in /usr/sbin).
SYSTEM_PACKAGES := prometheus redis-server prometheus-alertmanager tini haproxy
system-packages:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v redis-server >/dev/null && \
	  command -v amtool >/dev/null && command -v tini >/dev/null && \
	  { command -v haproxy || test -x /usr/sbin/haproxy; } >/dev/null || \
	  (echo "==> installing Debian packages: $(SYSTEM_PACKAGES)" && apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES))

$(KSERVE_VENV)/.installed:
	@echo "==> installing kserve==0.21.0 (the tests' KServe client) into its own environment $(KSERVE_VENV)"
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install -q kserve==0.21.0
	touch $@

# newman (npm), pinned: runs TorchServe's own Postman API collections against Osprey
# (tests/e2e/test_torchserve_postman.py); installed into its own folder, never globally.
NEWMAN_VERSION ?= 6.2.2
NEWMAN_DIR     ?= .newman
$(NEWMAN_DIR)/node_modules/.bin/newman:
	@command -v npm >/dev/null || (echo "==> installing Node.js and npm (Debian packages) for newman" && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	@echo "==> installing newman@$(NEWMAN_VERSION) into $(NEWMAN_DIR) (TorchServe's Postman API tests)"
	npm install --prefix $(NEWMAN_DIR) --no-audit --no-fund newman@$(NEWMAN_VERSION)

$(RAY_VENV)/.installed:
	@echo "==> installing ray[default]==2.60.0 (a real local Ray head for the Ray runner's tests) into its own environment $(RAY_VENV)"
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/pip install -q 'ray[default]==2.60.0'
	touch $@

# PYTHONDONTWRITEBYTECODE emptied: where the environment sets it (this machine's does), every
# server, worker and TorchServe-test process the suite starts compiled Osprey's modules again
# (about 0.3 s of CPU a start, hundreds of starts)
test: setup system-packages $(KSERVE_VENV)/.installed $(RAY_VENV)/.installed $(NEWMAN_DIR)/node_modules/.bin/newman
	PYTHONDONTWRITEBYTECODE= OSPREY_KSERVE_PYTHON=$(abspath $(KSERVE_VENV))/bin/python OSPREY_RAY_PYTHON=$(abspath $(RAY_VENV))/bin/python \
	  OSPREY_NEWMAN_DIR=$(abspath $(NEWMAN_DIR)) \
	  $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# TorchServe's own pytest API modules and Postman runs alone, with the two kserve re-runs the
# suite leaves out (test_metrics_kf.py, Postman management_kf): about 5 minutes idle on 2 cores
test-torchserve: setup $(NEWMAN_DIR)/node_modules/.bin/newman
	OSPREY_TORCHSERVE_ALL=1 OSPREY_NEWMAN_DIR=$(abspath $(NEWMAN_DIR)) $(BIN)/python -m pytest -q \
	  tests/e2e/test_torchserve_pytest.py tests/e2e/test_torchserve_postman.py

bench-packages: setup
	$(BIN)/pip install -q -e '.[bench]'
	@command -v hey >/dev/null && command -v gcc >/dev/null && command -v grpc_cpp_plugin >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey gcc g++ \
	   libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev pkg-config)

bench: bench-packages
	$(BIN)/python -m benchmarks.run

bench-quick: bench-packages
	$(BIN)/python -m benchmarks.run --quick
