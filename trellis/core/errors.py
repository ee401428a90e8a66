"""The error tree: every error Trellis raises on purpose is a TrellisError, told in one line.

Callers at a boundary map the branches once: InvalidRequest -> INVALID_ARGUMENT (HTTP 400),
Unavailable -> UNAVAILABLE (503), Overloaded -> RESOURCE_EXHAUSTED (429), DeadlineExceeded ->
DEADLINE_EXCEEDED (504); ConfigError (a spec, a model or an engine setting) stops a process before
it serves, with the field named.
"""

from __future__ import annotations


class TrellisError(Exception):
    """Anything Trellis refuses or reports on purpose; the message is one line for a person."""


class ConfigError(TrellisError, ValueError):
    """A bad configuration: a deploy spec, an engine setting, a model or its parallel layout."""


class SpecError(ConfigError):
    """A malformed deploy spec; the message starts with the path of the bad field."""


class ModelError(ConfigError):
    """A problem with a model's config, checkpoint or parallel layout."""


class InvalidRequest(TrellisError, ValueError):
    """What is wrong with a request (becomes INVALID_ARGUMENT / HTTP 400)."""


class Unavailable(TrellisError):
    """The request cannot be served right now: no replica, or its replica went down (UNAVAILABLE)."""


class Overloaded(TrellisError):
    """Admission refused: too many requests in flight (RESOURCE_EXHAUSTED / HTTP 429)."""


class DeadlineExceeded(TrellisError):
    """The request's deadline passed before it finished (DEADLINE_EXCEEDED / HTTP 504)."""
