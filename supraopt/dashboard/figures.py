"""Plotly figures as plain JSON-able dicts, drawn in the browser by the plotly.js the dashboard serves.

:func:`convergence` and :func:`parity` need only the ledger's rows (fast, on every page view);
:func:`model_maps` and :func:`preview` refit the campaign's model (torch) and run only on demand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from supraopt.dashboard.data import Row
from supraopt.ledger import Status
from supraopt.spec import Target

if TYPE_CHECKING:
    from supraopt.campaign import Campaign

Z90 = 1.6449
"""Half-width of a 90 % normal interval in standard deviations."""
MAP_GRID = 40
BLUE, GREEN, RED, GRAY = "#1f77b4", "#2ca02c", "#d62728", "#7f7f7f"


def _layout(title: str, **extra: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "title": {"text": title, "font": {"size": 14}},
        "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
        "height": 360,
        "legend": {"orientation": "h", "y": -0.2},
        "font": {"family": "system-ui, sans-serif", "size": 12},
    }
    return layout | extra


def convergence(rows: list[Row], targets: Sequence[Target]) -> dict[str, Any]:
    """Distance to the (nearest) target (tolerance units, log scale) per finished experiment; hits, with the
    target(s) they hit, and failures marked. Every target's band is the line at 1."""
    finished = [r for r in rows if r.experiment.status in (Status.DONE, Status.FAILED)]
    measured = [(k, r) for k, r in enumerate(finished, 1) if r.distance is not None]
    hits = [(k, r) for k, r in measured if r.hit]
    failed = [(k, r) for k, r in enumerate(finished, 1) if r.experiment.status is Status.FAILED]
    best: list[float] = []
    for _, r in measured:
        best.append(min(best[-1], r.distance or math.inf) if best else r.distance or math.inf)
    top = max([r.distance or 1.0 for _, r in measured] + [2.0])
    traces = [
        {
            "type": "scatter", "mode": "markers", "name": "measured", "x": [k for k, _ in measured],
            "y": [r.distance for _, r in measured], "text": [r.id for _, r in measured],
            "marker": {"color": BLUE, "size": 7}, "hovertemplate": "%{text}: distance %{y:.2f}<extra></extra>",
        },
        {
            "type": "scatter", "mode": "lines", "name": "best so far", "x": [k for k, _ in measured], "y": best,
            "line": {"color": GRAY, "shape": "hv", "width": 1.5}, "hoverinfo": "skip",
        },
        {
            "type": "scatter", "mode": "markers", "name": "hit", "x": [k for k, _ in hits],
            "y": [r.distance for _, r in hits],
            "text": [f"{r.id}: hits {' and '.join(f'{d:g} nm' for d in r.hits)}" for _, r in hits],
            "marker": {"color": GREEN, "size": 14, "symbol": "star", "line": {"color": "black", "width": 1}},
            "hovertemplate": "%{text}<extra></extra>",
        },
        {
            "type": "scatter", "mode": "markers", "name": "failed run", "x": [k for k, _ in failed],
            "y": [top] * len(failed), "text": [r.experiment.failure.reason if r.experiment.failure else "" for _, r in failed],
            "marker": {"color": RED, "size": 9, "symbol": "x"}, "hovertemplate": "failed: %{text}<extra></extra>",
        },
    ]  # fmt: skip
    nearest = "the target" if len(targets) == 1 else f"the nearest of {len(targets)} targets"
    layout = _layout(
        f"Distance to {nearest} per experiment (≤ 1 is a hit)",
        xaxis={"title": {"text": "experiment number (finished runs)"}},
        yaxis={"title": {"text": "distance (tolerance units)"}, "type": "log"},
        shapes=[
            {
                "type": "line",
                "xref": "paper",
                "x0": 0,
                "x1": 1,
                "y0": 1,
                "y1": 1,
                "line": {"color": GREEN, "dash": "dash"},
            }
        ],
    )
    return {"data": traces, "layout": layout}


