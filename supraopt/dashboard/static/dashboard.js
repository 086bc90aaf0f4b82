// supraopt dashboard: draws the Plotly figures, polls the ledger version every second and swaps the
// server-rendered parts of the page when it changes; model maps and the next suggestion on demand.
(function () {
  "use strict";
  const body = document.body;
  const page = body.dataset.page;
  const slug = body.dataset.slug;
  let version = body.dataset.version || null;
  let recordStale = false;
  const config = { responsive: true, displaylogo: false };
  const POLL_MS = 1000;

  function draw(id, figure) {
    const el = document.getElementById(id);
    if (el && window.Plotly && figure) window.Plotly.react(el, figure.data, figure.layout, config);
  }

  function drawFigures(figures) {
    draw("plot-convergence", figures.convergence);
    draw("plot-parity", figures.parity);
  }

  function setLive(ok) {
    const el = document.getElementById("live");
    if (!el) return;
    el.classList.toggle("off", !ok);
    el.textContent = ok ? "live" : "offline";
  }

  function busy(el) {
    if (el.contains(document.activeElement) && document.activeElement !== document.body) return true;
    return Array.from(el.querySelectorAll("input:not([type=hidden])")).some((i) => i.value.trim() !== "");
  }

  function swap(parts) {
    for (const [name, html] of Object.entries(parts)) {
      const el = document.querySelector('[data-live="' + name + '"]');
      if (!el) continue;
      if (name === "record" && busy(el)) { recordStale = true; continue; }
      if (name === "record") recordStale = false;
      el.innerHTML = html;
    }
  }

  async function refreshCampaign() {
    const r = await fetch("/c/" + encodeURIComponent(slug) + "/live", { cache: "no-store" });
    if (!r.ok) throw new Error("live: " + r.status);
    const d = await r.json();
    swap(d.html);
    drawFigures(d.figures);
    version = d.version;
    body.dataset.version = version;
    const maps = document.getElementById("maps");
    if (maps && !maps.hidden) loadMaps();
    const preview = document.getElementById("preview");
    if (preview && preview.dataset.shown) loadPreview();
  }

  async function refreshOverview() {
    const r = await fetch("/live", { cache: "no-store" });
    if (!r.ok) throw new Error("live: " + r.status);
    const d = await r.json();
    swap(d.html);
    version = JSON.stringify(d.versions);
  }

  async function poll() {
    try {
      const r = await fetch("/api/versions", { cache: "no-store" });
      if (!r.ok) throw new Error("versions: " + r.status);
      const v = await r.json();
      setLive(true);
      if (page === "campaign") {
        if (v[slug] !== version) await refreshCampaign();
        else if (recordStale) await refreshCampaign();
      } else if (page === "overview" && JSON.stringify(v) !== version) {
        await refreshOverview();
      }
    } catch (_error) {
      setLive(false);
    }
    window.setTimeout(poll, POLL_MS);
  }

  function say(el, text, isError) {
    el.textContent = text;
    el.classList.toggle("error", Boolean(isError));
  }

  async function loadMaps() {
    const box = document.getElementById("maps");
    const status = document.getElementById("preview-status") || null;
    const t = document.getElementById("temperature").value;
    const button = document.getElementById("maps-button");
    button.disabled = true;
    button.textContent = "Computing maps…";
    try {
      const r = await fetch("/c/" + encodeURIComponent(slug) + "/maps.json?t=" + encodeURIComponent(t), { cache: "no-store" });
      if (!r.ok) throw new Error(await r.text());
      const d = await r.json();
      box.hidden = false;
      for (const key of ["diameter", "pdi", "feasible", "hit"]) draw("map-" + key, d.figures[key]);
      button.textContent = "Maps at " + d.temperature_c + " °C (model of ledger version " + d.version + ")";
    } catch (error) {
      button.textContent = "Show model maps";
      const target = status || document.getElementById("preview");
      say(target, String(error.message || error), true);
    } finally {
      button.disabled = false;
    }
  }

  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
  }

  function fixed(value, digits) {
    return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "–";
  }

  async function loadPreview() {
    const box = document.getElementById("preview");
    const button = document.getElementById("preview-button");
    button.disabled = true;
    say(box, "Computing the next suggestion…", false);
    try {
      const n = document.getElementById("preview-n").value || "1";
      const r = await fetch("/c/" + encodeURIComponent(slug) + "/preview.json?n=" + encodeURIComponent(n), { cache: "no-store" });
      if (!r.ok) throw new Error(await r.text());
      const d = await r.json();
      box.textContent = "";
      box.dataset.shown = "1";
      const table = document.createElement("table");
      table.className = "grid";
      const head = table.createTHead().insertRow();
      for (const h of ["c (mg/mL)", "Q_c/Q_d", "T (°C)", "predicted d (nm)", "PDI (%)", "P(feasible)", "P(hit)"]) {
        const th = document.createElement("th");
        th.textContent = h;
        head.appendChild(th);
      }
      const tbody = table.createTBody();
      for (const s of d.suggestions) {
        const row = tbody.insertRow();
        const x = s.settings, p = s.prediction;
        cell(row, fixed(x.concentration_mg_ml, 3));
        cell(row, fixed(x.flow_ratio, 2));
        cell(row, fixed(x.temperature_c, 1));
        cell(row, fixed(p.diameter_nm, 0) + " ± " + fixed(p.diameter_sd_nm, 0));
        cell(row, fixed(p.pdi_pct, 1) + " ± " + fixed(p.pdi_sd_pct, 1));
        cell(row, fixed(p.p_feasible, 2));
        cell(row, fixed(p.p_hit, 2));
      }
      const note = document.createElement("p");
      note.className = "hint";
      note.textContent = "Not recorded yet: 'Suggest the next experiment' (or supraopt suggest) records it as pending.";
      box.appendChild(table);
      box.appendChild(note);
    } catch (error) {
      say(box, String(error.message || error), true);
    } finally {
      button.disabled = false;
    }
  }

  if (page === "campaign") {
    const data = document.getElementById("figures");
    if (data) drawFigures(JSON.parse(data.textContent));
    const temperature = document.getElementById("temperature");
    const shown = document.getElementById("temperature-value");
    temperature.addEventListener("input", () => { shown.textContent = temperature.value; });
    temperature.addEventListener("change", () => { if (!document.getElementById("maps").hidden) loadMaps(); });
    document.getElementById("maps-button").addEventListener("click", loadMaps);
    document.getElementById("preview-button").addEventListener("click", loadPreview);
  }
  window.setTimeout(poll, POLL_MS);
})();
