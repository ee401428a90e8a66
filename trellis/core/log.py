"""JSON logs through structlog, every line bound to service, replica, stage, rank (and request id)."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(
    service: str,
    *,
    replica: str | None = None,
    stage: int | None = None,
    rank: int | None = None,
    level: str | None = None,
) -> structlog.stdlib.BoundLogger:
    """Configure this process's logging once and return a logger bound to its identity."""
    level_name = (level or os.environ.get("TRELLIS_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(stream=sys.stderr, format="%(message)s", level=level_name, force=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        # One write per line (the message and its newline together): processes sharing a stderr
        # (a replica's ranks, a test's capture) cannot splice their lines (print() wrote twice).
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    ids = {"service": service, "replica": replica, "stage": stage, "rank": rank}
    structlog.contextvars.bind_contextvars(**{k: v for k, v in ids.items() if v is not None})
    return structlog.get_logger()


def get(**bound: object) -> structlog.stdlib.BoundLogger:
    """A logger for a module, with extra fields (e.g. request_id) bound.

    Lazy: safe at import time, it takes the configuration in force when it first logs.
    """
    return structlog.get_logger(**bound)
