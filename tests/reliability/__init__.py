"""Fault-injection tests: the worker against crashes, outages, chaos and malformed input.

Every scenario runs against its own Redis and its own PostgreSQL (never the shared ones),
a real `celery -A worker.celery_app worker` subprocess and a real signature-checking
receiver, and ends with a ledger: published = delivered + visibly failed, nothing lost.
"""
