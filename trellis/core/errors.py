"""The one exception type of the model engine: bad config, bad checkpoint, bad parallel layout."""

from __future__ import annotations


class ModelError(Exception):
    """A problem with a model's config, checkpoint or parallel layout, told in one line."""
