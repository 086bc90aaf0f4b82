"""The search space: parameter names, bounds and units; settings <-> double tensors <-> unit cube.

Concentration and flow ratio act multiplicatively on size (mass balance, droplet law), so they are
scaled on a log axis; temperature on a linear one. The unit cube is what the GPs see.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

from supraopt.errors import InputError
from supraopt.records import PARAMETERS, UNITS

LOG_SCALED = frozenset({"concentration_mg_ml", "flow_ratio"})
DECIMALS = {"concentration_mg_ml": 3, "flow_ratio": 2, "temperature_c": 1}
"""Rounding of proposed settings: finer than any pump, balance or thermostat resolves."""


class SearchSpace:
    """Bounds of the three controls and the maps between physical values and the unit cube."""

    def __init__(self, bounds: Mapping[str, tuple[float, float]]) -> None:
        self.bounds = {name: (float(bounds[name][0]), float(bounds[name][1])) for name in PARAMETERS}

    @cached_property
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Low end, width and log flags as tensors, made on first use: validation needs no torch."""
        import torch

        lows, highs = [], []
        for name in PARAMETERS:
            low, high = self.bounds[name]
            if name in LOG_SCALED:
                low, high = math.log(low), math.log(high)
            lows.append(low)
            highs.append(high)
        low_t = torch.tensor(lows, dtype=torch.double)
        width = torch.tensor(highs, dtype=torch.double) - low_t
        return (
            low_t,
            torch.where(width > 0, width, torch.ones_like(width)),
            torch.tensor([name in LOG_SCALED for name in PARAMETERS]),
        )

    @property
    def dim(self) -> int:
        return len(PARAMETERS)

    def to_unit(self, x: Tensor) -> Tensor:
        """Map a `... x 3` tensor of physical settings to the unit cube."""
        import torch

        low, width, log = self._tensors
        warped = torch.where(log, torch.log(x.clamp_min(1e-300)), x)
        return (warped - low) / width

    def from_unit(self, z: Tensor) -> Tensor:
        """Map a `... x 3` tensor of unit-cube points back to physical settings."""
        import torch

        low, width, log = self._tensors
        warped = low + z * width
        return torch.where(log, torch.exp(warped), warped)

    def tensor(self, settings: Sequence[Mapping[str, float]]) -> Tensor:
        """Stack settings dicts into an `n x 3` double tensor (physical units)."""
        import torch

        return torch.tensor([[float(s[name]) for name in PARAMETERS] for s in settings], dtype=torch.double).reshape(
            -1, self.dim
        )

    def settings(self, x: Tensor) -> list[dict[str, float]]:
        """Turn an `n x 3` physical tensor into rounded settings dicts, clamped to the bounds."""
        rows = []
        for row in x.detach().reshape(-1, self.dim).tolist():
            setting = {}
            for name, value in zip(PARAMETERS, row, strict=True):
                low, high = self.bounds[name]
                setting[name] = min(max(round(value, DECIMALS[name]), low), high)
            rows.append(setting)
        return rows

    def validate(self, settings: Mapping[str, object], where: str = "settings") -> dict[str, float]:
        """Check one settings dict: every parameter present, a finite number, inside the bounds."""
        clean = {}
        for name in PARAMETERS:
            if name not in settings:
                raise InputError(f"{where}: {name} is missing.")
            raw = settings[name]
            try:
                value = float(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise InputError(f"{where}: {name}={raw!r} is not a number.") from None
            low, high = self.bounds[name]
            if not math.isfinite(value) or not low <= value <= high:
                raise InputError(f"{where}: {name}={value} is outside the bounds [{low:g}, {high:g}] {UNITS[name]}.")
            clean[name] = value
        return clean
