"""A complete third-party rig adapter: copy this file and replace the toy physics with your hardware.

An adapter is a plain class with four methods (see ``supraopt/rigs/base.py``); it needs no base class
and no torch, only the record types in :mod:`supraopt.records` and the errors in :mod:`supraopt.errors`.
This one simulates a bench rig with its own simple physics (a droplet law, a mass balance and a
concentration window that differ from supraopt's built-in twin), so it runs anywhere.

Use it from a campaign's ``campaign.toml``; the ``[rig.options]`` table is passed to the constructor::

    [rig]
    adapter = "examples.custom_adapter:BenchRig"

    [rig.options]
    seed = 1
    duration_s = 0.0                      # seconds a run takes; a real rig: minutes to days

then ``supraopt run DIR`` (run it from the folder holding ``examples/``, or install your adapter as a
package; the runner also looks for the module in the working folder and the campaign folder).
``python examples/custom_adapter.py`` runs a whole campaign on this rig in a temporary folder.

Its constructor has a ``state_dir`` parameter, so supraopt gives it the campaign's state folder
(``<campaign>/rig-state/``); it keeps its runs there in a :class:`~supraopt.rigs.RunBook`.

What the runner relies on:

* ``submit`` is idempotent on ``proposal.experiment_id``, **even across restarts of the adapter**: a
  second submit of a known id does nothing (the runner resubmits after a lost reply or a crash, and
  must never start a second run). After a kill -9 or a reboot a fresh adapter object is built, so a
  run table kept in memory is gone: keep it in a :class:`~supraopt.rigs.RunBook` (durable, atomic).
* ``submit`` returns as soon as the run is accepted; ``poll`` reports QUEUED/RUNNING until it is done.
* a failed *chemistry* is a FAILED run with a :class:`Failure` (it teaches the optimiser where the
  window is); a broken *rig or link* raises :class:`RigError` (the runner retries, never learns from it).
* the rig keeps finished results, so a runner that crashed before recording one can poll it again.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from supraopt.errors import InputError, LimitViolation, RigError
from supraopt.records import Failure, Measurement, Proposal, RigLimits, RunState, RunStatus
from supraopt.rigs import RunBook


class BenchRig:
    """A bench-top flow-focusing rig with toy physics, written only from the adapter protocol.

    Args:
        seed: seeds the measurement noise together with each experiment id (reproducible runs).
        duration_s: seconds between submit and the result.
        nozzle_um: nozzle width of the chip, µm.
        state_dir: folder for the run book (supraopt passes ``<campaign>/rig-state/``); None keeps the
            runs in memory, which no restart survives (fine for a quick test, never for a real rig).
    """

    def __init__(
        self, seed: int = 0, duration_s: float = 0.0, nozzle_um: float = 6.0, state_dir: str | None = None
    ) -> None:
        if not (isinstance(duration_s, (int, float)) and duration_s >= 0):
            raise InputError(f"duration_s={duration_s!r} must be a non-negative number of seconds.")
        self.seed, self.duration_s, self.nozzle_um = int(seed), float(duration_s), float(nozzle_um)
        self.book = RunBook(None) if state_dir is None else RunBook.in_folder(state_dir, "bench-rig.sqlite")

    # ------------------------------------------------------------------ the four methods

    def limits(self) -> RigLimits:
        """Hard limits of the hardware: pumps, heater and what the chip survives."""
        return RigLimits({"concentration_mg_ml": (0.5, 12.0), "flow_ratio": (1.0, 20.0), "temperature_c": (20.0, 70.0)})

    def submit(self, proposal: Proposal) -> None:
        if proposal.experiment_id in self.book:
            return  # idempotent: this run is already under way (or done), even if we restarted since
        problems = self.limits().violations(proposal.settings)
        if problems:
            raise LimitViolation(f"{proposal.experiment_id} refused by the bench rig: {'; '.join(problems)}.")
        if not self.book.claim(proposal):  # atomic: True for exactly one caller, even across processes
            return
        # A real rig starts its pumps here, after the claim: a crash in between can lose the run (the runner
        # then gives up on it) but never start it twice. This toy rig runs by the clock from the claim on.

    def poll(self, experiment_id: str) -> RunStatus:
        run = self.book.get(experiment_id)
        if run is None:
            return RunStatus(experiment_id, RunState.LOST, message="the bench rig has no run under this id")
        if run.state in (RunState.DONE, RunState.FAILED):
            return run.status()  # kept: a runner that crashed before recording it asks again
        if time.time() - run.created_at < self.duration_s:
            return RunStatus(experiment_id, RunState.RUNNING)
        return self.book.finish(experiment_id, self._measure(experiment_id, run.settings)).status()

    def cancel(self, experiment_id: str) -> None:
        """This toy rig cannot stop a run once started; a real one would stop its pumps here."""

    # ------------------------------------------------------------------ toy physics

    def _measure(self, experiment_id: str, settings: dict[str, float]) -> Measurement | Failure:
        c, r, t = settings["concentration_mg_ml"], settings["flow_ratio"], settings["temperature_c"]
        if c < 1.8 * math.exp(0.01 * (t - 25.0)):
            return Failure("hollow particles")
        if c > 8.5:
            return Failure("droplets unstable")
        droplet_um = 0.9 * self.nozzle_um * r**-0.42 * math.exp(-0.03 * (t - 25.0) / 10.0)
        diameter_nm = 1000.0 * droplet_um * (c * 1e-3 / (4.8 * 0.42)) ** (1.0 / 3.0)
        cv_droplet = 2.2 * (1.0 + 0.5 * math.log(r / 3.0) ** 2)
        cv_process = 3.8 * math.exp(-0.2 * (t - 25.0) / 10.0)
        pdi_pct = math.hypot(cv_droplet, cv_process)
        noise = random.Random(f"{self.seed}:{experiment_id}")  # the same run always reads the same
        try:
            return Measurement(
                diameter_nm=diameter_nm * noise.gauss(1.0, 0.012),
                pdi_pct=pdi_pct * noise.gauss(1.0, 0.05),
                n_particles=noise.randint(80, 160),
            )
        except InputError as error:  # should not happen; never report garbage as a measurement
            raise RigError(f"bench rig produced an implausible reading for {experiment_id}: {error}") from error


def main() -> None:
    """Run a whole campaign on this rig in a temporary folder: what ``supraopt run DIR`` does with it.

    Only this demo imports the optimiser (and so torch); the adapter above needs neither.
    """
    import sys
    import tempfile

    from supraopt.campaign import Campaign
    from supraopt.loop import run
    from supraopt.spec import RigSettings

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # so that "custom_adapter:BenchRig" imports
    directory = Path(tempfile.mkdtemp(prefix="bench-rig-")) / "campaign"
    rig = RigSettings("custom_adapter:BenchRig", {"seed": 1, "duration_s": 0.0})
    Campaign.create(directory, "cspbbr3-flow-focusing", 400.0, rig=rig).close()
    summary = run(directory, budget=15, poll_interval_s=0.0, progress=lambda event: print(event.text()))
    print(f"{summary.message} Ledger: {directory / 'ledger.sqlite'}")


if __name__ == "__main__":
    main()
