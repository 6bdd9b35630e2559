"""User-facing errors.

Every problem a user can fix (bad paths, wrong shapes, unknown names, a folder holding another run) is raised as
:class:`DistillError` with a one-line message that says what is wrong and what to do. The CLI prints the message and
exits non-zero without a traceback; library callers can catch it like any other exception.
"""

from __future__ import annotations


class DistillError(RuntimeError):
    """A problem with the user's input or environment, described in one line with the fix."""


def unknown_name(kind: str, name: str, known: list[str] | tuple[str, ...]) -> DistillError:
    """Build the error for an unknown registry name, listing what is available."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return DistillError(f"unknown {kind} '{name}'.{hint} Known: {', '.join(sorted(known))}.")
