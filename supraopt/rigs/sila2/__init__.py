"""SiLA 2 on both ends of the rig link: the SupraparticleSynthesis feature, its server and its client.

SiLA 2 is the lab-automation standard (gRPC plus XML feature definitions): schedulers and
orchestrators call SiLA 2 devices, and pump and thermostat vendors ship SiLA 2 servers.

* :mod:`supraopt.rigs.sila2.server`: ``supraopt rig serve --protocol sila2`` puts any rig adapter
  behind a SiLA 2 server implementing the feature below, with the guarantees of the HTTP server.
* :mod:`supraopt.rigs.sila2.client`: ``adapter = "sila2"`` in ``campaign.toml``, the rig adapter
  that drives such a server.
* ``SupraparticleSynthesis.sila.xml`` (next to this file): the Feature Definition. An observable
  command ``RunExperiment`` (id, settings; intermediate responses queued/running; a measurement, or
  the defined execution error ``ChemistryFailed`` with its reason) for lab schedulers;
  ``SubmitExperiment``, ``GetRun`` and ``CancelRun`` by id (what supraopt's client uses); and the
  properties ``RigLimits`` and ``RigContext``.

The SiLA 2 library (PyPI ``sila2``, the SiLA consortium's Python implementation) is an optional extra,
``pip install 'supraopt[sila2]'``; it is imported only when a SiLA 2 server or client is built, so
this package imports without it (and never imports torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from supraopt.errors import InputError

FEATURE_FILE = Path(__file__).with_name("SupraparticleSynthesis.sila.xml")
FEATURE_ID = "SupraparticleSynthesis"

SETTING_FIELDS: dict[str, str] = {
    "concentration_mg_ml": "ConcentrationMgMl",
    "flow_ratio": "FlowRatio",
    "temperature_c": "TemperatureC",
}
"""supraopt parameter name -> field of the feature's Settings structure (same unit)."""

INSTALL_HINT = "install the SiLA 2 extra: pip install 'supraopt[sila2]'"


def feature_definition() -> str:
    """The text of ``SupraparticleSynthesis.sila.xml``."""
    return FEATURE_FILE.read_text(encoding="utf-8")


def load_feature() -> Any:
    """The feature as a ``sila2.framework.Feature`` (imports the SiLA 2 library)."""
    require_sila2()
    from sila2.framework import Feature

    return Feature(feature_definition())


def require_sila2() -> None:
    """Raise a one-line :class:`InputError` when the SiLA 2 library is not installed."""
    try:
        import sila2  # noqa: F401
    except ImportError as error:
        raise InputError(f"SiLA 2 needs the 'sila2' package ({error}): {INSTALL_HINT}.") from None


__all__ = ["FEATURE_FILE", "FEATURE_ID", "SETTING_FIELDS", "feature_definition", "load_feature", "require_sila2"]
