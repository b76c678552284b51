"""User-facing errors: one line naming the problem and the fix.

The CLI prints these without a traceback (unless --debug); everything else is a bug and shows one.
"""
import difflib


class BenchmarkError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""


def unknown_name(kind, name, known):
    """Error for an unknown registry key, suggesting the closest registered names."""
    known = sorted(known)
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return BenchmarkError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known)}.")
