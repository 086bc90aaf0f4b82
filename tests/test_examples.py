"""The suggest/record example a chemist copies runs and reaches its target."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from supraopt.campaign import Campaign

REPO = Path(__file__).resolve().parents[1]


def test_suggest_and_record_example_hits_and_leaves_a_complete_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "example"
    monkeypatch.setattr(sys, "argv", ["suggest_and_record.py", str(directory)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "examples" / "suggest_and_record.py"), run_name="__main__")
    assert done.value.code == 0  # the script exits 0 only on a hit
    with Campaign.open(directory) as campaign:
        state = campaign.status()
        assert state.hit and state.best is not None
        assert all(e.prediction for e in state.experiments)  # every suggestion kept its prediction
