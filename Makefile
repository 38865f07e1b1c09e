# Set-up is part of every target: the virtual environment is created and the
# project installed on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data
COVERAGE_FLOOR ?= 93.5

# `make run` settings: the stack's size, its input and where state lives.
STREAMERS ?= 2
COLLECTORS ?= 2
CSV ?= streamer/data/sample_dcgm.csv
DATABASE_URL ?= sqlite:///$(DATA_DIR)/telemetry.db
QUEUE_PORT ?= 8500
API_PORT ?= 8000
CIRCUS_PORT ?= 8555

.PHONY: help venv run test coverage migrate openapi bench bench-queue bench-ingest bench-api bench-streamer bench-e2e images images-test chart-test constraints scale clean

help:
	@echo "make run          start queue, streamers, collectors and API on embedded defaults"
	@echo "make scale        change the number of streamers and collectors of a running stack"
	@echo "                  (STREAMERS=n COLLECTORS=m, and the CIRCUS_PORT that make run used)"
	@echo "make test         run every test with coverage"
	@echo "make coverage     write an HTML coverage report to htmlcov/"
	@echo "make migrate      apply database migrations to DATABASE_URL"
	@echo "make openapi      write the API's OpenAPI spec to api/openapi.yaml"
	@echo "make bench        run every benchmark; one at a time with bench-queue, bench-ingest,"
	@echo "                  bench-api, bench-streamer or bench-e2e"
	@echo "make images       build the container images with buildah (dockerfiles/build.sh)"
	@echo "make images-test  lint, build and run every image's entry point with --help"
	@echo "make chart-test   lint, render, validate and run the Helm chart's workloads locally"
	@echo "make constraints  pin the images' dependencies to the versions in .venv"
	@echo "make clean        remove .venv and coverage output"

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

# Every process of the stack gets its settings from these variables.
STACK_ENV = VENV_BIN=$(abspath $(VENV))/bin STREAMERS=$(STREAMERS) COLLECTORS=$(COLLECTORS) STREAMER_RESPAWN=true \
	CIRCUS_PORT=$(CIRCUS_PORT) CIRCUS_PUBSUB_PORT=$$(($(CIRCUS_PORT)+1)) \
	DATABASE_URL=$(DATABASE_URL) QUEUE_PORT=$(QUEUE_PORT) QUEUE_DATA_DIR=$(DATA_DIR)/queue \
	STREAMER_CSV=$(CSV) STREAMER_QUEUE_URLS=http://127.0.0.1:$(QUEUE_PORT) \
	COLLECTOR_QUEUE_URLS=http://127.0.0.1:$(QUEUE_PORT) API_PORT=$(API_PORT) \
	STREAMER_PORT=0 COLLECTOR_PORT=0

run: $(STAMP)
	mkdir -p $(DATA_DIR)
	DATABASE_URL=$(DATABASE_URL) $(PY) -m alembic -c migrations/alembic.ini upgrade head
	@echo ""
	@echo "Starting the queue, $(STREAMERS) streamers, $(COLLECTORS) collectors and the API (Ctrl-C stops them all)."
	@echo "  API:          http://127.0.0.1:$(API_PORT)/api/v1/gpus"
	@echo "  API docs:     http://127.0.0.1:$(API_PORT)/docs"
	@echo "  Queue:        http://127.0.0.1:$(QUEUE_PORT)/v1/queues"
	@echo "  Try:          curl -s http://127.0.0.1:$(API_PORT)/api/v1/gpus"
	@echo "  Scale:        make scale STREAMERS=4 COLLECTORS=1 CIRCUS_PORT=$(CIRCUS_PORT)"
	@echo ""
	@$(STACK_ENV) $(VENV)/bin/circusd circus.ini

# make scale changes only the counts given on its command line or in the
# environment, not the defaults above.
given = $(filter command line environment,$(origin $(1)))
SCALE_TARGETS = $(if $(call given,STREAMERS),"streamer $(STREAMERS)") \
	$(if $(call given,COLLECTORS),"collector $(COLLECTORS)") \
	$(if $(call given,COLLECTORS),"collector $(COLLECTORS)",$(if $(call given,STREAMERS),"streamer $(STREAMERS)"))

