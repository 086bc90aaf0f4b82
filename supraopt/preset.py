"""A physics preset (``models/*.toml``): constants, rig envelope, known window and parameter priors.

Plain data, read without torch so that commands which fit nothing (``status``, ``export``, ``record``,
``init``) start quickly; :mod:`supraopt.physics` re-exports everything here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from supraopt.errors import SpecError
from supraopt.records import PARAMETERS
from supraopt.spec import preset_path, read_toml

if TYPE_CHECKING:
    from torch import Tensor

SIZE_PARAMETERS: tuple[str, ...] = (
    "log_droplet_k",
    "droplet_exponent_a",
    "droplet_temp_per_10c",
    "log_phi_inorg",
    "exponent_delta",
    "packing_temp_per_10c",
)
PDI_PARAMETERS: tuple[str, ...] = (
    "log_cv_drop_pct",
    "log_cv_drop_r_opt",
    "log_cv_drop_kappa",
    "log_cv_process_pct",
    "process_temp_slope",
    "process_temp_curvature",
    "process_conc_slope",
)
DROPLET_PARAMETERS = SIZE_PARAMETERS[:3]


@dataclass(frozen=True)
class Preset:
    """A material system on a device: constants, rig envelope, known window and parameter priors."""

    name: str
    description: str
    density_g_cm3: float
    nozzle_um: float
    reference_concentration_mg_ml: float
    reference_flow_ratio: float
    reference_temperature_c: float
    bounds: dict[str, tuple[float, float]]
    window_mg_ml: tuple[float, float]
    """Known concentration window (low edge: hollow SPs, high edge: unstable droplets)."""
    window_log_sd: float
    """Prior sd of each edge's natural log: how far another rig may move it."""
    priors: dict[str, tuple[float, float]]
    """Parameter name -> (mean, sd) of its normal prior."""
    measured: frozenset[str] = frozenset()
    """Parameters whose prior is a posterior from this data's own droplet measurements (a two-stage fit):
    the physics GP's learned inflation does not widen them (see :class:`~supraopt.surrogate.PhysicsKernel`)."""

    @classmethod
    def load(cls, model: str) -> Preset:
        """Read and validate a preset by name (``models/NAME.toml``) or path."""
        path = preset_path(model)
        data = read_toml(path)
        try:
            constants, window = data["constants"], data["window"]
            priors = {name: (float(data["priors"][name][0]), float(data["priors"][name][1])) for name in _ALL}
            preset = cls(
                name=str(data.get("name", path.stem)),
                description=str(data.get("description", "")),
                density_g_cm3=float(constants["density_g_cm3"]),
                nozzle_um=float(constants["nozzle_um"]),
                reference_concentration_mg_ml=float(constants["reference_concentration_mg_ml"]),
                reference_flow_ratio=float(constants["reference_flow_ratio"]),
                reference_temperature_c=float(constants["reference_temperature_c"]),
                bounds={name: (float(data["bounds"][name][0]), float(data["bounds"][name][1])) for name in PARAMETERS},
                window_mg_ml=(float(window["concentration_low_mg_ml"]), float(window["concentration_high_mg_ml"])),
                window_log_sd=float(window["log_sd"]),
                priors=priors,
            )
        except KeyError as missing:
            raise SpecError(f"preset {path}: missing key {missing.args[0]!r}.") from None
        except (TypeError, ValueError, IndexError) as error:
            raise SpecError(f"preset {path}: malformed value ({error}).") from None
        for name, (_, sd) in preset.priors.items():
            if not sd > 0:
                raise SpecError(f"preset {path}: prior sd of {name}={sd} must be positive.")
        return preset

    def prior(self, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """Prior mean and sd vectors (double) for the given parameter names."""
        import torch

        mean = torch.tensor([self.priors[n][0] for n in names], dtype=torch.double)
        sd = torch.tensor([self.priors[n][1] for n in names], dtype=torch.double)
        return mean, sd

    def with_priors(self, updates: dict[str, tuple[float, float]], measured: bool = False) -> Preset:
        """A copy whose priors are replaced where ``updates`` names them (used to seed campaigns);
        ``measured``: they are posteriors given this data's droplet sizes (see :attr:`measured`)."""
        pinned = self.measured | frozenset(updates) if measured else self.measured - frozenset(updates)
        return Preset(**{**self.__dict__, "priors": {**self.priors, **updates}, "measured": pinned})

    def inflatable(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Of ``names``, those whose prior the physics GP may widen (all but :attr:`measured`)."""
        return tuple(n for n in names if n not in self.measured)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_ALL = SIZE_PARAMETERS + PDI_PARAMETERS
