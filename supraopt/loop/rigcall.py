"""Calling rig adapters safely: a timeout on every call, the limit guard before every submit, a test hook.

Test hook: with ``SUPRAOPT_CRASH_AT=<label>:<count>`` in the environment the process kills itself
with SIGKILL the ``count``-th time it passes :func:`crash_point` ``label`` (labels: after_adopt,
after_suggest, after_mark_dispatched, after_submit, after_poll_lost, after_resubmit,
after_poll_running, after_mark_running, after_poll_done, after_record, after_abandon). Unset, it
costs nothing. ``tests/test_kill.py`` uses it to kill the runner at every step of the loop.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from supraopt.errors import RigTimeout
from supraopt.records import Proposal, RigLimits


def submit_within_limits(submit: Callable[[Proposal], None], limits: RigLimits, proposal: Proposal) -> list[str]:
    """Call ``submit(proposal)`` only if the proposal lies inside ``limits``; return the violations.

    An empty list means the proposal was handed to ``submit``; otherwise ``submit`` was not called and
    the list says which settings lie outside (a missing or non-finite setting counts as outside).
    """
    problems = limits.violations(proposal.settings)
    if not problems:
        submit(proposal)
    return problems


class RigCall:
    """One rig method, called in a daemon worker thread and waited for at most ``timeout_s`` seconds.

    A call that does not return in time raises :class:`RigTimeout` and is left running; the next call
    first waits (up to ``timeout_s`` again) for that one to end rather than starting a second thread,
    so at most one stuck thread exists per method. Daemon threads, unlike a ``ThreadPoolExecutor``'s,
    do not keep the process alive at exit when a driver hangs for good.
    """

    def __init__(self, name: str, method: Callable[..., Any], timeout_s: float) -> None:
        self.name, self.method, self.timeout_s = name, method, timeout_s
        self._stuck: Future[Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.timeout_s <= 0:
            return self.method(*args)
        if self._stuck is not None:
            if not _finished_within(self._stuck, self.timeout_s):
                raise RigTimeout(f"rig.{self.name}() is still stuck in an earlier call; not calling it again yet.")
            self._stuck = None
        future: Future[Any] = Future()

        def work() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self.method(*args))
                except BaseException as error:
                    future.set_exception(error)

        threading.Thread(target=work, name=f"supraopt-rig-{self.name}", daemon=True).start()
        if not _finished_within(future, self.timeout_s):
            self._stuck = future
            raise RigTimeout(f"rig.{self.name}() gave no answer within {self.timeout_s:g} s.")
        return future.result()


def _finished_within(future: Future[Any], timeout_s: float) -> bool:
    try:
        future.exception(timeout=timeout_s)
    except TimeoutError:
        return False
    return True


def _parse_crash_at(value: str) -> tuple[str, int] | None:
    if not value:
        return None
    label, _, count = value.partition(":")
    return label, int(count or 1)


_CRASH_AT = _parse_crash_at(os.environ.get("SUPRAOPT_CRASH_AT", ""))
_crash_counts: dict[str, int] = {}


def crash_point(label: str) -> None:
    """Test hook: SIGKILL this process at the chosen pass of ``label`` (see the module docstring)."""
    if _CRASH_AT is None or label != _CRASH_AT[0]:
        return
    _crash_counts[label] = _crash_counts.get(label, 0) + 1
    if _crash_counts[label] >= _CRASH_AT[1]:
        os.kill(os.getpid(), signal.SIGKILL)
