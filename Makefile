# Set-up is part of every target: the virtual environment is created and the
# project installed on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data
COVERAGE_FLOOR ?= 80

.PHONY: help venv run test coverage migrate openapi bench bench-queue bench-ingest bench-api images chart-test scale clean

help:
	@echo "make run        start queue, streamers, collectors and API on embedded defaults"
	@echo "make test       run every test with coverage"
	@echo "make coverage   write an HTML coverage report to htmlcov/"
	@echo "make migrate    apply database migrations to DATABASE_URL"
	@echo "make openapi    write the API's OpenAPI spec to api/openapi.yaml"
	@echo "make bench      run every benchmark"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest --cov --cov-report=term --cov-fail-under=$(COVERAGE_FLOOR) $(PYTEST_ARGS)

coverage: $(STAMP)
	$(PY) -m pytest --cov --cov-report=html $(PYTEST_ARGS)
	@echo "HTML report: htmlcov/index.html"

migrate: $(STAMP)
	$(PY) -m alembic -c migrations/alembic.ini upgrade head

clean:
	rm -rf $(VENV) htmlcov .coverage .coverage.* .pytest_cache