def parity(rows: list[Row], targets: Sequence[Target]) -> dict[str, Any]:
    """Predicted (before the run, with its 90 % interval) against measured diameter; each target's size
    band shaded and labelled."""
    pairs = [
        r
        for r in rows
        if r.experiment.status is Status.DONE and r.experiment.measurement and "diameter_nm" in r.experiment.prediction
    ]
    measured = [r.experiment.measurement.diameter_nm for r in pairs if r.experiment.measurement]
    predicted = [r.experiment.prediction["diameter_nm"] for r in pairs]
    sd = [Z90 * r.experiment.prediction.get("diameter_sd_nm", 0.0) for r in pairs]
    values = [*measured, *predicted, *(t.diameter_nm for t in targets)]
    low, high = min(values) * 0.9, max(values) * 1.1
    traces = [
        {
            "type": "scatter", "mode": "lines", "name": "predicted = measured", "x": [low, high], "y": [low, high],
            "line": {"color": "black", "dash": "dash", "width": 1}, "hoverinfo": "skip",
        },
        {
            "type": "scatter", "mode": "markers", "name": "run (bar: 90 % interval)", "x": measured, "y": predicted,
            "text": [r.id for r in pairs], "error_y": {"type": "data", "array": sd, "color": BLUE, "thickness": 1},
            "marker": {"color": [GREEN if r.hit else BLUE for r in pairs], "size": 7},
            "hovertemplate": "%{text}: measured %{x:.0f} nm, predicted %{y:.0f} nm<extra></extra>",
        },
    ]  # fmt: skip
    bands = [(t.diameter_nm * (1 - t.tolerance), t.diameter_nm * (1 + t.tolerance)) for t in targets]
    layout = _layout(
        "Predicted before the run vs measured diameter"
        + ("" if len(targets) == 1 else f" ({len(targets)} target bands)"),
        xaxis={"title": {"text": "measured SP diameter (nm)"}, "range": [low, high]},
        yaxis={"title": {"text": "predicted SP diameter (nm)"}, "range": [low, high]},
        shapes=[
            {"type": "rect", "xref": "x", "yref": "paper", "x0": x0, "x1": x1, "y0": 0, "y1": 1,
             "fillcolor": GREEN, "opacity": 0.15, "line": {"width": 0}}
            for x0, x1 in bands
        ],
        annotations=[
            {"x": t.diameter_nm, "xref": "x", "y": 1, "yref": "paper", "yanchor": "bottom", "showarrow": False,
             "text": f"{t.diameter_nm:g} nm", "font": {"size": 10, "color": GREEN}}
            for t in targets
        ],
    )  # fmt: skip
    return {"data": traces, "layout": layout}


def _geomspace(low: float, high: float, n: int) -> list[float]:
    if high <= low:
        return [low] * n
    return [low * (high / low) ** (i / (n - 1)) for i in range(n)]