# circus runs one command at a time and answers "already running" to the next
# while a scale-down still waits for processes to stop, so each call is retried
# and the output of a rejected attempt is shown only when every attempt fails.
# circusd logs each rejected attempt as a ConflictError traceback.
# The last count is set twice: the second call is accepted only once the
# first has finished, so make scale returns when circus is idle again. circus
# ignores a stop signal that arrives while it carries out a command.
scale: $(STAMP)
	@$(if $(strip $(SCALE_TARGETS)),true,echo "make scale: pass STREAMERS=n, COLLECTORS=m or both" >&2; exit 1)
	@$(VENV)/bin/circusctl --timeout 5 --endpoint tcp://127.0.0.1:$(CIRCUS_PORT) list >/dev/null 2>&1 || { \
		echo "make scale: no stack answers on tcp://127.0.0.1:$(CIRCUS_PORT): start one with make run," \
			"or pass the CIRCUS_PORT it runs on" >&2; exit 1; }
	@for target in $(SCALE_TARGETS); do \
		set -- $$target; done_ok=; \
		for attempt in $$(seq 60); do \
			if output=$$($(VENV)/bin/circusctl --timeout 90 --endpoint tcp://127.0.0.1:$(CIRCUS_PORT) \
				set $$1 numprocesses $$2 2>&1); then done_ok=1; break; fi; \
			sleep 1; \
		done; \
		[ -n "$$done_ok" ] || { echo "make scale: circus did not accept $$1 numprocesses $$2: $$output" >&2; exit 1; }; \
	done
	@echo "make scale: done:$(if $(call given,STREAMERS), STREAMERS=$(STREAMERS))$(if $(call given,COLLECTORS), COLLECTORS=$(COLLECTORS))"

migrate: $(STAMP)
	mkdir -p $(DATA_DIR)
	DATABASE_URL=$(DATABASE_URL) $(PY) -m alembic -c migrations/alembic.ini upgrade head

openapi: $(STAMP)
	$(PY) -m api.spec api/openapi.yaml

# Builds (once) and reuses a 10-million-sample SQLite file under $(DATA_DIR)/bench/.
bench-api: $(STAMP)
	$(PY) benchmarks/bench_api.py --cache-dir $(DATA_DIR)/bench $(BENCH_API_ARGS)

# Parse rate and memory, and end-to-end publish rate of 1 and 2 streamer processes.
bench-streamer: $(STAMP)
	$(PY) benchmarks/bench_streamer.py $(BENCH_STREAMER_ARGS)

# Durable publish -> lease -> ack rate next to the HTTP ceiling, then memory and
# restart time with a 1,000,000-message backlog.
bench-queue: $(STAMP)
	$(PY) benchmarks/bench_queue.py $(BENCH_QUEUE_ARGS)

# Bare bulk insert against store_records and a real collector draining a real
# queue, on SQLite and, when TEST_POSTGRES_URL is set, PostgreSQL.
bench-ingest: $(STAMP)
	$(PY) benchmarks/bench_ingest.py $(BENCH_INGEST_ARGS)

# The whole stack on the real CSV: rows/s for 1, 2 and 4 streamers and collectors
# next to the bulk-insert ceiling, then freshness through the API at one pass per second.
bench-e2e: $(STAMP)
	$(PY) benchmarks/bench_e2e.py $(BENCH_E2E_ARGS)

# Every benchmark, one after the other (about 15 minutes on 2 cores; bench-api
# builds a 10-million-sample database on its first run).
bench: bench-queue bench-ingest bench-api bench-streamer bench-e2e

# Container images and the Helm chart (dockerfiles/, charts/gpu-telemetry/).
images: $(STAMP)
	dockerfiles/build.sh build

images-test: $(STAMP)
	dockerfiles/build.sh all

chart-test: $(STAMP)
	$(PY) -m pytest tests/chart $(PYTEST_ARGS)

# Pin the images' dependencies to the versions installed in the virtual environment.
constraints: $(STAMP)
	{ echo "# Generated by 'make constraints' from the tested virtual environment; the images install with it."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^gpu-telemetry-pipeline'; } > dockerfiles/constraints.txt

clean:
	rm -rf $(VENV) htmlcov .coverage .coverage.* .pytest_cache
