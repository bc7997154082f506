"""The pure core: the vocabulary and rules every other part shares, with no I/O.

Imports nothing of `worker.db`, `worker.delivery`, `worker.tasks` or Celery.
"""
