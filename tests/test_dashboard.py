"""The dashboard without a browser: pages, live parts, forms and their checks, token, CSRF, leaks."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _servers import serving

from supraopt.dashboard import TOKEN_ENV, load_token
from supraopt.dashboard.app import create_app
from supraopt.dashboard.bench import synthetic_campaign
from supraopt.dashboard.data import Board
from supraopt.errors import InputError, LedgerError
from supraopt.ledger import Ledger, Status
from supraopt.records import Measurement
from supraopt.spec import Target

TOKEN = "a-long-test-token-0123456789"


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_campaign(tmp_path_factory.mktemp("dash") / "trial-450", 12, open_runs=3, seed=1)


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    return synthetic_campaign(tmp_path / "fresh", 6, open_runs=2, seed=2)


def ledger_of(directory: Path) -> Ledger:
    return Ledger(f"sqlite:///{(directory / 'ledger.sqlite').resolve()}")


@pytest.fixture
def board(fresh: Path) -> Iterator[Board]:
    b = Board([fresh])
    yield b
    b.close()


@pytest.fixture
def client(board: Board) -> Iterator[httpx.Client]:
    with serving(create_app(board)) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no form on the page"
    return found.group(1)


def open_ids(directory: Path) -> list[str]:
    ledger = ledger_of(directory)
    try:
        return [e.id for e in ledger.experiments({Status.PENDING, Status.DISPATCHED, Status.RUNNING})]
    finally:
        ledger.close()


POSTGRES_URL = os.environ.get("SUPRAOPT_TEST_POSTGRES_URL")


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgresql",
            marks=[
                pytest.mark.postgres,
                pytest.mark.skipif(POSTGRES_URL is None, reason="set SUPRAOPT_TEST_POSTGRES_URL to run on PostgreSQL"),
            ],
        ),
    ]
)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a new ledger goes: a SQLite file not yet written, or a throwaway schema on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'server' / 'ledger.sqlite'}"
        return
    import sqlalchemy as sa

    assert POSTGRES_URL is not None
    schema = f"supraopt_dash_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


@pytest.fixture
def empty_ledger(ledger_url: str) -> Iterator[Ledger]:
    """An empty ledger: a SQLite file, or a throwaway schema on the PostgreSQL server."""
    if ledger_url.startswith("sqlite:///"):
        Path(ledger_url.removeprefix("sqlite:///")).parent.mkdir()
    ledger = Ledger(ledger_url)
    yield ledger
    ledger.close()


def test_version_changes_with_every_write_and_only_then(empty_ledger: Ledger) -> None:
    ledger = empty_ledger
    settings = {"concentration_mg_ml": 3.0, "flow_ratio": 4.0, "temperature_c": 40.0}
    assert ledger.version() == "0.0"
    ledger.add_pending([(settings, {}), (settings, {})])
    first = ledger.version()
    assert ledger.version() == first
    [a, b] = [e.id for e in ledger.experiments()]
    ledger.mark_dispatched(a)
    second = ledger.version()
    assert second != first
    ledger.record_measurement(a, Measurement(440.0, 5.0))
    third = ledger.version()
    assert third not in (first, second)
    with pytest.raises(LedgerError, match="already has a result"):
        ledger.record_measurement(a, Measurement(440.0, 5.0))
    assert ledger.version() == third  # a refused write changes nothing
    ledger.abandon(b, "lost")
    assert ledger.version() != third


def test_overview_links_to_a_page_with_every_id_and_measured_diameter(client: httpx.Client, fresh: Path) -> None:
    overview = client.get("/")
    assert overview.status_code == 200
    links = re.findall(r'href="(/c/[^"]+)"', overview.text)
    assert links == ["/c/fresh"]
    assert "450 nm" in overview.text and "8 suggested" in overview.text
    page = client.get(links[0]).text
    ledger = ledger_of(fresh)
    try:
        experiments = ledger.experiments()
    finally:
        ledger.close()
    assert len(experiments) == 8
    for e in experiments:
        row = re.search(rf'<tr id="row-{e.id}".*?</tr>', page, re.S)
        assert row, e.id
        if e.measurement is not None:
            d = e.measurement.diameter_nm
            assert f'<td class="measured" title="{d!r} nm">{d:.0f}</td>' in row.group(0)  # full value on hover
        elif e.failure is not None:
            assert e.failure.reason in row.group(0)


def test_live_parts_follow_a_write_from_another_process(client: httpx.Client, fresh: Path) -> None:
    before = client.get("/api/versions").json()["fresh"]
    assert client.get("/api/versions").json()["fresh"] == before
    first = open_ids(fresh)[0]
    ledger = ledger_of(fresh)  # another writer, as 'supraopt record' would be
    try:
        ledger.record_measurement(first, Measurement(451.0, 4.2, n_particles=90))
    finally:
        ledger.close()
    after = client.get("/api/versions").json()["fresh"]
    assert after != before
    live = client.get("/c/fresh/live").json()
    assert live["version"] == after
    assert '<td class="measured" title="451.0 nm">451</td>' in live["html"]["table"]
    assert f'id="open-{first}"' not in live["html"]["record"]
    assert live["figures"]["convergence"]["data"][0]["y"]  # distances to the target, one per measured run


def test_the_form_records_a_result_and_refuses_bad_values_without_writing(client: httpx.Client, fresh: Path) -> None:
    page = client.get("/c/fresh").text
    csrf = csrf_of(page)
    target = open_ids(fresh)[0]
    version = client.get("/api/versions").json()["fresh"]
    cases = {
        "abc": ("pdi", "PDI='abc' is not a number"),
        "0.05": ("pdi", "looks like a fraction"),
        "-3": ("pdi", "pdi_pct=-3.0 is not plausible"),
    }
    for pdi, (field, message) in cases.items():
        form = {"csrf": csrf, "outcome": "measured", "diameter_nm": "440", "pdi": pdi, "n_particles": "120"}
        reply = client.post(f"/c/fresh/record/{target}", data=form)
        assert reply.status_code == 200, pdi  # the page again, the error by the field
        error = re.search(rf'<span class="error" data-field="{field}">([^<]*)</span>', reply.text)
        assert error and message in error.group(1).replace("&#39;", "'"), (pdi, reply.text[-3000:])
        assert f'value="{pdi}"' in reply.text  # what was typed stays in the field
        assert client.get("/api/versions").json()["fresh"] == version  # nothing written
    reply = client.post(f"/c/fresh/record/{target}", data={"csrf": csrf, "outcome": "failed", "reason": "  "})
    assert reply.status_code == 200 and 'data-field="reason"' in reply.text
    reply = client.post(
        f"/c/fresh/record/{target}",
        data={"csrf": csrf, "outcome": "measured", "diameter_nm": "440", "pdi": "5.5", "n_particles": "120"},
    )
    assert reply.status_code == 303
    ledger = ledger_of(fresh)
    try:
        assert ledger.get(target).measurement == Measurement(440.0, 5.5, n_particles=120)
        assert ledger.get(target).note == "recorded in the dashboard"
    finally:
        ledger.close()
    again = client.post(f"/c/fresh/record/{target}", data={"csrf": csrf, "outcome": "failed", "reason": "hollow"})
    assert again.status_code == 200 and "already has a result" in again.text
    second = open_ids(fresh)[0]
    failed = client.post(f"/c/fresh/record/{second}", data={"csrf": csrf, "outcome": "failed", "reason": "hollow"})
    assert failed.status_code == 303
    assert open_ids(fresh) == []


def test_forms_are_refused_across_sites_without_the_csrf_token_and_when_read_only(fresh: Path) -> None:
    target = open_ids(fresh)[0]
    form = {"outcome": "measured", "diameter_nm": "440", "pdi": "5"}
    board = Board([fresh])
    try:
        with serving(create_app(board)) as url, httpx.Client(base_url=url) as c:
            csrf = csrf_of(c.get("/c/fresh").text)
            assert c.post(f"/c/fresh/record/{target}", data=form).status_code == 403
            assert c.post(f"/c/fresh/record/{target}", data=form | {"csrf": "guess"}).status_code == 403
            evil = c.post(
                f"/c/fresh/record/{target}", data=form | {"csrf": csrf}, headers={"Origin": "http://evil.example"}
            )
            assert evil.status_code == 403
            assert c.get("/", headers={"Host": "evil.example"}).status_code == 403  # DNS rebinding
        with serving(create_app(board, read_only=True)) as url, httpx.Client(base_url=url) as c:
            page = c.get("/c/fresh").text
            assert "<form" not in page and "read-only" in page
            assert c.post(f"/c/fresh/record/{target}", data=form | {"csrf": csrf}).status_code == 403
            assert c.post("/c/fresh/suggest", data={"csrf": csrf}).status_code == 403
    finally:
        board.close()
    assert open_ids(fresh)[0] == target  # nothing was written


def test_a_token_guards_everything_and_never_appears_in_a_page(board: Board, fresh: Path) -> None:
    with serving(create_app(board, token=TOKEN)) as url, httpx.Client(base_url=url, timeout=60) as c:
        for path in ("/", "/c/fresh", "/api/versions", "/static/plotly.min.js", "/c/fresh/maps.json"):
            assert c.get(path).status_code == 401, path
        assert c.get("/?token=wrong-token-wrong-token").status_code == 401
        assert c.get("/c/fresh", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        entered = c.get(f"/c/fresh?token={TOKEN}", follow_redirects=False)
        assert entered.status_code == 303 and entered.headers["location"] == "/c/fresh"
        assert "samesite=strict" in entered.headers["set-cookie"].lower()
        assert "httponly" in entered.headers["set-cookie"].lower()
        page = c.get("/c/fresh")  # the cookie now
        assert page.status_code == 200
        for text in (page.text, c.get("/").text, c.get("/c/fresh/live").text):
            assert TOKEN not in text
            assert str(fresh.resolve()) not in text and str(fresh.parent) not in text


def test_errors_and_logs_do_not_show_paths_outside_the_campaign(client: httpx.Client, fresh: Path) -> None:
    with (fresh / "run.log").open("a", encoding="utf-8") as log:
        log.write(
            f"2026-01-01T00:00:00+00:00 -- ledger sqlite:///{fresh.resolve()}/ledger.sqlite, home {Path.home()}\n"
        )
    page = client.get("/c/fresh").text
    csrf = csrf_of(page)
    unknown = client.post("/c/fresh/record/E999", data={"csrf": csrf, "outcome": "failed", "reason": "x"})
    assert unknown.status_code == 200 and "no experiment &#39;E999&#39;" in unknown.text
    for text in (client.get("/c/fresh").text, unknown.text):
        assert str(fresh.resolve()) not in text and str(Path.home()) + "/" not in text
    assert "ledger.sqlite" in client.get("/c/fresh").text
    assert client.get("/c/nope").status_code == 404
    assert client.get("/static/../campaign.toml").status_code == 404


def test_plotly_is_served_from_the_python_package(client: httpx.Client) -> None:
    import plotly

    reply = client.get("/static/plotly.min.js")
    assert reply.status_code == 200
    shipped = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert reply.content == shipped.read_bytes()
    page = client.get("/c/fresh").text
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no CDN, no external fonts


def test_maps_and_preview_are_computed_on_demand_and_cached(
    client: httpx.Client, fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supraopt.dashboard import figures

    calls = []
    model_maps = figures.model_maps
    monkeypatch.setattr(figures, "model_maps", lambda *a: calls.append(a[2]) or model_maps(*a))
    maps = client.get("/c/fresh/maps.json", params={"t": 35}).json()
    assert maps["temperature_c"] == 35.0
    assert set(maps["figures"]) == {"diameter", "pdi", "feasible", "hit"}
    heat = maps["figures"]["hit"]["data"][0]
    assert all(0.0 <= v <= 1.0 for row in heat["z"] for v in row)
    diameters = [v for row in maps["figures"]["diameter"]["data"][0]["z"] for v in row]
    assert min(diameters) > 0 and max(diameters) > 2 * min(diameters)
    assert client.get("/c/fresh/maps.json", params={"t": 35}).json() == maps
    assert calls == [35.0]  # the second request was served from the cache
    with (fresh / "run.log").open("a", encoding="utf-8") as log:
        log.write("2026-01-01T00:00:00+00:00 -- a line of the runner changes the page, not the model\n")
    assert client.get("/c/fresh/maps.json", params={"t": 35}).json() == maps
    assert calls == [35.0]
    version = client.get("/api/versions").json()["fresh"]
    preview = client.get("/c/fresh/preview.json", params={"n": 2}).json()
    first, second = preview["suggestions"]
    for suggestion in (first, second):
        assert set(suggestion["settings"]) == {"concentration_mg_ml", "flow_ratio", "temperature_c"}
        assert 0 <= suggestion["prediction"]["p_hit"] <= 1
    assert first["settings"] != second["settings"]  # a batch spreads out
    assert client.get("/api/versions").json()["fresh"] == version  # a preview records nothing


def test_the_suggest_button_records_a_pending_experiment(client: httpx.Client, fresh: Path) -> None:
    before = open_ids(fresh)
    csrf = csrf_of(client.get("/c/fresh").text)
    reply = client.post("/c/fresh/suggest", data={"csrf": csrf})
    assert reply.status_code == 303
    after = open_ids(fresh)
    assert len(after) == len(before) + 1
    assert f'id="open-{after[-1]}"' in client.get("/c/fresh").text


def test_token_file_is_generated_once_with_mode_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    token, source = load_token(tmp_path / "state")
    assert source == "new" and len(token) >= 16
    assert (tmp_path / "state" / "token").stat().st_mode & 0o777 == 0o600
    assert load_token(tmp_path / "state") == (token, "file")
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(InputError, match="too short"):
        load_token(tmp_path / "state")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen[str], **kwargs: object) -> httpx.Response:
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, process.communicate()[0]
        try:
            return httpx.get(url, timeout=5, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.2)


def test_a_non_loopback_start_needs_the_token(campaign_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    command = [sys.executable, "-m", "supraopt.cli", "dashboard", str(campaign_dir), "--host", "0.0.0.0"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--state-dir", str(tmp_path / "state")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        refused = _wait_until_up(f"http://127.0.0.1:{port}/", process)
        assert refused.status_code == 401 and "access token" in refused.text
        token = (tmp_path / "state" / "token").read_text().strip()
        entered = _wait_until_up(f"http://127.0.0.1:{port}/?token={token}", process, follow_redirects=True)
        assert entered.status_code == 200 and "trial-450" in entered.text
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"?token={token}" in output  # printed once, at the first start
    bad = subprocess.run(
        [*command, "--port", "0", "--state-dir", str(tmp_path / "other")],
        env=env | {TOKEN_ENV: "short"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and "too short" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_every_target_has_its_row_band_and_contour(tmp_path: Path) -> None:
    targets = (Target(350.0, 0.03, 6.0), Target(450.0, 0.03, 6.0), Target(600.0, 0.05, 5.0, confirm=1))
    ladder = synthetic_campaign(tmp_path / "ladder", 0, open_runs=4, seed=3, targets=targets, log=False)
    ledger = ledger_of(ladder)
    try:
        ledger.record_measurement("E002", Measurement(455.0, 5.0, n_particles=100))  # the first hit, recorded first
        ledger.record_measurement("E001", Measurement(450.0, 3.0, n_particles=100))  # closer, recorded later
        ledger.record_measurement("E003", Measurement(603.0, 4.0, n_particles=100))  # hit, not yet confirmed
    finally:
        ledger.close()
    board = Board([ladder])
    try:
        with serving(create_app(board)) as url, httpx.Client(base_url=url, timeout=120) as c:
            overview = c.get("/").text
            page = c.get("/c/ladder").text
            live = c.get("/c/ladder/live").json()
            maps = c.get("/c/ladder/maps.json", params={"t": 40}).json()["figures"]
    finally:
        board.close()
    assert "1 of 3 hit" in overview and "600 nm ± 5.0 %, PDI ≤ 5.0 %" in overview
    rows = {
        m.group(1): re.sub(r"<[^>]+>|\s+", " ", m.group(2)).split()
        for m in re.finditer(r'<tr data-target="(\d+)"[^>]*>(.*?)</tr>', page, re.S)
    }
    assert list(rows) == ["350", "450", "600"]
    assert " ".join(rows["350"]).startswith("350 ± 3.0 % 6.0 – not hit – E001:")  # closest to 350, no hit
    assert " ".join(rows["450"]).startswith("450 ± 3.0 % 6.0 – ✔ hit E002 E001: 450 nm")  # first hit != closest
    assert " ".join(rows["600"]).startswith("600 ± 5.0 % 5.0 1 hit, not confirmed E003 E003: 603 nm")
    assert re.search(r'<tr id="row-E003"[^>]*>.*?<td class="hits">✔ 600</td>', page, re.S)
    parity = live["figures"]["parity"]["layout"]
    assert [(round(s["x0"]), round(s["x1"])) for s in parity["shapes"]] == [(340, 360), (436, 464), (570, 630)]
    assert [a["text"] for a in parity["annotations"]] == ["350 nm", "450 nm", "600 nm"]
    assert "nearest of 3 targets" in live["figures"]["convergence"]["layout"]["title"]["text"]
    contours = [t for t in maps["diameter"]["data"] if t["type"] == "contour"]
    assert [t["contours"]["start"] for t in contours] == [350.0, 450.0, 600.0]
    assert "P(hit any target)" in maps["hit"]["layout"]["title"]["text"]
    assert all(0.0 <= v <= 1.0 for row in maps["hit"]["data"][0]["z"] for v in row)


def test_a_campaign_is_watched_through_its_ledger_url_alone(tmp_path: Path, ledger_url: str) -> None:
    from typer.testing import CliRunner

    from supraopt.campaign import Campaign
    from supraopt.cli import app

    url = ledger_url  # a PostgreSQL database, or a SQLite file standing for one
    (tmp_path / "server").mkdir()
    settings = {"concentration_mg_ml": 4.0, "flow_ratio": 4.0, "temperature_c": 40.0}
    with Campaign.create(tmp_path / "rig-pc", "cspbbr3-flow-focusing", [450.0, 600.0], ledger_url=url) as campaign:
        campaign.ledger.add_pending([(settings, {"diameter_nm": 440.0, "diameter_sd_nm": 20.0}), (settings, {})])
        campaign.record("E001", Measurement(452.0, 4.0, n_particles=100))
    shutil.rmtree(tmp_path / "rig-pc")  # the desk machine has the database, not the folder
    board = Board([], [url])
    try:
        with serving(create_app(board)) as base, httpx.Client(base_url=base, timeout=120) as c:
            assert re.findall(r'href="(/c/[^"]+)"', c.get("/").text) == ["/c/rig-pc"]
            page = c.get("/c/rig-pc").text
            assert re.findall(r'<tr data-target="(\d+)"', page) == ["450", "600"]
            assert "run.log stays on the machine that runs the campaign" in page
            form = {"csrf": csrf_of(page), "outcome": "measured", "diameter_nm": "598", "pdi": "4.5"}
            assert c.post("/c/rig-pc/record/E002", data=form).status_code == 303
            assert "✔ all 2" in c.get("/c/rig-pc").text  # both targets hit now
    finally:
        board.close()
    ledger = Ledger(url)
    try:
        assert ledger.get("E002").measurement == Measurement(598.0, 4.5)
    finally:
        ledger.close()

    folder_only = synthetic_campaign(tmp_path / "local", 1, open_runs=0)  # no ledger_url: no copy of its spec
    missing = tmp_path / "server" / "typo.sqlite"
    for bad, message in (
        (f"sqlite:///{missing}", f"no ledger file at {missing}"),
        (f"sqlite:///{folder_only / 'ledger.sqlite'}", "holds no copy of its campaign.toml"),
        (f"sqlite:///{folder_only / 'campaign.toml'}", "cannot be opened"),
        ("nosuchdb://x", "cannot be opened"),
    ):
        result = CliRunner().invoke(app, ["dashboard", "--ledger-url", bad, "--port", "0"])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert result.output.startswith("error:") and message in result.output, result.output
    assert not missing.exists()  # a refused URL creates nothing


def test_watching_a_ledger_url_works_without_sqlalchemy(tmp_path: Path) -> None:
    """SQLAlchemy is only a development dependency: a chemist's install has none, and
    ``dashboard --ledger-url`` must find the ledger without it."""
    folder = synthetic_campaign(tmp_path / "c", 2, open_runs=0)
    script = (
        "import sys; sys.modules['sqlalchemy'] = None\n"  # any import of it now fails
        "from supraopt.dashboard.data import _require_ledger\n"
        f"_require_ledger({'sqlite:///' + str(folder / 'ledger.sqlite')!r}, 'the ledger')\n"
        "print('found')"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "found", done.stderr
