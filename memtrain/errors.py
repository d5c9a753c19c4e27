"""The one base class of the errors a user can fix.

Everything memtrain raises for a user's mistake or an environment the user must change (a
config field, a path, a size, a disk that is full, a plan that cannot fit) is a ``UserError``
whose message names the field or file and the fix. The CLI catches this class alone: it prints
the message and exits 2 without a traceback. Any other exception is a failure of ours and keeps
its traceback. This module imports nothing of memtrain, so every layer may import it.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A mistake the user can fix; the message names the field or file and what would fix it.

    It subclasses ``ValueError`` so that callers written against the older contract
    (``except ValueError``) keep working."""
