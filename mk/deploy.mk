# Kubernetes deployment: image, chart and manifest checks (included by the main Makefile).
DEPLOY_TESTS := tests/test_chart.py tests/test_deploy_validate.py tests/test_deploy_manifests.py \
	tests/test_deploy_smoke.py tests/test_deploy_image.py

.PHONY: deploy-test validate-manifests chart-template chart-readme
# The image targets (image, image-cuda, image-test, wheelhouse, lock) are in mk/image.mk.

deploy-test: $(VENV)/.stamp-dev $(TINY_MODEL_DIR)/model.bin  ## chart, manifests, validator, smoke, hadolint
	$(PY) -m pytest -q $(DEPLOY_TESTS)

validate-manifests: $(VENV)/.stamp-dev  ## strict offline validation of manifests/*.yaml
	$(PY) deploy/k8s_validate.py manifests/*.yaml

chart-template: $(VENV)/.stamp-dev  ## print the chart rendered with VALUES (default: ci/minimal-values.yaml)
	$(PY) -c 'import sys, yaml; from deploy import chart; \
	v = chart.load_values(chart.Path(sys.argv[1])); \
	print("\n---\n".join(t for p, t in sorted(chart.render(v, name="ferry").items()) if not p.endswith("NOTES.txt")))' \
	$(or $(VALUES),helm/ferry/ci/minimal-values.yaml)

chart-readme: $(VENV)/.stamp-dev  ## regenerate the values table of helm/ferry/README.md from values.yaml
	$(PY) -c 'from deploy import chart; chart.README.write_text(chart.readme_with_table(chart.README.read_text()))'
