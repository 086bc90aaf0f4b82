"""A rig run by a person: proposals become written instructions, results come back through the ledger.

``submit`` appends a block to ``<campaign>/manual/next_experiments.txt`` (and prints it) saying what
to set and how to record the outcome with ``supraopt record``; ``poll`` reports a run as finished
once that result is in the campaign's ledger.
"""

from __future__ import annotations

import os
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from supraopt.errors import LedgerError, LimitViolation, RigError
from supraopt.records import PARAMETERS, UNITS, Proposal, RigLimits, RunState, RunStatus
from supraopt.spec import load_spec

if TYPE_CHECKING:
    from supraopt.ledger import Ledger

_HEADER = re.compile(r"^=== experiment (\S+) (===|cancelled)", re.MULTILINE)


class ManualRig:
    """Rig adapter for a human operator.

    Args:
        directory: the campaign folder (holds ``campaign.toml`` and, by default, the ledger).
        ledger_url: where results are recorded; default: the campaign's ``ledger_url`` or
            ``sqlite:///<directory>/ledger.sqlite``.
        instructions_file: the operator's to-do list, relative to ``directory``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        ledger_url: str | None = None,
        instructions_file: str = "manual/next_experiments.txt",
    ) -> None:
        self.directory = Path(directory)
        self.instructions = self.directory / instructions_file
        self._ledger_url = ledger_url
        self._ledger: Ledger | None = None

    def limits(self) -> RigLimits:
        """The campaign's bounds (a person can set anything the campaign asks for)."""
        return RigLimits(dict(load_spec(self.directory).bounds))

    def submit(self, proposal: Proposal) -> None:
        """Append (and print) the instructions for this run; a second submit of an id is a no-op."""
        if proposal.experiment_id in self._headers():
            return
        problems = self.limits().violations(proposal.settings)
        if problems:
            raise LimitViolation(f"experiment {proposal.experiment_id} not submitted: {'; '.join(problems)}.")
        self._append(self._instructions_block(proposal))

    def poll(self, experiment_id: str) -> RunStatus:
        """DONE/FAILED once a result is recorded in the ledger, RUNNING until then, LOST if never submitted."""
        headers = self._headers()
        if experiment_id not in headers:
            return RunStatus(experiment_id, RunState.LOST, message=f"not in {self.instructions}")
        try:
            experiment = self._open_ledger().get(experiment_id)
        except LedgerError as error:
            raise RigError(f"the manual rig cannot read experiment {experiment_id} from the ledger: {error}") from error
        if experiment.status == "done":
            return RunStatus(experiment_id, RunState.DONE, experiment.measurement)
        if experiment.status == "failed":
            return RunStatus(experiment_id, RunState.FAILED, experiment.failure)
        if experiment.status == "abandoned" or headers[experiment_id] == "cancelled":
            return RunStatus(experiment_id, RunState.CANCELLED)
        return RunStatus(
            experiment_id, RunState.RUNNING, message=f"waiting for 'supraopt record' ({self.instructions})"
        )

    def cancel(self, experiment_id: str) -> None:
        """Tell the operator not to run it (appended to the instructions); unknown ids are ignored."""
        if self._headers().get(experiment_id) == "===":
            self._append(f"=== experiment {experiment_id} cancelled: do not run it ===\n")

    def _instructions_block(self, proposal: Proposal) -> str:
        experiment_id = proposal.experiment_id
        record = f"supraopt record {shlex.quote(str(self.directory))} {shlex.quote(experiment_id)}"
        width = max(len(name) for name in PARAMETERS)
        lines = [
            f"=== experiment {experiment_id} ===  (submitted {datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
            "Set the rig to:",
            *(f"  {name:<{width}} = {proposal.settings[name]:.4g} {UNITS[name]}" for name in PARAMETERS),
            "When the supraparticles are sized, record the result:",
            f"  {record} --diameter-nm X --pdi Y --n-particles N",
            "or, if the run gave no usable supraparticles:",
            f'  {record} --failed "reason"',
        ]
        return "\n".join(lines) + "\n\n"

    def _append(self, text: str) -> None:
        self.instructions.parent.mkdir(parents=True, exist_ok=True)
        with open(self.instructions, "a", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        print(text, end="", flush=True)

    def _headers(self) -> dict[str, str]:
        """Experiment id -> '===' (submitted) or 'cancelled', from the instructions file."""
        if not self.instructions.exists():
            return {}
        headers: dict[str, str] = {}
        for match in _HEADER.finditer(self.instructions.read_text(encoding="utf-8")):
            headers[match.group(1)] = match.group(2)
        return headers

    def _open_ledger(self) -> Ledger:
        from supraopt.ledger import Ledger  # lazy: only a manual rig with a campaign folder reads the ledger

        if self._ledger is None:
            url = self._ledger_url or load_spec(self.directory).ledger_url
            self._ledger = Ledger(url or f"sqlite:///{self.directory.resolve() / 'ledger.sqlite'}")
        return self._ledger
