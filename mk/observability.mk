# Observability: Prometheus rules, the Grafana dashboard, and their checks against a real Prometheus.
.PHONY: observability-test rules-check dashboard-preview

OBSERVABILITY_TESTS := tests/test_metrics_exposition.py tests/test_alerts.py tests/test_dashboard.py tests/test_prometheus.py

# promtool check + unit tests of the alert rules (needs Debian's prometheus: `make system-deps`).
rules-check: system-deps
	promtool check rules helm/ferry/rules/ferry-alerts.yaml
	promtool test rules tests/promtool/ferry-alerts.test.yaml

# The metrics, rules and dashboard tests, with a real Prometheus on 127.0.0.1.
observability-test: system-deps $(VENV)/.stamp-dev
	$(PY) -m pytest -q $(OBSERVABILITY_TESTS)

# docs/dashboard-preview.png: every dashboard query, as a real Prometheus answers it, plotted.
dashboard-preview: system-deps $(VENV)/.stamp-dev
	$(PY) tools/dashboard_preview.py --out docs/dashboard-preview.png
