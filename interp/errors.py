"""The toolkit's one base exception.

Every error the library raises on bad input (an unknown model, a bad layer range, a malformed
located-range file, a prompt set that does not exist...) derives from ``SafetyLayersError``, so
``except SafetyLayersError`` catches them all (the command lines do exactly that and report
``error: ...``).  Each subclass also keeps the builtin it refines (``ValueError``,
``FileNotFoundError``...), so code that catches the builtin keeps working.
"""


class SafetyLayersError(Exception):
    """Base class of every error the toolkit raises on bad input."""


__all__ = ["SafetyLayersError"]
