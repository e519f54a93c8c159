"""ferry's load tests and benchmark: locust scenarios, a closed-loop driver, the engine ceiling,
the baseline servers the write-up started from, and `python -m loadtest.bench`."""
