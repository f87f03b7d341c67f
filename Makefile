# The README's commands: `make demo` gives a running stack, `make test` runs the whole suite;
# both start with `make dev`, which installs what is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: dev demo demo-down demo-clean test lint unit images clean-test-resources

dev: $(BIN)/controlplane
	scripts/install-system-deps

$(BIN)/controlplane: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: dev
	$(BIN)/python scripts/demo.py up

demo-down:
	$(BIN)/python scripts/demo.py down

# demo-down, then the images built from this host's packages (the tests build them again).
demo-clean:
	$(BIN)/python scripts/demo.py clean

# The unit tests share nothing (ports are the kernel's, files the test's own), so they run on
# two processes; the integration tests share the engine and time-bound loads: one at a time.
test: dev lint
	$(BIN)/pytest tests/unit -n 2
	$(BIN)/pytest tests/integration

unit: $(BIN)/controlplane
	$(BIN)/pytest tests/unit -n 2

lint: $(BIN)/controlplane
	$(BIN)/ruff check controlplane tests bench images scripts
	$(BIN)/ruff format --check controlplane tests bench images scripts
	$(BIN)/mypy controlplane tests/support images
	$(BIN)/lint-imports

images: $(BIN)/controlplane
	$(BIN)/python -m images.build

clean-test-resources:
	-docker rm -f $$(docker ps -aq --filter label=controlplane.test=1) 2>/dev/null
	-docker network rm $$(docker network ls -q --filter label=controlplane.test=1) 2>/dev/null
	-docker rm -f $$(docker ps -aq --filter name=^cp-foreign-) 2>/dev/null
