"""The servers ferry is measured against, written as the write-up describes them and as well as
their designs allow: the same engine class, model and thread counts as ferry.

- `naive`: FastAPI, one engine call per request, made on the event loop.
- `timer_batcher`: FastAPI + a background batching task, max batch 50, a fixed 100 ms wait.
"""
