"""Celery task shells: validate, commit, hand to the engine, return."""
