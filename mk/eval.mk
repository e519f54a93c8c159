# lm-evaluation-harness against ferry (optional, not part of `make test`: lm-eval pulls a large
# dependency tree). Its own virtual environment, so ferry's stays as `make test` pins it.
.PHONY: eval-check
EVAL_VENV := .venv-eval

$(EVAL_VENV)/.stamp: | $(VENV)/.stamp-runtime
	test -x $(EVAL_VENV)/bin/python || $(PYTHON) -m venv $(EVAL_VENV)
	# torch pinned to the CPU build (any other version pulls a CUDA build of several GB)
	$(EVAL_VENV)/bin/pip install -q 'lm-eval[api]==0.4.13' 'torch==2.13.0' transformers
	touch $@

eval-check: $(EVAL_VENV)/.stamp $(TINY_MODEL_DIR)/model.bin
	$(PY) tools/eval_check.py --lm-eval $(EVAL_VENV)/bin/lm_eval
