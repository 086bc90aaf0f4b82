"""What the dashboard shows, read from campaign folders: no torch, no HTML.

A :class:`Board` holds the campaigns given on the command line, each a :class:`Watched` folder (its
spec and ledger, opened once). Everything here is cheap enough to run on every page view: one ledger
query per campaign, the tail of ``run.log`` and a few stats.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from supraopt.errors import LedgerError, SpecError
from supraopt.ledger import OPEN, Experiment, Ledger, Status, holds_ledger
from supraopt.recipe import target_states
from supraopt.records import PARAMETERS
from supraopt.spec import CampaignSpec, Target, load_spec, parse_spec

RUN_LOG = "run.log"  # the closed-loop runner's log (supraopt.loop.runner.RUN_LOG; not imported: it pulls torch)
RUNNING_WITHIN_S = 120.0
"""A campaign whose run.log was written this recently (or with experiments dispatched/running) is 'running'."""
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 64_000


def miss_distance(target: Target, diameter_nm: float, pdi_pct: float) -> float:
    """How far a result is from the target in tolerance units (a hit is <= 1); as in supraopt.campaign."""
    return max(abs(diameter_nm / target.diameter_nm - 1.0) / target.tolerance, pdi_pct / target.pdi_max_pct)


@dataclass
class Watched:
    """One campaign folder the dashboard serves, under a short ``slug`` used in URLs."""

    slug: str
    directory: Path | None
    """The campaign folder; None for a campaign watched through its ledger alone (``--ledger-url``)."""
    spec: CampaignSpec
    ledger: Ledger

    @classmethod
    def open(cls, directory: Path, slug: str) -> Watched:
        spec = load_spec(directory)
        url = spec.ledger_url or f"sqlite:///{(directory / 'ledger.sqlite').resolve()}"
        return cls(slug, directory, spec, Ledger(url))

    @classmethod
    def open_url(cls, url: str, slug: str) -> Watched:
        """A campaign shared through a database (PostgreSQL): the spec comes from the copy in its ledger."""
        import tomllib

        where = scrub(url, None)
        _require_ledger(url, where)
        ledger = Ledger(url)
        try:
            text = ledger.shared_spec()
            if text is None:
                raise SpecError(
                    f"the ledger at {where} holds no copy of its campaign.toml; run any supraopt command "
                    "(e.g. 'supraopt status DIR') on the campaign folder whose ledger_url names it, then try again."
                )
            spec = parse_spec(tomllib.loads(text), f"the campaign.toml kept in {where}")
        except BaseException:
            ledger.close()
            raise
        return cls(slug, None, spec, ledger)

    @property
    def name(self) -> str:
        return self.spec.name

    def log_stat(self) -> os.stat_result | None:
        if self.directory is None:
            return None  # run.log stays on the machine that runs the campaign
        try:
            return (self.directory / RUN_LOG).stat()
        except OSError:
            return None

    def version(self) -> str:
        """Changes with every ledger write and every line appended to run.log."""
        stat = self.log_stat()
        log = f"{stat.st_mtime_ns}.{stat.st_size}" if stat else "0"
        return f"{self.ledger.version()}-{log}"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last ``lines`` lines of run.log (empty when the campaign never ran in a loop)."""
        if self.directory is None:
            return []
        try:
            with open(self.directory / RUN_LOG, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - LOG_TAIL_BYTES))
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        return [scrub(line, self.directory) for line in text.splitlines()[-lines:]]

    def close(self) -> None:
        self.ledger.close()


def _require_ledger(url: str, where: str) -> None:
    """Refuse a URL that names no supraopt ledger, before opening it would create one (an empty file, tables)."""
    try:
        found = holds_ledger(url)
    except LedgerError as error:
        raise SpecError(f"--ledger-url {where}: {scrub(str(error), None)}") from None
    if not found:
        raise SpecError(f"--ledger-url {where} holds no supraopt ledger; check the URL (and the schema).")


def scrub(text: str, directory: Path | None) -> str:
    """``text`` without the absolute location of the campaign folder (nor of the home folder, nor a password)."""
    places = [] if directory is None else [str(directory.resolve()), str(directory.absolute())]
    for path in sorted(set(places), key=len, reverse=True):
        assert directory is not None
        text = text.replace(f"sqlite:///{path}/", "").replace(path + os.sep, "").replace(path, directory.name)
    home = str(Path.home())
    if len(home) > 1:
        text = text.replace(home, "~")
    return re.sub(r"(postgresql\S*://)[^@\s/]*@", r"\1***@", text)


@dataclass(frozen=True)
class Row:
    """One experiment as the table shows it."""

    number: int
    experiment: Experiment
    distance: float | None
    """Miss distance of the measured result to the nearest target (tolerance units; <= 1 is a hit)."""
    hit: bool
    context: dict[str, float] = field(default_factory=dict)
    hits: tuple[float, ...] = ()
    """Sizes (nm) of the targets this run hits."""

    @property
    def id(self) -> str:
        return self.experiment.id


@dataclass(frozen=True)
class TargetView:
    """One target's row: where it stands, from the ledger alone (no model)."""

    target: Target
    verdict: str
    """'not hit', 'hit', 'hit, not confirmed' or 'confirmed' (by clean repeats; ``supraopt recipe``
    adds the model's word)."""
    done: bool
    first_hit: str | None
    """The hit whose result was recorded first (the ledger's record order)."""
    best: Row | None
    """The measured run closest to this target."""
    distance: float | None
    """The best run's miss distance to this target."""


