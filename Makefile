# Trellis: setup · proto · run · test · lint · bench
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROTOS := $(wildcard protos/trellis/v1/*.proto)
STUBS  := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS))
PORT   ?= 50051

.PHONY: setup proto run test test-unit test-integration lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) scripts/setup.sh
	touch $@

proto: $(STUBS)

trellis/v1/%_pb2.py: protos/trellis/v1/%.proto $(VENV)/.installed
	@mkdir -p trellis/v1 && touch trellis/v1/__init__.py
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $<

# The main job: the built-in demo mesh (2 stages x TP 2 on CPU), one request through it.
run: setup proto
	$(VENV)/bin/trellis demo --port $(PORT)

test: setup proto
	scripts/ensure-redis.sh
	scripts/ensure-tools.sh
	$(PY) -m pytest -q -ra tests

test-unit: setup proto
	$(PY) -m pytest -q tests/unit

# ruff, then the floors of the house (import-linter contracts in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check trellis services tests bench
	$(VENV)/bin/ruff format --check trellis services tests bench
	$(VENV)/bin/lint-imports --no-cache

bench: setup proto
	$(PY) bench/engine_cpu.py
	$(PY) bench/mesh_cpu.py

clean:
	rm -rf $(VENV) trellis/v1 .pytest_cache