def model_maps(campaign: Campaign, rows: list[Row], temperature_c: float) -> dict[str, Any]:
    """Maps of predicted diameter, PDI, P(feasible) and P(hit) over concentration x flow ratio at one
    temperature, with measured runs (circles) and failed runs (red crosses) at every temperature drawn on them."""
    import torch

    surrogates = campaign.fit([r.experiment for r in rows])
    c_low, c_high = campaign.space.bounds["concentration_mg_ml"]
    r_low, r_high = campaign.space.bounds["flow_ratio"]
    cs, rs = _geomspace(c_low, c_high, MAP_GRID), _geomspace(r_low, r_high, MAP_GRID)
    x = torch.tensor([[c, r, temperature_c] for r in rs for c in cs], dtype=torch.double)
    z = campaign.space.to_unit(x)
    with torch.no_grad():
        grids = {
            "diameter": torch.exp(surrogates.size.moments(z)[0]),
            "pdi": torch.exp(surrogates.pdi.moments(z)[0]),
            "feasible": surrogates.feasibility.prob(z),
            # bands rarely overlap (a warning when they do): one run hits at most one target, P(any) = sum
            "hit": torch.stack([torch.exp(a.log_p_hit(z)) for a in surrogates.per_target or (surrogates.acquisition,)])
            .sum(0)
            .clamp(max=1.0),
        }
    done = [r for r in rows if r.experiment.status is Status.DONE and r.experiment.measurement]
    failed = [r for r in rows if r.experiment.status is Status.FAILED]
    titles = {  # plotly.js knows only a few scale names (no RdYlGn, no Magma): explicit stops
        "diameter": ("predicted SP diameter (nm)", "Viridis", None),
        "pdi": ("predicted PDI, CV (%)", [[0, "#fcfdbf"], [0.5, "#de4968"], [1, "#3b0f70"]], None),
        "feasible": ("P(run gives usable SPs)", [[0, "#d73027"], [0.5, "#fee08b"], [1, "#1a9850"]], (0.0, 1.0)),
        "hit": (
            "P(hit)" if len(campaign.spec.targets) == 1 else "P(hit any target)",
            [[0, "#f7fbff"], [0.4, "#6baed6"], [1, "#08306b"]],
            None,
        ),
    }
    figures = {}
    for key, values in grids.items():
        title, scale, zrange = titles[key]
        flat = [float(v) for v in values.tolist()]
        heat: dict[str, Any] = {
            "type": "heatmap", "x": cs, "y": rs, "z": [flat[i * MAP_GRID : (i + 1) * MAP_GRID] for i in range(MAP_GRID)],
            "colorscale": scale, "colorbar": {"thickness": 12},
            "hovertemplate": "c %{x:.3g} mg/mL, Q_c/Q_d %{y:.3g}: %{z:.3g}<extra></extra>", "name": title,
        }  # fmt: skip
        if zrange:
            heat["zmin"], heat["zmax"] = zrange
        traces = [heat]
        if key == "diameter":  # where the model expects each target's size: a labelled contour per target
            traces += [
                {
                    "type": "contour", "x": cs, "y": rs, "z": heat["z"], "name": f"{t.diameter_nm:g} nm",
                    "contours": {"start": t.diameter_nm, "end": t.diameter_nm, "size": 1, "coloring": "lines",
                                 "showlabels": True, "labelfont": {"color": "white", "size": 11}},
                    "colorscale": [[0, "white"], [1, "white"]], "showscale": False,
                    "line": {"width": 2, "dash": "dash"}, "hoverinfo": "skip",
                }
                for t in campaign.spec.targets
            ]  # fmt: skip
        traces += [
            {
                "type": "scatter", "mode": "markers", "name": "measured run",
                "x": [r.experiment.settings.get("concentration_mg_ml") for r in done],
                "y": [r.experiment.settings.get("flow_ratio") for r in done], "text": [r.id for r in done],
                "marker": {"color": "white", "size": 7, "line": {"color": "black", "width": 1}},
                "hovertemplate": "%{text}<extra></extra>",
            },
            {
                "type": "scatter", "mode": "markers", "name": "failed run",
                "x": [r.experiment.settings.get("concentration_mg_ml") for r in failed],
                "y": [r.experiment.settings.get("flow_ratio") for r in failed], "text": [r.id for r in failed],
                "marker": {"color": RED, "size": 9, "symbol": "x"}, "hovertemplate": "%{text} failed<extra></extra>",
            },
        ]  # fmt: skip
        layout = _layout(
            f"{title} at {temperature_c:g} °C",
            xaxis={"title": {"text": "NC concentration (mg/mL)"}, "type": "log"},
            yaxis={"title": {"text": "flow-rate ratio Q_c/Q_d"}, "type": "log"},
            height=340,
            showlegend=False,
        )
        figures[key] = {"data": traces, "layout": layout}
    return figures


def preview(campaign: Campaign, rows: list[Row], n: int = 1) -> list[dict[str, Any]]:
    """The next ``n`` suggestions with their predictions, computed but not recorded."""
    pairs = campaign.propose(n, [r.experiment for r in rows])
    return [{"settings": s, "prediction": p} for s, p in pairs]
