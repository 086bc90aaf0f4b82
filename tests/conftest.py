"""Shared fixtures for the core tests: the CsPbBr3 preset, its search space and campaign folders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from supraopt.campaign import Campaign
from supraopt.physics import Preset
from supraopt.space import SearchSpace

CSPBBR3 = "cspbbr3-flow-focusing"

LedgerState = tuple[pd.DataFrame, list[dict[str, Any]]]


@pytest.fixture(scope="session")
def preset() -> Preset:
    """The CsPbBr3 flow-focusing preset shipped in models/."""
    return Preset.load(CSPBBR3)


@pytest.fixture(scope="session")
def space(preset: Preset) -> SearchSpace:
    """The preset's own search envelope."""
    return SearchSpace(preset.bounds)


@pytest.fixture
def campaign_dir(tmp_path: Path) -> Path:
    """A fresh CsPbBr3 campaign (450 nm, ±3 %, PDI ≤ 6 %, seed 0) with an empty ledger; returns its folder."""
    directory = tmp_path / "campaign"
    Campaign.create(directory, CSPBBR3, 450.0, seed=0).close()
    return directory


@pytest.fixture
def campaign(campaign_dir: Path) -> Iterator[Campaign]:
    """The :func:`campaign_dir` campaign, opened; closed after the test."""
    with Campaign.open(campaign_dir) as opened:
        yield opened


@pytest.fixture
def ledger_state() -> Callable[[Path], LedgerState]:
    """Read a campaign's ledger as (experiments frame, event list), to compare before and after a call."""

    def read(directory: Path) -> LedgerState:
        with Campaign.open(directory) as opened:
            return opened.ledger.to_frame(), opened.ledger.events()

    return read


def assert_same_ledger(before: LedgerState, after: LedgerState) -> None:
    """Both the experiments table and the full event history are unchanged."""
    pd.testing.assert_frame_equal(before[0], after[0])
    assert before[1] == after[1]


@pytest.fixture
def same_ledger() -> Callable[[LedgerState, LedgerState], None]:
    """:func:`assert_same_ledger`, as a fixture so test modules need not import conftest."""
    return assert_same_ledger