@dataclass(frozen=True)
class Summary:
    """A campaign at a glance: the overview's row and the campaign page's header."""

    slug: str
    name: str
    target: Target
    counts: dict[str, int]
    total: int
    finished: int
    budget: int
    best: Row | None
    hit: bool
    state: str
    """'running', 'waiting for results' (open experiments, nothing running) or 'idle'."""
    last_activity: datetime | None
    version: str
    targets: tuple[TargetView, ...] = ()
    """Every target, in the spec's order."""

    @property
    def hits(self) -> int:
        """Targets done (hit, and confirmed by repeats when asked)."""
        return sum(t.done for t in self.targets)


@dataclass(frozen=True)
class Page:
    summary: Summary
    rows: list[Row]
    context_names: list[str]
    log: list[str]


def rows_of(watched: Watched, experiments: list[Experiment]) -> list[Row]:
    targets = watched.spec.targets
    rows = []
    for number, e in enumerate(experiments, start=1):
        m = e.measurement if e.status is Status.DONE else None
        distance = min(miss_distance(t, m.diameter_nm, m.pdi_pct) for t in targets) if m is not None else None
        hits = tuple(t.diameter_nm for t in targets if m is not None and t.is_hit(m.diameter_nm, m.pdi_pct))
        context = {k: v for k, v in e.settings.items() if k not in PARAMETERS}
        context |= getattr(e, "context", None) or {}
        rows.append(Row(number, e, distance, bool(hits), context, hits))
    return rows


def target_views(watched: Watched, rows: list[Row], order: dict[str, int]) -> tuple[TargetView, ...]:
    """Each target's verdict, first hit (``order``: experiment id -> record seq) and closest run."""
    by_id = {r.id: r for r in rows}
    views = []
    for state in target_states(watched.spec.targets, [r.experiment for r in rows]):
        t = state.target
        first = min(state.hit_runs, key=lambda i: order.get(i, math.inf), default=None)
        best = by_id.get(state.best.id) if state.best is not None else None
        m = best.experiment.measurement if best is not None else None
        distance = miss_distance(t, m.diameter_nm, m.pdi_pct) if m is not None else None
        views.append(TargetView(t, state.verdict, state.done, first, best, distance))
    return tuple(views)


def summarise(watched: Watched, rows: list[Row], version: str, now: datetime | None = None) -> Summary:
    now = now or datetime.now(UTC)
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r.experiment.status)] = counts.get(str(r.experiment.status), 0) + 1
    measured = [r for r in rows if r.distance is not None]
    best = min(measured, key=lambda r: r.distance or 0.0, default=None)
    stat = watched.log_stat()
    times = [r.experiment.updated_at for r in rows]
    if stat is not None:
        times.append(datetime.fromtimestamp(stat.st_mtime, UTC))
    last = max(times, default=None)
    in_flight = any(r.experiment.status in (Status.DISPATCHED, Status.RUNNING) for r in rows)
    log_fresh = stat is not None and now.timestamp() - stat.st_mtime < RUNNING_WITHIN_S
    if in_flight or log_fresh:
        state = "running"
    elif any(r.experiment.status in OPEN for r in rows):
        state = "waiting for results"
    else:
        state = "idle"
    finished = sum(1 for r in rows if r.experiment.status in (Status.DONE, Status.FAILED))
    targets = target_views(watched, rows, watched.ledger.result_order())
    return Summary(
        watched.slug,
        watched.name,
        watched.spec.target,
        counts,
        len(rows),
        finished,
        watched.spec.loop.budget,
        best,
        all(t.done for t in targets),
        state,
        last,
        version,
        targets,
    )


def page(watched: Watched) -> Page:
    version = watched.version()  # before reading: a write in between shows on the next poll, never lost
    rows = rows_of(watched, watched.ledger.experiments())
    names = list(dict.fromkeys(name for r in rows for name in r.context))
    return Page(summarise(watched, rows, version), rows, names, watched.log_tail())


def slugs_for(names: list[str]) -> list[str]:
    """A URL-safe, unique short name per campaign (its folder's or its own name), numbered when two share it."""
    slugs: list[str] = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "campaign"
        slug, k = base, 2
        while slug in slugs:
            slug, k = f"{base}-{k}", k + 1
        slugs.append(slug)
    return slugs


class Board:
    """The campaigns one dashboard serves: campaign folders, and campaigns known by their ledger's URL only."""

    def __init__(self, directories: list[Path], ledger_urls: list[str] | None = None) -> None:
        urls = list(ledger_urls or [])
        if not directories and not urls:
            raise SpecError(
                "give at least one campaign folder, e.g. 'supraopt dashboard campaigns/my-450', or --ledger-url URL."
            )
        self.campaigns: dict[str, Watched] = {}
        opened: list[Watched] = []
        try:
            for directory in directories:
                opened.append(Watched.open(Path(directory), ""))
            for url in urls:
                opened.append(Watched.open_url(url, ""))
        except BaseException:
            for watched in opened:
                watched.close()
            raise
        names = [w.directory.resolve().name if w.directory is not None else w.name for w in opened]
        for watched, slug in zip(opened, slugs_for(names), strict=True):
            watched.slug = slug
            self.campaigns[slug] = watched

    def get(self, slug: str) -> Watched | None:
        return self.campaigns.get(slug)

    def versions(self) -> dict[str, str]:
        return {slug: w.version() for slug, w in self.campaigns.items()}

    def close(self) -> None:
        for watched in self.campaigns.values():
            watched.close()


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
