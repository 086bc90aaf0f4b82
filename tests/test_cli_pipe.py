"""``supraopt run DIR | head -2``: a closed stdout must not kill the run and leave it dispatched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from supraopt.campaign import Campaign
from supraopt.ledger import OPEN


def test_a_closed_stdout_is_reported_on_stderr_and_the_run_finishes(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    command = [sys.executable, "-m", "supraopt.cli", "demo", str(directory), "--budget", "2", "--target-nm", "900"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        process.stdout.close()  # what 'head -1' does after its line
        stderr = process.stderr.read()
        assert process.wait(timeout=300) == 0, stderr
    assert first.startswith("Demo campaign in")
    assert "stdout was closed (broken pipe): the run keeps going without printing" in stderr
    assert "Traceback" not in stderr
    with Campaign.open(directory) as campaign:
        assert not campaign.ledger.experiments(OPEN)  # nothing left dispatched
        assert campaign.status().counts.get("done", 0) + campaign.status().counts.get("failed", 0) == 2
    assert "stopped" in (directory / "run.log").read_text().splitlines()[-1]
