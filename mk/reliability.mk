# Reliability scenarios against the real server (included by the main Makefile). Loopback-only,
# every server a subprocess on 127.0.0.1 that is stopped at the end, every loop bounded.
#   make reliability                  overload (60 s at >= 10x capacity), faults, drain, disconnects,
#                                     slow_clients (stalled sockets at the connection cap, ~30 s),
#                                     inputs (hostile input classes, tiny model),
#                                     soak (10 min, real model): ~16 min, exits 1 if a criterion fails
#   make reliability SOAK_S=60        the same with a 1-minute soak
#   make reliability RELIABILITY_ARGS=--quick      every scenario short (~2.5 min)
#   make reliability RELIABILITY_ARGS='--scenarios overload,drain'
#   make soak                         the soak alone
# Results: bench-results/reliability-<timestamp>.{json,md}, server logs next to them.
SOAK_S ?=
OVERLOAD_S ?=
RELIABILITY_ARGS ?=
RELIABILITY_FLAGS = --model-dir $(MODEL_DIR) $(if $(SOAK_S),--soak-s $(SOAK_S)) $(if $(OVERLOAD_S),--overload-s $(OVERLOAD_S))

.PHONY: reliability soak

reliability: models $(VENV)/.stamp-dev
	$(PY) -m loadtest.reliability $(RELIABILITY_FLAGS) $(RELIABILITY_ARGS)

soak: models $(VENV)/.stamp-dev
	$(PY) -m loadtest.reliability --scenarios soak $(RELIABILITY_FLAGS) $(RELIABILITY_ARGS)
