# The README's commands: `make dev` installs everything, `make test` runs the whole suite.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: dev test lint unit images clean-test-resources

dev: $(BIN)/controlplane
	scripts/install-system-deps

$(BIN)/controlplane: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

test: lint
	$(BIN)/pytest

unit:
	$(BIN)/pytest tests/unit

lint:
	$(BIN)/ruff check controlplane tests bench
	$(BIN)/ruff format --check controlplane tests bench
	$(BIN)/mypy controlplane tests/support

images:
	$(BIN)/python -m tests.support.images

clean-test-resources:
	-docker rm -f $$(docker ps -aq --filter label=controlplane.test=1) 2>/dev/null
	-docker network rm $$(docker network ls -q --filter label=controlplane.test=1) 2>/dev/null
