"""Pictures a chemist can read: cross-validated parity, residuals, maps of predicted size, PDI and
feasibility, and a campaign's convergence.

Every function returns a matplotlib :class:`~matplotlib.figure.Figure` on an Agg canvas (no pyplot,
no global state, no display needed) whose axes carry units, with a legend and a title;
:func:`write` saves figures as PNG files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from supraopt.fit import MODELS, CVResult, FitResult
from supraopt.ledger import Status
from supraopt.pastdata import CONTEXT_PREFIX
from supraopt.records import PARAMETERS
from supraopt.space import SearchSpace
from supraopt.surrogate import Feasibility, PhysicsGP

if TYPE_CHECKING:
    from supraopt.campaign import Campaign

AXIS = {
    "concentration_mg_ml": "NC concentration (mg/mL)",
    "flow_ratio": "flow-rate ratio $Q_c/Q_d$ (–)",
    "temperature_c": "temperature (°C)",
    "capillary_number": "capillary number Ca (–)",
    "orifice_width_um": "orifice width (µm)",
    CONTEXT_PREFIX + "aspect_ratio": "channel aspect ratio h/w (–)",  # read as a context (CONTEXT_FIELDS)
    "diameter_nm": "SP diameter (nm)",
    "pdi_pct": "polydispersity, CV (%)",
    "droplet_um": "droplet diameter (µm)",
}
"""Axis label, with its unit, of every column supraopt plots."""
LOG_AXES = frozenset(
    {"concentration_mg_ml", "flow_ratio", "capillary_number", "orifice_width_um", CONTEXT_PREFIX + "aspect_ratio"}
)
COLORS = {"physics only": "tab:blue", "GP only": "tab:gray", "physics + GP": "tab:red"}
GRID = 60
MAX_ERROR_BARS = 150
"""Parity panels draw interval bars for at most this many (seeded random) runs; more are a solid blob."""
NEAR_TEMPERATURE_C = 5.0
"""Maps at one temperature colour only runs within this many °C of it (or a tenth of the range, if wider)."""


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained", dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _log_axis(ax: Any, which: str) -> None:
    """A log axis labelled with plain numbers (2, 3, 5, 10, 20 ...), not 2×10⁰."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    low, high = (ax.get_xlim if which == "x" else ax.get_ylim)()
    decades = math.log10(max(high, 1e-300) / max(low, 1e-300))

    def minor(value: float, _: object) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
        return f"{value:g}" if decades < 2 and mantissa in (2, 3, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))
    if decades < 1:  # e.g. 75-175 µm: decade ticks would label one value at most
        ticks = [t for t in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high) if low <= t <= high]
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_minor_locator(NullLocator())


def _name(outcome: str) -> str:
    """'SP diameter (nm)' -> 'SP diameter'; the unit goes in separately."""
    return AXIS[outcome].rsplit(" (", 1)[0]


def parity(cv: CVResult, outcome: str) -> Figure:
    """Predicted vs measured, one panel per model, with 90 % predictive intervals as error bars."""
    data = cv.predictions[cv.predictions["outcome"] == outcome]
    unit = AXIS[outcome].rsplit("(", 1)[1].rstrip(")")
    low = float(min(data["measured"].min(), data["lower90"].min()))
    high = float(max(data["measured"].max(), data["upper90"].max()))
    log = high / max(low, 1e-12) > 5
    figure = _figure(15, 5.2)
    axes = figure.subplots(1, len(MODELS), sharex=True, sharey=True)
    for ax, model in zip(axes, MODELS, strict=True):
        g = data[data["model"] == model]
        rmse = float(np.sqrt(((g["predicted"] - g["measured"]) ** 2).mean()))
        inside = float(((g["measured"] >= g["lower90"]) & (g["measured"] <= g["upper90"])).mean())
        many = len(g) > MAX_ERROR_BARS
        shown = g.sample(MAX_ERROR_BARS, random_state=0) if many else g
        bars = np.vstack([shown["predicted"] - shown["lower90"], shown["upper90"] - shown["predicted"]])
        ax.errorbar(
            shown["measured"], shown["predicted"], yerr=bars, fmt="o", ms=3.5, color=COLORS[model],
            ecolor=COLORS[model], elinewidth=0.7, alpha=0.75,
            label=f"{model}: RMSE {rmse:.3g} {unit}, {inside:.0%} of runs in the 90 % interval"
            + (f" (bars on {MAX_ERROR_BARS} random runs)" if many else ""),
        )  # fmt: skip
        if many:  # every run as a small dot, the bars on a sample only
            ax.scatter(g["measured"], g["predicted"], s=4, color=COLORS[model], alpha=0.3, lw=0, gid="all-runs")
        ax.plot([low, high], [low, high], color="black", lw=1, ls="--", label="predicted = measured")
        if log:
            _log_axis(ax, "x")
            _log_axis(ax, "y")
        ax.set_xlabel(f"measured {AXIS[outcome]}")
        ax.set_ylabel(f"predicted {AXIS[outcome]}")
        ax.set_title(model)
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    figure.suptitle(
        f"{cv.stage.capitalize()} stage, {_name(outcome)}: {cv.folds}-fold cross-validated predictions "
        "(each run predicted by a model that never saw it; bars: 90 % predictive interval)"
    )
    return figure


