"""The report `vctmae predict` writes under `--out`.

    index.html          the counts, then every scan (highest probability first; sortable,
                        filterable, paged by a small inline script): levels assessed,
                        fractures suspected, a thumbnail, a link
    run.json            the settings `vctmae predict --resume` must match
    CASE/scan.json      the scan's record (summary.json's entry), written last: the scan is done
    CASE/report.html    one scan: the verdict, the sagittal overview, one row per vertebra
    CASE/overview.svg   the overview (`vctmae.predict.pictures.overview_svg`)
    CASE/LEVEL.png      a vertebra's 16 frames and its attention (`vertebra_png`)
    CASE/*.dcm          for a DICOM series: the vertebrae as DICOM SEG and the findings as
                        DICOM SR, in the CT's study (`vctmae.predict.dicom_out`)
    predictions.csv     eval's columns (key, label, prob_fracture, predicted), then case,
                        level, centroid_x/y/z_mm (world, RAS+), threshold
    summary.json        per scan: vertebrae, fractured levels, timings; the checkpoint,
                        threshold, versions and machine

Plain HTML with its style inline and its pictures beside it: it opens from a
folder, a USB stick or a zip with no network. Every file is written under a
temporary name and renamed (`write_atomically`).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vctmae.clip import ClipRule
from vctmae.files import write_atomically
from vctmae.predict.config import PredictConfig
from vctmae.predict.pictures import SLAB_MM, probability_hex
from vctmae.predict.results import ScanResult, VertebraResult

if TYPE_CHECKING:
    from vctmae.infer.threshold import ThresholdChoice

PAGE = "report.html"
OVERVIEW = "overview.svg"
INDEX = "index.html"
PREDICTIONS = "predictions.csv"
SUMMARY = "summary.json"
CENTROID_COLUMNS = ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm")
DISCLAIMER = (
    "Research software: a model's estimate from the CT and its vertebra label map, not a "
    "diagnosis. Check every level on the images."
)


def file_digest(path: Path) -> str:
    """sha256 of a file (the checkpoint's, for the summary)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class RunFacts:
    """What every page and summary.json say about the run itself."""

    checkpoint: str  # as given on the command line
    checkpoint_path: str  # absolute, so that a report read elsewhere still names the file
    checkpoint_sha256: str
    model: dict[str, Any]  # the checkpoint's model config (preset fields)
    threshold: ThresholdChoice
    rule: dict[str, Any]  # the clip rule applied: frames, multiview, combine, levels
    device: str
    precision: str  # the number format the model ran in: bf16 or fp32
    crop_size: int
    spacing_mm: float
    started: str  # ISO time
    versions: dict[str, str]
    git_commit: str | None
    machine: dict[str, Any]

    @classmethod
    def of(
        cls,
        config: PredictConfig,
        threshold: ThresholdChoice,
        rule: ClipRule,
        *,
        device: str,
        precision: str,
    ) -> RunFacts:
        from vctmae.ingest.geometry import GeometryConfig
        from vctmae.model.checkpoint import read_model_config
        from vctmae.provenance import git_commit, machine_info, versions

        _, model = read_model_config(config.checkpoint)
        geometry = GeometryConfig()
        return cls(
            checkpoint=str(config.checkpoint),
            checkpoint_path=str(Path(config.checkpoint).resolve()),
            checkpoint_sha256=file_digest(config.checkpoint),
            model=model.to_dict(),
            threshold=threshold,
            rule=rule.to_json(),
            device=device,
            precision=precision,
            crop_size=geometry.size,
            spacing_mm=geometry.spacing,
            started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            versions=versions(),
            git_commit=git_commit(),
            machine=machine_info(),
        )

    @property
    def multiview(self) -> int:
        return self.rule["multiview"]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        # The threshold applied and where it came from (not the validation record behind it).
        out["threshold"] = {key: out["threshold"][key] for key in ("value", "source", "detail")}
        return out


# ---------------------------------------------------------------------------------------------
# One scan.


def write_scan(
    scan: ScanResult,
    volumes,
    attention: list[dict[str, Any]],
    out: Path,
    run: RunFacts,
) -> ScanResult:
    """Write a scan's pictures and page under `out/CASE/`; returns the scan with their names."""
    from vctmae.predict.pictures import overview_svg, vertebra_png

    folder = out / scan.folder
    folder.mkdir(parents=True, exist_ok=True)
    overview = None
    if scan.ok:
        vertebrae = []
        shown = attention or [None] * len(scan.vertebrae)
        for vertebra, seen in zip(scan.vertebrae, shown, strict=True):
            if seen is not None:
                name = f"{vertebra.level}.png"
                vertebra_png(
                    seen["frames"],
                    seen["maps"]["rollout"],
                    folder / name,
                    slices=seen["slices"],
                    centre=(run.crop_size - 1) / 2,
                    spacing=run.spacing_mm,
                    box=vertebra.bbox,
                )
                vertebra = dataclasses.replace(vertebra, picture=name)
            vertebrae.append(vertebra)
        scan = dataclasses.replace(scan, vertebrae=tuple(vertebrae))
        ct, labels, label_values = volumes
        overview_svg(
            ct,
            labels,
            scan.vertebrae,
            label_values,
            scan.not_assessed,
            run.threshold.value,
            folder / OVERVIEW,
            # The case id is the page's heading, in HTML: ids in any script show there.
            title="Sagittal plane through the spine's midline",
        )
        overview = f"{scan.folder}/{OVERVIEW}"
    scan = dataclasses.replace(scan, page=f"{scan.folder}/{PAGE}", overview=overview)
    text = scan_page(scan, run).encode("utf-8")
    write_atomically(folder / PAGE, lambda handle: handle.write(text))
    return scan


# ---------------------------------------------------------------------------------------------
# The run's files.


def write_run(scans: list[ScanResult], out: Path, run: RunFacts, *, seconds: float) -> None:
    """predictions.csv, summary.json and index.html for the scans done so far."""
    table = predictions_csv(scans, run.threshold.value).encode("utf-8")
    write_atomically(out / PREDICTIONS, lambda handle: handle.write(table))
    summary = {
        "run": run.to_json(),
        "scans_seen": len(scans),
        "scans_ok": sum(scan.ok for scan in scans),
        "scans_failed": sum(not scan.ok for scan in scans),
        "vertebrae_assessed": sum(len(scan.vertebrae) for scan in scans),
        "vertebrae_fractured": sum(len(scan.fractured) for scan in scans),
        "seconds": round(seconds, 3),
        "scans": [scan.to_json() for scan in scans],
    }
    text = (json.dumps(summary, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomically(out / SUMMARY, lambda handle: handle.write(text))
    page = index_page(scans, run).encode("utf-8")
    write_atomically(out / INDEX, lambda handle: handle.write(page))


def predictions_csv(scans: list[ScanResult], threshold: float) -> str:
    """predictions.csv: eval's columns first (label −1: unknown), then this run's."""
    from vctmae.infer.metrics import PREDICTION_COLUMNS, prediction_row

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([*PREDICTION_COLUMNS, "case", "level", *CENTROID_COLUMNS, "threshold"])
    for scan in scans:
        for vertebra in scan.vertebrae:
            writer.writerow(
                [
                    *prediction_row(vertebra.key, -1, vertebra.prob_fracture, threshold),
                    scan.case,
                    vertebra.level,
                    *(f"{v:.4f}" for v in vertebra.centroid),
                    f"{threshold:.6f}",
                ]
            )
    return text.getvalue()


# ---------------------------------------------------------------------------------------------
# HTML.

STYLE = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1d1d1f; margin: 0; background: #f6f6f4; }
main { max-width: 1500px; margin: 0 auto; padding: 18px 28px 40px; }
h1 { font-size: 24px; margin: 4px 0 2px; }
h2 { font-size: 18px; margin: 26px 0 8px; border-bottom: 1px solid #d0d0cc; padding-bottom: 3px; }
a { color: #0b5cad; }
.note { background: #fff4d6; border: 1px solid #e5cf8a; padding: 6px 10px; border-radius: 4px;
        font-size: 13px; }
.verdict { font-size: 18px; margin: 12px 0; padding: 10px 14px; border-radius: 6px;
           background: #fff; border-left: 6px solid #8a8a8a; }
.verdict.fracture { border-left-color: #b40426; }
.verdict.clear { border-left-color: #3b4cc0; }
.verdict.failed { border-left-color: #b40426; background: #fdecec; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 13px;
           margin: 8px 0; }
dl.facts dt { color: #666; }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
.overview { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
.overview img { max-height: 760px; max-width: 100%; background: #000; border-radius: 4px; }
.legend { max-width: 380px; font-size: 13px; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { border-bottom: 1px solid #e2e2de; padding: 6px 8px; text-align: left;
         vertical-align: middle; }
th { background: #ecece8; font-size: 13px; position: sticky; top: 0; }
th[data-col] { cursor: pointer; }
td.vertebra { width: 10em; vertical-align: top; }
td.vertebra > div { margin: 4px 0; }
.level { font-size: 26px; font-weight: 700; }
.prob { font-size: 17px; font-weight: 600; padding: 2px 8px; border-radius: 4px;
        display: inline-block; white-space: nowrap; }
td.frames img { width: 100%; min-width: 760px; display: block; }
.num { font-variant-numeric: tabular-nums; white-space: nowrap; font-size: 12px; color: #555; }
.flag { font-weight: 700; color: #b40426; }
.muted { color: #777; }
.thumb { height: 150px; background: #000; border-radius: 3px; }
footer { margin-top: 30px; font-size: 12px; color: #777; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        f"{body}\n</main>\n</body>\n</html>\n"
    )


def _prob_badge(vertebra: VertebraResult, threshold: float, label: str = "P = ") -> str:
    colour = probability_hex(vertebra.prob_fracture, threshold)
    return (
        f'<span class="prob" style="background:{colour}">{label}{vertebra.prob_fracture:.2f}</span>'
    )


def _levels_text(vertebrae: tuple[VertebraResult, ...]) -> str:
    if not vertebrae:
        return "none"
    if len(vertebrae) == 1:
        return vertebrae[0].level
    return f"{vertebrae[0].level}–{vertebrae[-1].level}"


def _verdict(scan: ScanResult, threshold: float) -> tuple[str, str]:
    """(css class, sentence) of a scan's result."""
    if not scan.ok:
        return "failed", f"Not assessed: {_e(scan.error)}"
    if not scan.vertebrae:
        return "", "No vertebra could be assessed (see the list below)."
    levels = _levels_text(scan.vertebrae)
    if scan.fractured:
        found = ", ".join(
            f"<b>{_e(v.level)}</b> (P = {v.prob_fracture:.2f})" for v in scan.fractured
        )
        return "fracture", (
            f"Fracture suspected at {found} — {len(scan.vertebrae)} vertebrae assessed "
            f"({_e(levels)}) at threshold {threshold:.2f}."
        )
    highest = max(scan.vertebrae, key=lambda v: v.prob_fracture)
    return "clear", (
        f"No fracture suspected at the {len(scan.vertebrae)} vertebrae assessed "
        f"({_e(levels)}); highest P = {highest.prob_fracture:.2f} at {_e(highest.level)}, "
        f"threshold {threshold:.2f}."
    )


def _facts(scan: ScanResult, run: RunFacts) -> str:
    seg = f"{scan.seg} (made by TotalSegmentator)" if scan.segmented else scan.seg
    spacing = (
        " × ".join(f"{v:.2f}" for v in scan.source_spacing) + " mm" if scan.source_spacing else "—"
    )
    model = run.model
    rows = [
        ("CT", scan.ct + (f" (series {scan.series})" if scan.series else "")),
        ("Label map", seg or "—"),
        ("Voxels", f"{spacing}, stored {scan.source_orientation or '—'}"),
        ("Levels assessed", f"{run.rule['levels']} (labels read as {scan.scheme or '—'})"),
        ("Threshold", f"{run.threshold.value:.4f}: {run.threshold.detail}"),
        (
            "Model",
            f"{run.checkpoint} (ViT {model.get('embed_dim')}-d × {model.get('depth')} layers; "
            f"sha256 {run.checkpoint_sha256[:12]}…); --frames {run.rule['frames']}, "
            f"{run.multiview} view(s) per vertebra combined by --combine {run.rule['combine']}",
        ),
    ]
    if scan.dicom:
        names = ", ".join(Path(path).name for path in scan.dicom)
        rows.append(
            (
                "DICOM",
                f"{names}: the assessed vertebrae (SEG) and the findings (SR), in the CT's study",
            )
        )
    cells = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    return f'<dl class="facts">{cells}</dl>'


def scan_page(scan: ScanResult, run: RunFacts) -> str:
    """CASE/report.html: verdict, facts, overview, one row per vertebra, what was not assessed."""
    threshold = run.threshold.value
    kind, sentence = _verdict(scan, threshold)
    parts = [
        '<p><a href="../index.html">← all scans</a></p>',
        f"<h1>Vertebral fracture report — {_e(scan.case)}</h1>",
        f'<p class="note">{_e(DISCLAIMER)}</p>',
        f'<p class="verdict {kind}">{sentence}</p>',
        _facts(scan, run),
    ]
    if scan.ok and scan.overview:
        parts.append(
            "<h2>Overview</h2>"
            '<div class="overview">'
            f'<img src="{_e(OVERVIEW)}" alt="Sagittal overview of {_e(scan.case)} with each '
            "vertebra's level and fracture probability\">"
            '<div class="legend"><p>The sagittal plane through the middle of the spine (bone '
            "window; head up, the patient's front on the left). Each assessed vertebra is "
            "tinted by its probability of fracture: <b>blue</b> below the threshold (no "
            "fracture called), <b>white</b> near it, <b>red</b> above it (fracture suspected, "
            "marked FRACTURE?). Grey: in the label map but not assessed (reason in the "
            "label). A vertebra away from the midline (scoliosis) shows its tint only where "
            f"it lies within {SLAB_MM:.0f} mm of the plane.</p></div></div>"
        )
    if scan.ok and scan.vertebrae:
        rows = []
        for vertebra in scan.vertebrae:
            call = (
                '<span class="flag">fracture suspected</span>'
                if vertebra.predicted
                else '<span class="muted">no fracture</span>'
            )
            picture = (
                f'<img src="{_e(vertebra.picture)}" alt="{_e(vertebra.level)}: sagittal frames '
                'and attention" loading="lazy">'
                if vertebra.picture
                else '<span class="muted">(not drawn: --no-attention)</span>'
            )
            x, y, z = vertebra.centroid
            rows.append(
                f'<tr id="{_e(vertebra.level)}"><td class="vertebra">'
                f'<div class="level">{_e(vertebra.level)}</div>'
                f"<div>{_prob_badge(vertebra, threshold)}</div><div>{call}</div>"
                f'<div class="num">centre (mm)<br>x {x:.1f} (R)<br>y {y:.1f} (A)<br>'
                f"z {z:.1f} (S)</div></td>"
                f'<td class="frames">{picture}</td></tr>'
            )
        parts.append(
            "<h2>Vertebrae</h2>"
            "<p>Per vertebra: the 16 sagittal slices the model sees (6 mm apart, from the "
            "patient's left to the right, in mm from the vertebra's centre; each 96 mm square, "
            "the spine's axis vertical, the front on the left; bone window), each with, below "
            "it, the model's attention (rollout over all layers; bright = the regions its "
            "decision drew on most). P(fracture) is the mean over "
            f"{run.multiview} view(s) of the vertebra.</p>"
            "<table><thead><tr><th>Vertebra</th>"
            "<th>What the model saw (CT rows) and where it looked (attention rows)</th>"
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        )
    if scan.not_assessed:
        items = "".join(f"<li><b>{_e(n.level)}</b>: {_e(n.reason)}</li>" for n in scan.not_assessed)
        parts.append(f"<h2>Not assessed</h2><ul>{items}</ul>")
    parts.append(_footer(run))
    return _page(f"{scan.case} — vertebral fracture report", "\n".join(parts))


def _footer(run: RunFacts) -> str:
    commit = f", commit {run.git_commit[:12]}" if run.git_commit else ""
    return (
        f"<footer>vctmae {_e(run.versions.get('vctmae', '?'))}{_e(commit)}, torch "
        f"{_e(run.versions.get('torch', '?'))}, on {_e(run.device)} in {_e(run.precision)}; "
        f"run started {_e(run.started)}. {_e(DISCLAIMER)}</footer>"
    )


INDEX_PAGE_ROWS = 100  # rows per page of index.html

# index.html's script: filter, sort by a column, page. Without it every row shows, sorted.
INDEX_SCRIPT = """
(function () {
  var body = document.querySelector('#scans tbody');
  var rows = Array.prototype.slice.call(body.rows);
  var text = document.getElementById('filter'), kind = document.getElementById('kind');
  var pager = document.getElementById('pager'), page = 0, per = ROWS_PER_PAGE, shown = rows;
  function show() {
    var q = text.value.toLowerCase(), k = kind.value;
    shown = rows.filter(function (r) {
      return (!k || r.dataset.kind === k) && (!q || r.textContent.toLowerCase().indexOf(q) >= 0);
    });
    var pages = Math.max(1, Math.ceil(shown.length / per));
    page = Math.min(page, pages - 1);
    rows.forEach(function (r) { r.hidden = true; });
    shown.slice(page * per, (page + 1) * per).forEach(function (r) { r.hidden = false; });
    pager.querySelector('span').textContent = shown.length + ' scan(s), page ' + (page + 1)
      + ' of ' + pages;
  }
  text.oninput = kind.onchange = function () { page = 0; show(); };
  pager.querySelector('.prev').onclick = function () { page = Math.max(0, page - 1); show(); };
  pager.querySelector('.next').onclick = function () { page += 1; show(); };
  document.querySelectorAll('#scans th[data-col]').forEach(function (th) {
    th.onclick = function () {
      var col = +th.dataset.col, down = th.dataset.down !== '1';
      th.dataset.down = down ? '1' : '0';
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.sort, y = b.cells[col].dataset.sort;
        var c = (x !== undefined && y !== undefined) ? (+x - +y)
          : a.cells[col].textContent.localeCompare(b.cells[col].textContent);
        return down ? -c : c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
      page = 0; show();
    };
  });
  pager.hidden = false; document.getElementById('tools').hidden = false;
  show();
})();
""".replace("ROWS_PER_PAGE", str(INDEX_PAGE_ROWS))


def _index_order(scans: list[ScanResult]) -> list[ScanResult]:
    """index.html's rows: the highest probability first (ties in the scans' order), then the scans
    with no vertebra assessed, then the failed ones."""

    def key(scan: ScanResult) -> tuple[int, float]:
        if not scan.ok:
            return (2, 0.0)
        if not scan.vertebrae:
            return (1, 0.0)
        return (0, -max(v.prob_fracture for v in scan.vertebrae))

    return sorted(scans, key=key)


def index_page(scans: list[ScanResult], run: RunFacts) -> str:
    """index.html: the counts, then one table row per scan linking to its page, sorted (highest
    probability first), filterable and paged by a small inline script (no network needed)."""
    threshold = run.threshold.value
    rows = []
    for scan in _index_order(scans):
        link = f'<a href="{_e(scan.page)}">{_e(scan.case)}</a>' if scan.page else _e(scan.case)
        if not scan.ok:
            rows.append(
                f'<tr data-kind="failed"><td>{link}</td><td data-sort="-1">—</td>'
                f'<td class="flag">failed: {_e(scan.error)}</td><td data-sort="-1">—</td>'
                "<td>—</td><td></td></tr>"
            )
            continue
        fractured = (
            ", ".join(f"{_e(v.level)} ({v.prob_fracture:.2f})" for v in scan.fractured)
            if scan.fractured
            else '<span class="muted">none</span>'
        )
        highest = max(scan.vertebrae, key=lambda v: v.prob_fracture, default=None)
        highest_cell = (
            f'<td data-sort="{highest.prob_fracture:.6f}">{_prob_badge(highest, threshold, "")} '
            f"at {_e(highest.level)}</td>"
            if highest
            else '<td data-sort="-1">—</td>'
        )
        skipped = ", ".join(
            f"{_e(n.level)} ({_e(n.reason.split(':')[0])})" for n in scan.not_assessed
        )
        thumb = (
            f'<a href="{_e(scan.page)}"><img class="thumb" src="{_e(scan.overview)}" '
            f'alt="overview of {_e(scan.case)}" loading="lazy"></a>'
            if scan.overview
            else ""
        )
        kind = "fracture" if scan.fractured else "clear" if scan.vertebrae else "none"
        rows.append(
            f'<tr data-kind="{kind}"><td>{link}</td>{highest_cell}'
            f'<td class="{"flag" if scan.fractured else ""}">{fractured}</td>'
            f'<td data-sort="{len(scan.vertebrae)}">{len(scan.vertebrae)} '
            f"({_e(_levels_text(scan.vertebrae))})</td>"
            f'<td class="muted">{skipped or "—"}</td><td>{thumb}</td></tr>'
        )
    failed = sum(not scan.ok for scan in scans)
    suspected = sum(bool(scan.fractured) for scan in scans)
    clear = sum(scan.ok and bool(scan.vertebrae) and not scan.fractured for scan in scans)
    vertebrae = sum(len(scan.vertebrae) for scan in scans)
    fractured_vertebrae = sum(len(scan.fractured) for scan in scans)
    headings = "".join(
        f'<th data-col="{column}" title="sort">{name}</th>'
        for column, name in enumerate(
            ("Scan", "Highest P", "Fracture suspected at (P)", "Vertebrae assessed", "Not assessed")
        )
    )
    body = "\n".join(
        [
            "<h1>Vertebral fracture reports</h1>",
            f'<p class="note">{_e(DISCLAIMER)}</p>',
            f'<p class="verdict">{len(scans)} scan(s): fracture suspected in {suspected}, no '
            f"fracture suspected in {clear}, no vertebra assessed in "
            f"{len(scans) - suspected - clear - failed}, failed {failed}. {vertebrae} vertebrae "
            f"assessed, {fractured_vertebrae} called fractured. Threshold {threshold:.4f} — "
            f"{_e(run.threshold.detail)}.</p>",
            '<p id="tools" hidden><input id="filter" placeholder="filter: case, level…"> '
            '<select id="kind"><option value="">all scans</option>'
            '<option value="fracture">fracture suspected</option>'
            '<option value="clear">no fracture suspected</option>'
            '<option value="none">no vertebra assessed</option>'
            '<option value="failed">failed</option></select> '
            "Click a column's heading to sort by it.</p>",
            f'<table id="scans"><thead><tr>{headings}<th>Overview</th></tr></thead><tbody>'
            + "".join(rows)
            + "</tbody></table>",
            '<p id="pager" hidden><button class="prev">← previous</button> <span></span> '
            '<button class="next">next →</button></p>',
            f'<p>Per-vertebra numbers: <a href="{PREDICTIONS}">{PREDICTIONS}</a>; the run: '
            f'<a href="{SUMMARY}">{SUMMARY}</a>.</p>',
            _footer(run),
            f"<script>{INDEX_SCRIPT}</script>",
        ]
    )
    return _page("Vertebral fracture reports", body)
