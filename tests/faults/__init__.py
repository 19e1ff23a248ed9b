"""Fault-injection scenarios: real redis-server, real celery worker subprocesses, the tiny model."""