def residuals(cv: CVResult, outcome: str) -> Figure:
    """Cross-validated residual (measured / predicted - 1, %) against each input of the stage."""
    data = cv.predictions[cv.predictions["outcome"] == outcome]
    inputs = [c for c in AXIS if c in data.columns and c not in {"diameter_nm", "pdi_pct", "droplet_um"}]
    figure = _figure(4.6 * len(inputs), 4.4)
    axes = np.atleast_1d(figure.subplots(1, len(inputs), sharey=True))
    for ax, column in zip(axes, inputs, strict=True):
        for model in ("physics only", "physics + GP"):
            g = data[data["model"] == model]
            ax.scatter(
                g[column], (g["measured"] / g["predicted"] - 1) * 100, s=14, alpha=0.7, color=COLORS[model], label=model
            )
        ax.axhline(0, color="black", lw=1)
        if column in LOG_AXES:
            _log_axis(ax, "x")
        ax.set_xlabel(AXIS[column])
        ax.set_title(f"vs {_name(column)}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"residual of {_name(outcome)}, measured / predicted − 1 (%)")
    axes[0].legend(loc="best", fontsize=8)
    figure.suptitle(
        f"{cv.stage.capitalize()} stage: cross-validated residuals of {_name(outcome)} (a trend = physics missing)"
    )
    return figure


def _padded(low: float, high: float, pad: float = 0.04) -> np.ndarray:
    """A log grid over [low, high] widened by ``pad`` of its width each side, so edge points show whole."""
    span = math.log(high / low) if high > low else 0.2
    return np.geomspace(low * math.exp(-pad * span), high * math.exp(pad * span), GRID)


def maps(
    space: SearchSpace,
    size: PhysicsGP,
    pdi: PhysicsGP | None,
    feasibility: Feasibility | None,
    runs: pd.DataFrame,
    temperature_c: float,
    title: str,
) -> Figure:
    """Predicted SP diameter, PDI and P(usable SPs) over concentration x flow ratio at one temperature.

    ``runs`` has the columns of :data:`~supraopt.records.PARAMETERS`, ``diameter_nm``, ``pdi_pct``
    (optional) and ``failed`` (a reason, '' for a run that gave SPs); all runs are overlaid.
    """
    c = _padded(*space.bounds["concentration_mg_ml"])
    r = _padded(*space.bounds["flow_ratio"])
    cc, rr = np.meshgrid(c, r)
    x = torch.tensor(np.stack([cc.ravel(), rr.ravel(), np.full(cc.size, temperature_c)], -1), dtype=torch.double)
    z = space.to_unit(x)
    panels: list[tuple[str, str, np.ndarray, str]] = []
    with torch.no_grad():
        panels.append(("diameter_nm", "predicted SP diameter (nm)", torch.exp(size.moments(z)[0]).numpy(), "viridis"))
        if pdi is not None:
            panels.append(
                ("pdi_pct", "predicted polydispersity, CV (%)", torch.exp(pdi.moments(z)[0]).numpy(), "magma_r")
            )
        if feasibility is not None:
            panels.append(("feasible", "P(run gives usable SPs)", feasibility.prob(z).numpy(), "RdYlGn"))
    low_t, high_t = space.bounds["temperature_c"]
    near_c = max(NEAR_TEMPERATURE_C, 0.1 * (high_t - low_t))
    near = (runs["temperature_c"] - temperature_c).abs() <= near_c
    far = runs[~near]
    runs = runs[near]
    ok = runs[runs["failed"] == ""]
    failed = runs[runs["failed"] != ""]
    figure = _figure(5.6 * len(panels), 5.0)
    axes = np.atleast_1d(figure.subplots(1, len(panels)))
    for ax, (column, label, values, cmap) in zip(axes, panels, strict=True):
        grid = values.reshape(cc.shape)
        levels = np.linspace(0, 1, 11) if column == "feasible" else 14
        filled = ax.contourf(cc, rr, grid, levels=levels, cmap=cmap)
        figure.colorbar(filled, ax=ax, label=label)
        handles: list[Any] = []
        if column == "feasible":
            lines = ax.contour(cc, rr, grid, levels=[0.5], colors="black", linewidths=1.2)
            ax.clabel(lines, fmt="P = %.1f", fontsize=8)
            ax.scatter(ok["concentration_mg_ml"], ok["flow_ratio"], s=22, c="white", edgecolors="black", lw=0.7)
            handles.append(Line2D([], [], marker="o", ls="", mfc="white", mec="black", label="run gave SPs"))
        elif column in ok:
            ax.scatter(
                ok["concentration_mg_ml"], ok["flow_ratio"], c=ok[column], s=26, cmap=cmap, norm=filled.norm,
                edgecolors="black", lw=0.7,
            )  # fmt: skip
            handles.append(
                Line2D([], [], marker="o", ls="", mfc="lightgray", mec="black", label="measured (fill: value)")
            )
        if len(failed):
            ax.scatter(failed["concentration_mg_ml"], failed["flow_ratio"], marker="x", s=40, c="red", lw=1.6)
            handles.append(Line2D([], [], marker="x", ls="", color="red", mew=1.6, label="failed run"))
        if len(far):  # their values belong to another temperature: position only, not coloured
            ax.scatter(
                far["concentration_mg_ml"], far["flow_ratio"], s=18, facecolors="none", edgecolors="dimgray",
                lw=0.8, alpha=0.7, gid="far-runs",
            )  # fmt: skip
            handles.append(
                Line2D(
                    [], [], marker="o", ls="", mfc="none", mec="dimgray", label=f"run > {near_c:g} °C away (any result)"
                )
            )
        _log_axis(ax, "x")
        _log_axis(ax, "y")
        ax.set_xlabel(AXIS["concentration_mg_ml"])
        ax.set_ylabel(AXIS["flow_ratio"])
        ax.set_title(label)
        if handles:  # below the panel, where it hides no run
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8)
    figure.suptitle(
        f"{title}: model maps at {temperature_c:.0f} °C (runs within ± {near_c:g} °C shown with their results, "
        "others as grey rings)"
    )
    return figure


