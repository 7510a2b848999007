"""The one error convention: every problem a user can fix is a `UserError` whose message is one
line saying what to change. The CLI prints it and exits 2; anything else is a bug (a traceback).
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; its message is one line that says what to change."""


class ConfigError(UserError):
    """A config or command-line problem (a bad key or value, a missing file)."""


class DataError(UserError):
    """A corpus problem (a missing file, a bad row in strict mode)."""


def user_error(exc: BaseException) -> str | None:
    """The one-line message of a user-fixable error, even when Ray wrapped it on the way.

    Only explicit causes lead to one: Ray's `cause` and `raise X from error`. An exception
    raised while another was being handled (`__context__`) is a bug in the handler, and it keeps
    its traceback even when the error it interrupted was the user's."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        # Ray re-raises a task's error as RayTaskError(DataError): a DataError too, but its str
        # is the remote traceback; the original is its `cause`.
        cause = getattr(exc, "cause", None)
        # Ray Train's WorkerGroupError holds each failed rank's error: the lowest rank's says it.
        failures = getattr(exc, "worker_failures", None)
        if cause is None and isinstance(failures, dict) and failures:
            cause = failures[min(failures)]
        if isinstance(exc, UserError) and cause is None:
            # Ray Data appends retry advice to the message as further lines; ours is the first.
            return str(exc).splitlines()[0]
        exc = cause or exc.__cause__
    return None
