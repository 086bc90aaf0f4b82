"""Error classes: one flat tree, each leaf also a builtin so callers can catch either.

Every message is one sentence that names the bad value and, where it helps, what to do next.
The CLI prints ``str(error)`` on one line and exits with code 1; it never shows a traceback
for a :class:`SupraoptError`.
"""

from __future__ import annotations


class SupraoptError(Exception):
    """Base class of every error supraopt raises on purpose."""


class SpecError(SupraoptError, ValueError):
    """A campaign spec or physics preset is malformed or inconsistent."""


class InputError(SupraoptError, ValueError):
    """A measurement, setting, id or data file given by the user is not acceptable."""


class LedgerError(SupraoptError, RuntimeError):
    """The ledger refused a state change (unknown id, already recorded, wrong status)."""


class RigError(SupraoptError, RuntimeError):
    """The rig or its link failed: retry or abandon, never feed to the model."""


class RigTimeout(RigError, TimeoutError):
    """The rig did not answer in time: the state of the run is unknown, ask again."""


class LimitViolation(SupraoptError, ValueError):
    """A proposal lies outside the rig's hard safety limits and was not sent."""
