"""One exception hierarchy for the whole project.

Every error a user can cause or meet derives from :class:`MuseError`. Messages name the bad value
and, where there is a closed set, what would be valid.
"""

from __future__ import annotations


class MuseError(Exception):
    """Root of all project errors."""

    retriable: bool = False


class ConfigurationError(MuseError, ValueError):
    """A setting, option or config has a bad value (names the setting and what is valid)."""


class NotFoundError(MuseError, LookupError):
    """A named thing (dataset, source, job, run, item, user) does not exist."""


class DataError(MuseError, ValueError):
    """Input data is malformed (wrong schema, corrupt file, inconsistent lengths)."""


class BackendUnavailable(MuseError, ConnectionError):
    """A server (database, Milvus, broker) cannot be reached or failed transiently."""

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable
