# Benchmark and load-test targets (included by the main Makefile). All loopback-only, bounded.
#   make bench-quick   ferry vs engine ceiling, naive, timer batcher, simulated GPU: 1 and 40 users (~2.5 min)
#   make bench         the same at 1..128 users, 3 runs at 40, V1/V2, mixed and locust rows, plots in docs/ (15-20 min)
#   make loadtest      locust, headless, against a running ferry (FERRY_URL), CSV + HTML in bench-results/
BENCH_ARGS ?=
FERRY_URL ?= http://127.0.0.1:$(HTTP_PORT)
LOCUST_USERS ?= 40
LOCUST_RUN_TIME ?= 60s
LOCUST_CLASSES ?= GenerateUser
LOCUST_ARGS ?=

.PHONY: bench bench-quick loadtest

bench-quick: models $(VENV)/.stamp-dev
	$(PY) -m loadtest.bench --mode quick --model-dir $(MODEL_DIR) $(BENCH_ARGS)

bench: models $(VENV)/.stamp-dev
	$(PY) -m loadtest.bench --mode full --model-dir $(MODEL_DIR) $(BENCH_ARGS)

loadtest: $(VENV)/.stamp-dev
	@mkdir -p bench-results
	$(VENV)/bin/locust -f loadtest/locustfile.py $(LOCUST_CLASSES) --headless \
		--host $(FERRY_URL) -u $(LOCUST_USERS) -r $(LOCUST_USERS) -t $(LOCUST_RUN_TIME) --stop-timeout 10 \
		--csv bench-results/locust --html bench-results/locust.html --only-summary $(LOCUST_ARGS)
