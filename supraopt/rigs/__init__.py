"""Rig adapters and how a campaign loads one from its ``[rig]`` table.

Built in: ``simulated`` (the digital twin, :mod:`supraopt.rigs.simulated`), ``manual`` (a person runs
the experiments, :mod:`supraopt.rigs.manual`) and ``http`` (a rig behind a web API). Any other class
with the four methods of :class:`Rig` is named as ``"module:Class"`` (e.g. ``"truthrig:TruthRig"`` for class
``TruthRig`` in ``truthrig.py``, found in the working folder, the campaign folder or installed packages).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

from supraopt.errors import SpecError
from supraopt.rigs.base import Rig
from supraopt.rigs.manual import ManualRig
from supraopt.rigs.runbook import RunBook
from supraopt.rigs.simulated import SimulatedRig, World
from supraopt.spec import SPEC_FILE, load_spec, resolve_model

__all__ = ["ManualRig", "Rig", "RunBook", "SimulatedRig", "World", "load_rig"]

SIMULATED_STATE_FILE = "simulated-rig-state.json"
"""Where older versions kept the twin's runs; still used (converted to a run book) when present."""
RIG_STATE_DIR = "rig-state"
"""The state folder given to adapters (``state_dir``), inside the campaign folder."""
_METHODS = ("limits", "submit", "poll", "cancel")


def load_rig(adapter: str, options: dict[str, Any], campaign_dir: Path) -> Rig:
    """Build the rig named by ``adapter`` with ``options`` (the ``[rig.options]`` table).

    An adapter whose constructor has a ``state_dir`` parameter gets ``<campaign_dir>/rig-state``
    (unless the options name one): the folder for its durable state, e.g. a :class:`RunBook`.
    ``simulated`` keeps its runs there (or in an older campaign's ``simulated-rig-state.json``)
    unless ``state_path`` is given, and simulates the campaign's ``model`` unless ``preset`` is given;
    ``manual`` works in ``campaign_dir``. Every problem is a :class:`SpecError` naming the adapter.
    """
    options = dict(options)
    campaign_dir = Path(campaign_dir)
    if adapter == "simulated":
        if (campaign_dir / SIMULATED_STATE_FILE).exists():
            options.setdefault("state_path", str(campaign_dir / SIMULATED_STATE_FILE))
        if "preset" not in options and (campaign_dir / SPEC_FILE).is_file():
            options["preset"] = resolve_model(load_spec(campaign_dir).model, campaign_dir)
        cls: Any = SimulatedRig
    elif adapter == "manual":
        options["directory"] = campaign_dir
        cls = ManualRig
    elif adapter == "http":
        # ids (E001, ...) are unique within a campaign only; a rig server may serve several campaigns
        options.setdefault("id_prefix", campaign_prefix(campaign_dir))
        cls = _import_class(adapter, "supraopt.rigs.http", "HttpRig")
    elif adapter == "sila2":  # a SiLA 2 server (supraopt.rigs.sila2); relative certificate paths start at the campaign
        options.setdefault("id_prefix", campaign_prefix(campaign_dir))
        options.setdefault("base_dir", str(campaign_dir))
        cls = _import_class(adapter, "supraopt.rigs.sila2.client", "Sila2Rig")
    elif adapter.count(":") == 1 and all(part.strip() for part in adapter.split(":")):
        _extend_import_path(campaign_dir)
        module_name, class_name = adapter.split(":")
        cls = _import_class(adapter, module_name, class_name, searched=_adapter_folders(campaign_dir))
    else:
        module, dot, name = adapter.rpartition(".")
        hint = f" (did you mean '{module}:{name}'?)" if dot and module and name and ":" not in adapter else ""
        raise SpecError(f"unknown rig adapter {adapter!r}{hint}: use 'simulated', 'manual', 'http' or 'module:Class'.")
    if "state_dir" not in options and _takes_state_dir(cls):
        options["state_dir"] = str(campaign_dir / RIG_STATE_DIR)
    try:
        rig = cls(**options)
    except Exception as error:  # a third-party constructor may raise anything
        raise SpecError(f"rig adapter {adapter!r} rejected its options {options!r}: {_clause(error)}.") from error
    missing = [name for name in _METHODS if not callable(getattr(rig, name, None))]
    if missing:
        raise SpecError(f"rig adapter {adapter!r} is not a rig: it lacks {', '.join(f'{name}()' for name in missing)}.")
    return rig


def _takes_state_dir(cls: Any) -> bool:
    """Whether the adapter's constructor names a ``state_dir`` parameter (``**options`` alone does not count)."""
    try:
        parameter = inspect.signature(cls).parameters.get("state_dir")
    except (TypeError, ValueError):  # no signature to read (a builtin, say)
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def campaign_prefix(campaign_dir: Path) -> str:
    """A stable, campaign-specific prefix for experiment ids sent to a shared rig: ``NAME-1a2b3c-``."""
    resolved = Path(campaign_dir).resolve()
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", resolved.name).strip("._-")[:24] or "campaign"
    return f"{name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:6]}-"


def _extend_import_path(campaign_dir: Path) -> None:
    """Let ``module:Class`` name a module in the working folder or the campaign folder.

    Appended, not prepended, so an installed package of the same name wins.
    """
    for folder in _adapter_folders(campaign_dir):
        if str(folder) not in sys.path:
            sys.path.append(str(folder))


def _adapter_folders(campaign_dir: Path) -> tuple[Path, ...]:
    return tuple(dict.fromkeys((Path.cwd(), Path(campaign_dir).resolve())))


def adapter_origin(rig: object) -> str:
    """Where a rig's class was loaded from (a file path, or the module name when it has no file)."""
    import inspect

    try:
        return inspect.getfile(type(rig))
    except TypeError:  # built-in or dynamically made class
        return type(rig).__module__


def _import_class(adapter: str, module_name: str, class_name: str, searched: tuple[Path, ...] = ()) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name + ".").startswith(error.name + "."):
            where = "".join(f"{folder}, " for folder in searched)
            looked = f" (looked in {where}and the installed packages)" if searched else ""
            raise SpecError(f"rig adapter {adapter!r}: module {module_name!r} not found{looked}.") from error
        raise SpecError(f"rig adapter {adapter!r}: importing {module_name!r} failed: {_clause(error)}.") from error
    except Exception as error:  # whatever the module raises while it loads
        raise SpecError(f"rig adapter {adapter!r}: importing {module_name!r} failed: {_clause(error)}.") from error
    cls = getattr(module, class_name, None)
    if not callable(cls):
        raise SpecError(f"rig adapter {adapter!r}: module {module_name!r} has no class {class_name!r}.")
    return cls


def _clause(error: BaseException) -> str:
    """An exception's message as a clause for a one-sentence error."""
    return (str(error).strip().rstrip(".") or type(error).__name__).replace("\n", " ")
