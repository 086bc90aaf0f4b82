"""Plot details that can mislead: a one-label axis, a blob of 1,000 error bars, runs from other temperatures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from matplotlib.collections import PathCollection

from supraopt import plots
from supraopt.fit import MODELS, CVResult
from supraopt.physics import Preset
from supraopt.space import SearchSpace


def visible_labels(ax, which: str = "x") -> list[str]:
    ax.figure.canvas.draw()
    axis = ax.xaxis if which == "x" else ax.yaxis
    low, high = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
    return [t.label1.get_text() for t in ticks if t.label1.get_text() and low <= t.get_loc() <= high]


def test_a_log_axis_within_one_decade_gets_several_labels() -> None:
    figure = plots._figure(4, 3)
    ax = figure.subplots()
    ax.scatter([75.0, 120.0, 175.0], [1.0, 2.0, 3.0])
    plots._log_axis(ax, "x")
    labels = visible_labels(ax)
    assert len(labels) >= 3, labels
    assert all(float(label) > 0 for label in labels)


def test_parity_with_a_thousand_runs_draws_a_sample_of_bars_and_every_point() -> None:
    rng = np.random.default_rng(0)
    measured = rng.uniform(300, 600, 1000)
    rows = [
        {"outcome": "diameter_nm", "model": model, "measured": m, "predicted": m * 1.02, "lower90": m * 0.95, "upper90": m * 1.09}
        for model in MODELS
        for m in measured
    ]  # fmt: skip
    cv = CVResult("supraparticle", 5, pd.DataFrame(), pd.DataFrame(rows))
    figure = plots.parity(cv, "diameter_nm")
    for ax in figure.axes:
        [bars] = [c for c in ax.containers]
        segments = bars.lines[2][0].get_segments()
        assert len(segments) == plots.MAX_ERROR_BARS
        [dots] = [c for c in ax.collections if c.get_gid() == "all-runs"]
        assert len(dots.get_offsets()) == 1000
        assert any("bars on 150 random runs" in t.get_text() for t in ax.get_legend().get_texts())


class FlatGP:
    """Stands in for a fitted GP: 450 nm everywhere."""

    def moments(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((z.shape[0],), math.log(450.0), dtype=torch.double), torch.ones(z.shape[0])


def test_maps_draw_runs_far_from_the_map_temperature_as_grey_rings() -> None:
    space = SearchSpace(Preset.load("cspbbr3-flow-focusing").bounds)
    runs = pd.DataFrame(
        {
            "concentration_mg_ml": [3.0, 4.0, 5.0, 6.0],
            "flow_ratio": [3.0, 3.0, 4.0, 5.0],
            "temperature_c": [40.0, 42.0, 70.0, 20.0],
            "diameter_nm": [440.0, 455.0, 600.0, math.nan],
            "failed": ["", "", "", "hollow"],
        }
    )
    figure = plots.maps(space, FlatGP(), None, None, runs, 40.0, "test")  # type: ignore[arg-type]
    [ax] = [a for a in figure.axes if a.get_label() != "<colorbar>"]
    [far] = [c for c in ax.collections if c.get_gid() == "far-runs"]
    assert far.get_offsets().tolist() == [[5.0, 4.0], [6.0, 5.0]]  # the 70 °C run and the 20 °C failure
    coloured = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_array() is not None]
    assert [len(c.get_offsets()) for c in coloured] == [2]  # only the two runs near 40 °C carry their values
    assert "°C away" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