def convergence(campaign: Campaign) -> Figure:
    """Distance to the target size and PDI against experiment number, the target band shaded."""
    state = campaign.status()
    target = state.target
    finished = [e for e in state.experiments if e.status in (Status.DONE, Status.FAILED)]
    figure = _figure(10, 7)
    top, bottom = figure.subplots(2, 1, sharex=True)
    band = 100 * target.tolerance
    top.axhspan(-band, band, color="tab:green", alpha=0.2, label=f"target band: {target.diameter_nm:g} nm ± {band:g} %")
    bottom.axhspan(
        0, target.pdi_max_pct, color="tab:green", alpha=0.2, label=f"PDI ceiling: ≤ {target.pdi_max_pct:g} %"
    )
    number = np.arange(1, len(finished) + 1)
    measured = [(i, e) for i, e in zip(number, finished, strict=True) if e.measurement is not None]
    predicted = [(i, e) for i, e in zip(number, finished, strict=True) if "diameter_nm" in e.prediction]
    if predicted:
        i_p = [i for i, _ in predicted]
        mean = np.array([e.prediction["diameter_nm"] for _, e in predicted])
        sd = np.array([e.prediction.get("diameter_sd_nm", 0.0) for _, e in predicted])
        top.errorbar(
            i_p, (mean / target.diameter_nm - 1) * 100, yerr=100 * sd / target.diameter_nm, fmt="o", mfc="none",
            color="tab:gray", ms=6, label="predicted before the run (± 1 sd)",
        )  # fmt: skip
    if measured:
        i_m = [i for i, _ in measured]
        d = np.array([e.measurement.diameter_nm for _, e in measured if e.measurement])
        cv = np.array([e.measurement.pdi_pct for _, e in measured if e.measurement])
        top.plot(i_m, (d / target.diameter_nm - 1) * 100, "o-", color="tab:blue", label="measured")
        bottom.plot(i_m, cv, "o-", color="tab:purple", label="measured")
    failed = [i for i, e in zip(number, finished, strict=True) if e.status is Status.FAILED]
    for k, i in enumerate(failed):
        for ax in (top, bottom):
            ax.axvline(i, color="red", ls=":", lw=1.2, label="failed run" if k == 0 else None)
    top.set_ylabel("measured / target − 1 (%)")
    top.set_title("Distance to the target size")
    bottom.set_ylabel(AXIS["pdi_pct"])
    bottom.set_xlabel("experiment number (–)")
    bottom.set_title("Polydispersity")
    for ax in (top, bottom):
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    if len(finished):
        bottom.set_xlim(0.5, len(finished) + 0.5)
    verdict = "target hit" if state.hit else "target not hit yet"
    figure.suptitle(f"Campaign {campaign.spec.name}: {len(finished)} experiments finished, {verdict}")
    return figure


