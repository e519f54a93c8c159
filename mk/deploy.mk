# Kubernetes deployment: image, chart and manifest checks (included by the main Makefile).
CONTAINER ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
IMAGE ?= ferry
IMAGE_TAG ?= 0.1.0
IMAGE_TEST_PORT ?= 18080
DEPLOY_TESTS := tests/test_chart.py tests/test_deploy_validate.py tests/test_deploy_manifests.py \
	tests/test_deploy_smoke.py tests/test_deploy_image.py

.PHONY: deploy-test validate-manifests chart-template image image-cuda image-test

deploy-test: $(VENV)/.stamp-dev $(TINY_MODEL_DIR)/model.bin  ## chart, manifests, validator, smoke, hadolint
	$(PY) -m pytest -q $(DEPLOY_TESTS)

validate-manifests: $(VENV)/.stamp-dev  ## strict offline validation of manifests/*.yaml
	$(PY) deploy/k8s_validate.py manifests/*.yaml

chart-template: $(VENV)/.stamp-dev  ## print the chart rendered with VALUES (default: ci/minimal-values.yaml)
	$(PY) -c 'import sys, yaml; from deploy import chart; \
	v = chart.load_values(chart.Path(sys.argv[1])); \
	print("\n---\n".join(t for p, t in sorted(chart.render(v, name="ferry").items()) if not p.endswith("NOTES.txt")))' \
	$(or $(VALUES),helm/ferry/ci/minimal-values.yaml)

image:  ## CPU image (podman or docker; needs the base image's registry)
	@test -n "$(CONTAINER)" || { echo "no podman or docker found"; exit 1; }
	$(CONTAINER) build -t $(IMAGE):$(IMAGE_TAG) .

image-cuda:  ## CUDA variant for GPU nodes
	@test -n "$(CONTAINER)" || { echo "no podman or docker found"; exit 1; }
	$(CONTAINER) build --build-arg VARIANT=cuda -t $(IMAGE):$(IMAGE_TAG)-cuda .

# Runs the CPU image as a pod would: read-only root filesystem, non-root, every capability dropped,
# the tiny model mounted read-only at /mnt/models, then checks readiness and one /generate.
image-test: image $(TINY_MODEL_DIR)/model.bin
	@set -euo pipefail; \
	name=ferry-image-test-$$$$; \
	$(CONTAINER) run -d --rm --name $$name --read-only --tmpfs /tmp --cap-drop ALL \
	  --security-opt no-new-privileges -p 127.0.0.1:$(IMAGE_TEST_PORT):8080 \
	  -v $(CURDIR)/$(TINY_MODEL_DIR):/mnt/models:ro -e FERRY_DEVICE=cpu $(IMAGE):$(IMAGE_TAG) >/dev/null; \
	trap '$(CONTAINER) stop -t 25 '$$name' >/dev/null 2>&1 || true' EXIT; \
	for i in $$(seq 60); do \
	  curl -fsS localhost:$(IMAGE_TEST_PORT)/v2/models/opt-125m/ready >/dev/null 2>&1 && break; sleep 1; \
	done; \
	curl -fsS localhost:$(IMAGE_TEST_PORT)/v2/models/opt-125m/ready; echo; \
	curl -fsS localhost:$(IMAGE_TEST_PORT)/generate \
	  -d '{"text": "Hello World, what is your name dog?", "max_new_tokens": 10}' | grep generated_text; \
	test "$$($(CONTAINER) exec $$name id -u)" = 10001; \
	echo "image-test: ok"
