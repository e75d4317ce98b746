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

.PHONY: setup examples serve stop test system-packages bench bench-quick bench-packages

# A virtual environment with torch pinned to the CPU wheel first (an unpinned torch pulls a
# multi-GB CUDA build), then Osprey and its test tools.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

$(STORE)/digits_cnn.mar: | $(BIN)/.installed
	$(BIN)/osprey examples --out $(STORE)

examples: $(STORE)/digits_cnn.mar

# Serves every example model in the background on 127.0.0.1 (8080 inference, 8081
# management, 8082 metrics, 7070/7071 gRPC). Token auth is off for this local trial run.
serve: examples
	$(BIN)/osprey serve --model-store $(STORE) --models all --disable-token-auth

stop:
	$(BIN)/osprey stop

# Real services the tests talk to (Prometheus, promtool, redis-server), from Debian's packages.
system-packages:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v redis-server >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus redis-server)

$(KSERVE_VENV)/.installed:
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install -q kserve==0.21.0
	touch $@

$(RAY_VENV)/.installed:
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/pip install -q 'ray[default]==2.60.0'
	touch $@

test: setup system-packages $(KSERVE_VENV)/.installed $(RAY_VENV)/.installed
	OSPREY_KSERVE_PYTHON=$(abspath $(KSERVE_VENV))/bin/python OSPREY_RAY_PYTHON=$(abspath $(RAY_VENV))/bin/python \
	  $(BIN)/python -m pytest -q -n 2 --dist loadfile

bench-packages: setup
	$(BIN)/pip install -q -e '.[bench]'
	@command -v hey >/dev/null && command -v gcc >/dev/null && command -v grpc_cpp_plugin >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey gcc g++ \
	   libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev pkg-config)

bench: bench-packages
	$(BIN)/python -m benchmarks.run

bench-quick: bench-packages
	$(BIN)/python -m benchmarks.run --quick