def fit_figures(result: FitResult) -> dict[str, Figure]:
    """Every picture of a fit, by file stem: parity and residuals per stage and outcome, SP maps."""
    figures = {}
    for stage in result.stages():
        if stage.cv is not None:
            for outcome in stage.gps:
                figures[f"{stage.stage.name}_{outcome}_parity"] = parity(stage.cv, outcome)
                figures[f"{stage.stage.name}_{outcome}_residuals"] = residuals(stage.cv, outcome)
    space = result.sp.stage.space if result.sp is not None else None
    if result.sp is not None and isinstance(space, SearchSpace):  # with contexts the maps would need their values
        frame = result.runs.frame
        temperature = float(frame.loc[frame["failed"] == "", "temperature_c"].median())
        figures["supraparticle_maps"] = maps(
            space, result.sp.gps["diameter_nm"], result.sp.gps.get("pdi_pct"), result.feasibility, frame,
            temperature, f"Fit of {Path(result.runs.source).name}",
        )  # fmt: skip
    return figures


def campaign_figures(campaign: Campaign) -> dict[str, Figure]:
    """A campaign's convergence and the maps of its current model (refitted from the ledger)."""
    rows = []
    for e in campaign.ledger.experiments():
        if e.status is Status.DONE and e.measurement is not None:
            rows.append(
                {**e.settings, "diameter_nm": e.measurement.diameter_nm, "pdi_pct": e.measurement.pdi_pct, "failed": ""}
            )
        elif e.status is Status.FAILED:
            rows.append({**e.settings, "failed": e.failure.reason if e.failure else "failed"})
    runs = pd.DataFrame(rows, columns=[*PARAMETERS, "diameter_nm", "pdi_pct", "failed"])
    surrogates = campaign.fit()
    low, high = campaign.space.bounds["temperature_c"]
    done = runs.loc[runs["failed"] == "", "temperature_c"]
    temperature = float(done.median()) if len(done) else 0.5 * (low + high)
    return {
        "convergence": convergence(campaign),
        "maps": maps(
            campaign.space, surrogates.size, surrogates.pdi, surrogates.feasibility, runs, temperature,
            f"Campaign {campaign.spec.name}",
        ),
    }  # fmt: skip


def write(figures: Mapping[str, Figure], out: Path) -> list[Path]:
    """Save each figure as ``out/<name>.png``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in figures.items():
        path = out / f"{name}.png"
        figure.savefig(path)
        paths.append(path)
    return paths


__all__ = ["AXIS", "campaign_figures", "convergence", "fit_figures", "maps", "parity", "residuals", "write"]
