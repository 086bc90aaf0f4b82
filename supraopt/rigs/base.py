"""The rig adapter protocol: how supraopt talks to hardware.

Real runs take minutes to days, so dispatch and completion are separate calls. An adapter is any
class with these four methods (no base class needed, no torch needed)::

    class MyRig:
        def __init__(self, **options): ...            # the [rig.options] table of campaign.toml
        def limits(self) -> RigLimits: ...            # hard safety limits of the hardware
        def submit(self, proposal: Proposal) -> None: ...
        def poll(self, experiment_id: str) -> RunStatus: ...
        def cancel(self, experiment_id: str) -> None: ...

Contract:

* ``submit`` must be **idempotent on** ``proposal.experiment_id``: a second call with an id the
  rig already knows does nothing (the runner retries after a lost reply), also after a restart of
  the adapter (a new object, a new process): keep the runs in a
  :class:`~supraopt.rigs.runbook.RunBook`, in the ``state_dir`` supraopt passes to a constructor
  that has such a parameter. It returns once the rig has accepted the run; it does not wait for
  the result.
* ``poll`` returns a :class:`RunStatus`: ``QUEUED``/``RUNNING`` (ask again later), ``DONE`` with
  a :class:`Measurement`, ``FAILED`` with a :class:`Failure` (the *chemistry* failed: "droplets
  unstable", "hollow particles"...), ``LOST`` if the rig has no run under that id, or
  ``CANCELLED``.
* A problem with the hardware or the link is not a failed experiment: raise
  :class:`~supraopt.errors.RigError` (or :class:`~supraopt.errors.RigTimeout` when no answer came
  in time: the runner treats that as "unknown, ask again", never as failed).
  Any other exception (``KeyError``, ``TypeError``...) is taken for a bug in the adapter: the
  runner stops at once and shows its traceback.
* ``limits`` gives the hard bounds; the runner checks every proposal against them right before
  ``submit`` and never sends one outside them.
* Optional: ``context() -> dict[str, str | float] | None`` says what is mounted now (``{"chip":
  "B", "nc_batch": "2024-03"}``); the runner asks it before each suggestion and stores it with the
  experiments. ``proposal.context`` tells the adapter what a run is meant for, and a
  ``Measurement(..., context=...)`` overrides it for that run.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from supraopt.records import Proposal, RigLimits, RunStatus


@runtime_checkable
class Rig(Protocol):
    """Structural type of a rig adapter; see the module docstring for the contract."""

    def limits(self) -> RigLimits: ...

    def submit(self, proposal: Proposal) -> None: ...

    def poll(self, experiment_id: str) -> RunStatus: ...

    def cancel(self, experiment_id: str) -> None: ...
