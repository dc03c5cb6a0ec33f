"""`vctmae predict`: scans → per-vertebra fracture probabilities and a report.

The model is a shrunken `tiny` classifier with random weights: what is checked
is that predict computes what ingest + eval compute (keys, crops,
probabilities), not that it diagnoses well. Phantoms come from conftest's `raw`
(`vctmae.synth.phantoms.write_phantoms`), DICOM series from `dicom_series.write_series`,
the TotalSegmentator stand-in from `helpers.use_totalsegmentator`.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_series import write_series, write_unreadable_dicom_folders
from helpers import (
    SMALL_MODEL,
    TEST_RUN,
    cli,
    error_lines,
    eval_config,
    linked_source,
    load_ct,
    predict_config,
    read_predictions,
    read_rows,
    reorient,
    use_totalsegmentator,
    write_split,
)
from sklearn import metrics as sk
from typer.testing import CliRunner

from vctmae.clip import REFERENCE_LEVELS, ClipRule
from vctmae.data.options import LoaderOptions
from vctmae.data.zarr_store import ZarrCrops
from vctmae.errors import UsageError
from vctmae.infer.config import EvalConfig
from vctmae.infer.device import resolve_precision
from vctmae.infer.evaluate import run_eval
from vctmae.infer.metrics import PREDICTION_COLUMNS
from vctmae.infer.threshold import (
    DecisionThreshold,
    f1_optimal_threshold,
    read_threshold,
    threshold_path,
    write_best,
)
from vctmae.ingest.discover import Case
from vctmae.ingest.geometry import GeometryConfig
from vctmae.ingest.levels import VERSE, parse_levels
from vctmae.ingest.pipeline import IngestConfig, run_ingest
from vctmae.model import build_classifier
from vctmae.model.checkpoint import model_files, save_model
from vctmae.predict.config import PredictConfig
from vctmae.predict.run import cut_scan, run_predict
from vctmae.train.config import FinetuneConfig, RunOptions
from vctmae.train.finetune import run_finetune

# The levels a checkpoint without a recorded clip rule is assessed on.
LEVELS = parse_levels(REFERENCE_LEVELS)
EXTRA_COLUMNS = ["case", "level", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "threshold"]


@pytest.fixture(scope="module")
def predicted(raw, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return run_predict(predict_config(checkpoint, out, src=raw, batch_size=5))


# --- predict = ingest + eval ------------------------------------------------------------


@pytest.fixture(scope="module")
def ingested(raw, tmp_path_factory) -> Path:
    """`raw` through `vctmae ingest` at predict's default levels."""
    data = tmp_path_factory.mktemp("predict-ingested")
    geometry = GeometryConfig(levels=parse_levels(REFERENCE_LEVELS))
    run_ingest(IngestConfig(src=raw, out=data, geometry=geometry, workers=1, progress=False))
    return data


def eval_predictions(checkpoint: Path, data: Path, out: Path, **fields):
    """`vctmae eval` of the shards under `data`: its predictions.csv, read back."""
    settings = {"multiview": 6, "loader": LoaderOptions(workers=0), **fields}
    run_eval(
        EvalConfig(
            checkpoint=checkpoint,
            shards=tuple(str(p) for p in sorted(data.glob("*.tar"))),
            out=out,
            device="cpu",
            progress=False,
            **settings,
        )
    )
    return read_predictions(out / "predictions.csv")


def test_predict_equals_ingest_then_eval(raw, checkpoint, predicted, ingested, tmp_path):
    data = ingested
    expected = eval_predictions(checkpoint, data, tmp_path / "eval")
    got = read_predictions(predicted.out / "predictions.csv")
    assert len(got.keys) >= 10
    assert sorted(got.keys) == expected.keys
    order = np.argsort(got.keys)
    np.testing.assert_allclose(got.probs[order], expected.probs, rtol=0, atol=1e-5)
    # The probabilities differ from crop to crop: the comparison is not between constants.
    assert np.ptp(expected.probs) > 1e-3
    # The crops predict cuts in memory are the bytes ingest stored.
    store = ZarrCrops(data / "crops.zarr")
    for scan in predicted.scans:
        case = Case(
            case=scan.case,
            patient=scan.case,
            ct=raw / scan.ct,
            seg=raw / scan.seg,
            ct_name=scan.ct,
            seg_name=scan.seg,
        )
        _, _, cut = cut_scan(
            case,
            predict_config(checkpoint, tmp_path, src=raw),
            case.seg,
            levels=LEVELS,
            segmented=False,
        )
        for crop in cut.crops:
            assert np.array_equal(crop.array, store.crop(f"{scan.case}_{crop.level}"))


def test_predict_in_mask_mode_with_logit_averaging_equals_eval(
    raw, checkpoint, predicted, ingested, tmp_path
):
    """--frames mask reads each crop's mask box; predict and eval read the same one."""
    fields = {"frames": "mask", "combine": "logits"}
    expected = eval_predictions(checkpoint, ingested, tmp_path / "eval", **fields)
    result = run_predict(
        predict_config(checkpoint, tmp_path / "report", src=raw, attention=False, **fields)
    )
    got = read_predictions(result.out / "predictions.csv")
    assert sorted(got.keys) == expected.keys
    order = np.argsort(got.keys)
    np.testing.assert_allclose(got.probs[order], expected.probs, rtol=0, atol=1e-5)
    # Mask mode's frames are not crop mode's: the options reached the model.
    crop_mode = read_predictions(predicted.out / "predictions.csv")
    assert crop_mode.keys == got.keys
    assert np.abs(crop_mode.probs - got.probs).max() > 1e-4


def test_dicom_series_gives_the_crops_and_probabilities_of_its_nifti(raw, checkpoint, tmp_path):
    nifti = raw / "ct" / "case000.nii.gz"
    seg = raw / "seg" / "case000.nii.gz"
    volume = load_ct(nifti)
    assert volume.orientation != "LPS"
    # A scanner's series: LPS, one int16 file per slice, intercept -1024, files out of order.
    series = tmp_path / "dicom" / "case000"
    write_series(series, reorient(volume, "LPS"), series="1.2.826.0.1.3680043.8.498.1")
    runs = {}
    for name, ct in (("nifti", nifti), ("dicom", series)):
        runs[name] = run_predict(predict_config(checkpoint, tmp_path / name, ct=ct, seg=seg))
        assert [s.status for s in runs[name].scans] == ["ok"]
    expected = read_predictions(runs["nifti"].out / "predictions.csv")
    got = read_predictions(runs["dicom"].out / "predictions.csv")
    assert got.keys == expected.keys and len(got.keys) >= 5
    # Crops agree to 1 HU (rounding), so the probabilities agree closely.
    np.testing.assert_allclose(got.probs, expected.probs, rtol=0, atol=1e-4)
    summary = json.loads((runs["dicom"].out / "summary.json").read_text())
    assert summary["scans"][0]["source_orientation"] == "LPS"

    def crops(ct: Path) -> list[np.ndarray]:
        case = Case(case="case000", patient="p", ct=ct, seg=seg, ct_name="", seg_name="")
        return cut_scan(
            case,
            predict_config(checkpoint, tmp_path, ct=ct, seg=seg),
            seg,
            levels=LEVELS,
            segmented=False,
        )[2].crops

    for a, b in zip(crops(series), crops(nifti), strict=True):
        assert a.level == b.level
        assert np.abs(a.array.astype(np.int32) - b.array.astype(np.int32)).max() <= 1


def test_dicom_folder_with_two_series_reads_the_larger_or_the_one_asked_for(
    raw, checkpoint, tmp_path
):
    seg = raw / "seg" / "case000.nii.gz"
    volume = reorient(load_ct(raw / "ct" / "case000.nii.gz"), "LPS")
    folder = tmp_path / "case000"
    write_series(folder, volume, series="1.2.3.10")
    # A second, smaller series (a scout-like cut-out) in the same folder.
    from vctmae.ingest.nifti import Volume

    part = Volume(path=volume.path, data=volume.data[:, :, :20], affine=volume.affine)
    write_series(folder, part, series="1.2.3.20", seed=1)
    chosen = run_predict(predict_config(checkpoint, tmp_path / "largest", ct=folder, seg=seg))
    assert chosen.scans[0].ok and len(chosen.scans[0].vertebrae) >= 5
    # The small series does not match the label map's grid: a clear one-line failure.
    asked = run_predict(
        predict_config(checkpoint, tmp_path / "asked", ct=folder, seg=seg, series="1.2.3.20")
    )
    [scan] = asked.scans
    assert not scan.ok and "\n" not in scan.error and str(seg) in scan.error
    unknown = run_predict(
        predict_config(checkpoint, tmp_path / "unknown", ct=folder, seg=seg, series="9.9")
    )
    assert "no series 9.9" in unknown.scans[0].error


# --- the report ---------------------------------------------------------------------------


class Links(HTMLParser):
    """Every src= and href= of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)


def links_of(page: Path) -> list[str]:
    parser = Links()
    parser.feed(page.read_text())
    return parser.links


def svg_texts(path: Path) -> str:
    """The text of an SVG's <text> elements (matplotlib with svg.fonttype 'none')."""
    return " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text()))


def test_report_has_a_page_per_scan_every_picture_and_every_level(predicted):
    out = predicted.out
    rows = read_rows(out / "predictions.csv")
    assert list(rows[0]) == [*PREDICTION_COLUMNS, *EXTRA_COLUMNS]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scans_ok"] == 2 and summary["scans_failed"] == 0
    assert summary["run"]["threshold"]["source"] == "default"
    assert summary["run"]["versions"]["torch"] == torch.__version__
    index_links = links_of(out / "index.html")
    for scan in summary["scans"]:
        page = out / scan["page"]
        assert page.is_file() and scan["page"] in index_links
        for link in links_of(page):
            if not link.startswith("#"):
                assert (page.parent / link).resolve().is_file(), (page, link)
        # The overview names every level predicted for this case, with its probability.
        mine = [r for r in rows if r["case"] == scan["case"]]
        assert len(mine) == scan["vertebrae_assessed"] >= 5
        texts = svg_texts(page.parent / "overview.svg")
        for row in mine:
            assert f"{row['level']}  {float(row['prob_fracture']):.2f}" in texts
            assert (page.parent / f"{row['level']}.png").stat().st_size > 10_000
        for skipped in scan["not_assessed"]:
            assert f"{skipped['level']}  not assessed" in texts
        fractured = [r["level"] for r in mine if r["predicted"] == "1"]
        assert scan["fractured_levels"] == fractured
        assert set(scan["timings_s"]) >= {"read_and_crop", "model", "report"}
    for link in index_links:
        assert (out / link).is_file(), link


def test_report_rows_follow_the_threshold(raw, checkpoint, predicted, tmp_path):
    probs = sorted(float(r["prob_fracture"]) for r in read_rows(predicted.out / "predictions.csv"))
    middle = (probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2
    result = run_predict(
        predict_config(
            checkpoint, tmp_path, src=raw, threshold=middle, attention=False, levels="all"
        )
    )
    rows = read_rows(tmp_path / "predictions.csv")
    assert all(float(r["threshold"]) == pytest.approx(middle, abs=1e-6) for r in rows)
    assert all((float(r["prob_fracture"]) >= middle) == (r["predicted"] == "1") for r in rows)
    assert any(r["predicted"] == "1" for r in rows) and any(r["predicted"] == "0" for r in rows)
    # levels=all assesses what T1-T12,L1-L6 left out, if anything; never fewer.
    assert len(rows) >= len(probs)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["threshold"] == {
        "value": middle,
        "source": "--threshold",
        "detail": "given with --threshold",
    }
    page = (tmp_path / result.scans[0].page).read_text()
    assert "Fracture suspected at" in page or "No fracture suspected" in page
    assert not list(tmp_path.glob("*/*.png"))  # --no-attention draws no frames


# --- the decision threshold ---------------------------------------------------------------


def test_f1_optimal_threshold_is_the_best_of_every_cut():
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.integers(0, 2, size=40)
        labels[0] = 1
        # Rounded: ties between probabilities must be cut together.
        probs = np.round(np.clip(0.3 * labels + rng.normal(0.35, 0.2, size=40), 0, 1), 2)
        threshold, f1 = f1_optimal_threshold(labels, probs)
        best = max(sk.f1_score(labels, probs >= t) for t in np.unique(probs))
        assert f1 == pytest.approx(best)
        assert sk.f1_score(labels, probs >= threshold) == pytest.approx(best)
        # Halfway between two validation probabilities (or at one, at the bottom).
        assert threshold in probs or not np.any(np.isclose(probs, threshold, atol=1e-12))
    assert f1_optimal_threshold(np.zeros(5, int), np.linspace(0, 1, 5)) is None
    # A perfectly separated set is cut between its classes.
    threshold, f1 = f1_optimal_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.9]))
    assert f1 == 1.0 and threshold == pytest.approx(0.25)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A short finetuning run with validation data (so a threshold is recorded)."""
    root = tmp_path_factory.mktemp("ft-threshold")
    train = write_split(root / "data", "train", 24, seed=11)
    val = write_split(root / "data", "val", 16, seed=12)
    test = write_split(root / "data", "test", 12, seed=13)
    run = RunOptions(shards=tuple(map(str, train)), out=root / "ft", **TEST_RUN)
    result = run_finetune(
        FinetuneConfig(
            run=run,
            val_shards=tuple(map(str, val)),
            epochs=2,
            warmup_epochs=1,
            batch_size=8,
            lr=1e-3,
            multiview=1,
        )
    )
    return result, [str(p) for p in val], [str(p) for p in test]


def test_finetuning_records_the_validation_optimal_threshold(finetuned, tmp_path):
    result, val, _ = finetuned
    recorded = read_threshold(result.best_path)
    assert recorded is not None and recorded.epoch == result.state.best_epoch
    assert threshold_path(result.best_path).name == "best.threshold.json"
    # The best checkpoint's own validation predictions give that threshold.
    run_eval(eval_config(result.best_path, val, tmp_path / "val", multiview=recorded.multiview))
    predictions = read_predictions(tmp_path / "val" / "predictions.csv")
    threshold, f1 = f1_optimal_threshold(predictions.labels, predictions.probs)
    assert recorded.threshold == pytest.approx(threshold, abs=1e-6)
    assert recorded.f1 == pytest.approx(f1)
    assert recorded.f1_at_half == pytest.approx(
        sk.f1_score(predictions.labels, predictions.probs >= 0.5)
    )
    assert recorded.samples == 16 and recorded.positives == 8


def test_eval_reports_metrics_at_half_and_at_the_recorded_threshold(finetuned, tmp_path):
    result, _, test = finetuned
    recorded = read_threshold(result.best_path)
    metrics = run_eval(eval_config(result.best_path, test, tmp_path))
    # The checkpoint's own rule: finetuning validated on one view.
    assert metrics["multiview"] == recorded.multiview == 1
    predictions = read_predictions(tmp_path / "predictions.csv")
    labels, probs = predictions.labels, predictions.probs
    tuned = json.loads((tmp_path / "metrics.json").read_text())["at_validation_threshold"]
    assert tuned == metrics["at_validation_threshold"]
    assert tuned["threshold"] == recorded.threshold and tuned["threshold_epoch"] == recorded.epoch
    assert tuned["f1"] == pytest.approx(sk.f1_score(labels, probs >= recorded.threshold))
    assert tuned["accuracy"] == pytest.approx(
        sk.accuracy_score(labels, probs >= recorded.threshold)
    )
    assert metrics["f1"] == pytest.approx(sk.f1_score(labels, probs >= 0.5))
    # Without a recorded threshold, only the metrics at 0.5.
    threshold_path(result.best_path).rename(tmp_path / "kept.json")
    try:
        plain = run_eval(eval_config(result.best_path, test, tmp_path / "plain", multiview=1))
    finally:
        (tmp_path / "kept.json").rename(threshold_path(result.best_path))
    assert "at_validation_threshold" not in plain
    # Six views give other probabilities: the one-view threshold does not hold for them.
    six = run_eval(eval_config(result.best_path, test, tmp_path / "six", multiview=6))
    assert "at_validation_threshold" not in six
    assert "--multiview 1" in six["validation_threshold_unused"]


def test_predict_decides_at_the_recorded_threshold_unless_told(finetuned, raw, tmp_path):
    result, _, _ = finetuned
    recorded = read_threshold(result.best_path)
    ct, seg = raw / "ct" / "case001.nii.gz", raw / "seg" / "case001.nii.gz"
    chosen = run_predict(
        predict_config(result.best_path, tmp_path / "a", ct=ct, seg=seg, attention=False)
    )
    assert chosen.threshold.value == recorded.threshold and chosen.threshold.source == "validation"
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["run"]["threshold"]["value"] == recorded.threshold
    assert f"epoch {recorded.epoch}" in summary["run"]["threshold"]["detail"]
    rows = read_rows(tmp_path / "a" / "predictions.csv")
    assert all(
        (float(r["prob_fracture"]) >= recorded.threshold) == (r["predicted"] == "1") for r in rows
    )
    told = run_predict(
        predict_config(
            result.best_path, tmp_path / "b", ct=ct, seg=seg, attention=False, threshold=0.9
        )
    )
    assert told.threshold.value == 0.9 and told.threshold.source == "--threshold"


def test_a_threshold_never_pairs_with_other_weights(checkpoint, tmp_path):
    import vctmae.infer.threshold as module

    files = model_files(build_classifier("tiny", num_classes=2, **SMALL_MODEL))
    path = tmp_path / "best.safetensors"
    first = DecisionThreshold(
        threshold=0.3, f1=0.8, f1_at_half=0.7, epoch=1, samples=10, positives=5,
        frames="crop", multiview=1, combine="probs",
    )  # fmt: skip
    write_best(files, path, first)
    assert read_threshold(path) == first

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    original = module.write_model
    module.write_model = full_disk
    try:
        with pytest.raises(OSError):
            write_best(files, path, DecisionThreshold(**{**first.__dict__, "epoch": 2}))
    finally:
        module.write_model = original
    # The old weights stay, without a threshold (readers decide at 0.5 and say so).
    assert path.is_file() and read_threshold(path) is None
    threshold_path(path).write_text("{not json")
    with pytest.raises(Exception, match="best.threshold.json: unreadable decision threshold"):
        read_threshold(path)


# --- a bad scan is reported and the rest go on ----------------------------------------------


def predict_with_failures(checkpoint: Path, src: Path, out: Path):
    """`vctmae predict --src src` (no attention pictures) where some scans fail: it exits 1."""
    result = cli("predict", "--checkpoint", checkpoint, "--src", src, "--out", out,
                 "--device", "cpu", "--no-attention")  # fmt: skip
    assert result.exit_code == 1, result.output
    return result


def test_bad_scans_are_named_in_one_line_and_the_rest_go_on(raw, checkpoint, tmp_path):
    src = linked_source(tmp_path / "src", raw, ("case000", "case001"))
    (src / "ct" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (src / "seg" / "broken.nii.gz").symlink_to(raw / "seg" / "case000.nii.gz")
    (src / "ct" / "alone.nii.gz").symlink_to(raw / "ct" / "case000.nii.gz")
    # A DICOM series with a slice missing.
    files = write_series(
        src / "ct" / "gappy", reorient(load_ct(raw / "ct" / "case001.nii.gz"), "LPS")
    )
    files[len(files) // 2].unlink()
    (src / "seg" / "gappy.nii.gz").symlink_to(raw / "seg" / "case001.nii.gz")
    out = tmp_path / "out"
    result = predict_with_failures(checkpoint, src, out)
    lines = error_lines(result.output)
    assert len(lines) == 4, result.output
    assert any("ct/broken.nii.gz" in line for line in lines)
    assert any("ct/alone.nii.gz: no label map seg/alone.nii.gz" in line for line in lines)
    assert any("gappy" in line and "uneven slice spacing" in line for line in lines)
    assert "3 scan(s) failed" in lines[-1]
    assert "Traceback" not in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scans_ok"] == 2 and summary["scans_failed"] == 3
    status = {scan["case"]: scan["status"] for scan in summary["scans"]}
    assert status == {
        "alone": "failed",
        "broken": "failed",
        "case000": "ok",
        "case001": "ok",
        "gappy": "failed",
    }
    # Every scan has a page, the failed ones saying why.
    for scan in summary["scans"]:
        page = (out / scan["page"]).read_text()
        if scan["status"] == "failed":
            assert "Not assessed:" in page
    index = (out / "index.html").read_text()
    assert index.count("failed:") == 3


def test_unreadable_dicom_folders_and_label_maps_without_a_ct_fail_by_name(
    raw, checkpoint, tmp_path
):
    src = linked_source(tmp_path / "src", raw, ["case000"])
    unreadable = write_unreadable_dicom_folders(src, raw)
    (src / "seg" / "orphan.nii.gz").symlink_to(raw / "seg" / "case001.nii.gz")
    out = tmp_path / "out"
    result = predict_with_failures(checkpoint, src, out)
    lines = error_lines(result.output)
    for case, words in unreadable.items():
        assert sum(f"ct/{case}: " in line and words in line for line in lines) == 1, lines
    assert sum("seg/orphan.nii.gz: no CT ct/orphan.nii.gz" in line for line in lines) == 1
    assert "4 scan(s) failed" in lines[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scans_ok"] == 1 and summary["scans_failed"] == 4
    assert {scan["case"] for scan in summary["scans"]} == {"case000", "orphan", *unreadable}


def test_every_vertebra_label_is_assessed_or_listed_beside_a_value_no_scheme_uses(
    raw, checkpoint, tmp_path
):
    import nibabel as nib

    seg = nib.load(raw / "seg" / "case000.nii.gz")
    data = np.asanyarray(seg.dataobj).copy()
    assert not data[2:16, 2:16, 2:16].any()
    data[2:16, 2:16, 2:16] = 100  # a blob of a value that is a vertebra in no scheme
    edited = tmp_path / "blob.nii.gz"
    nib.save(nib.Nifti1Image(data, seg.affine, seg.header), edited)
    out = tmp_path / "out"
    result = run_predict(
        predict_config(checkpoint, out, ct=raw / "ct" / "case000.nii.gz", seg=edited, levels="L1",
               multiview=1, attention=False)
    )  # fmt: skip
    [scan] = json.loads((out / "summary.json").read_text())["scans"]
    assert scan["status"] == "ok" and scan["label_scheme"] == "verse", scan
    in_map = {VERSE[value] for value in np.unique(data).tolist() if value in VERSE}
    assessed = [v["level"] for v in scan["vertebrae"]]
    listed = {n["level"]: n["reason"] for n in scan["not_assessed"]}
    assert assessed == ["L1"] and len(in_map) >= 4
    assert set(listed) == in_map - {"L1"}
    assert set(listed.values()) == {"level outside --levels"}
    assert len(result.scans[0].vertebrae) == 1


def test_progress_bar_counts_scans(raw, checkpoint, tmp_path):
    result = cli("predict", "--checkpoint", str(checkpoint), "--ct", str(raw / "ct" / "case000.nii.gz"),
                 "--seg", str(raw / "seg" / "case000.nii.gz"), "--out", str(tmp_path),
                 "--device", "cpu", "--no-attention", "--multiview", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1/1 scans" in result.output
    assert "1/1 scans ok" in result.output and "index.html" in result.output


def test_usage_errors_are_one_line_before_any_work(raw, checkpoint, tmp_path):
    ct, seg = str(raw / "ct" / "case000.nii.gz"), str(raw / "seg" / "case000.nii.gz")
    base = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), "--device", "cpu"]
    cases = [
        ([*base, "--ct", ct], "no label map: give --seg, or --segment"),
        ([*base, "--ct", ct, "--seg", seg, "--src", str(raw)], "not both"),
        ([*base], "give --src"),
        ([*base, "--ct", ct, "--seg", seg, "--threshold", "1.5"], "--threshold must lie in [0, 1]"),
        ([*base, "--ct", ct, "--seg", seg, "--levels", "X9"], "--levels"),
        ([*base, "--ct", ct, "--seg", seg, "--multiview", "3"], "--multiview must be 1 or 6"),
        ([*base, "--ct", str(tmp_path / "none.nii.gz"), "--seg", seg], "--ct does not exist"),
    ]
    for args, message in cases:
        result = cli("predict", *args)
        assert result.exit_code == 2, (args, result.output)
        [line] = error_lines(result.output)
        assert message in line, (message, line)
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError):
        PredictConfig(checkpoint=checkpoint, ct=Path(ct), seg=Path(seg), batch_size=0)


# --- TotalSegmentator (--segment) -------------------------------------------------------------------


def test_segment_without_totalsegmentator_says_what_to_install(
    raw, checkpoint, tmp_path, monkeypatch
):
    use_totalsegmentator(monkeypatch, None)
    result = cli("predict", "--checkpoint", str(checkpoint), "--ct", str(raw / "ct" / "case000.nii.gz"),
                 "--segment", "--out", str(tmp_path), "--device", "cpu")  # fmt: skip
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    assert "pip install 'vctmae[totalseg]'" in line
    assert not (tmp_path / "index.html").exists()


def test_segment_without_weights_says_to_set_totalseg_home_dir(
    raw, checkpoint, tmp_path, monkeypatch
):
    use_totalsegmentator(
        monkeypatch,
        "raise ConnectionError(\"Max retries exceeded (Failed to resolve 'github.com')\")\n",
        tmp_path / "fake",
    )
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "weights"))
    result = cli("predict", "--checkpoint", str(checkpoint), "--ct", str(raw / "ct" / "case000.nii.gz"),
                 "--segment", "--out", str(tmp_path / "out"), "--device", "cpu")  # fmt: skip
    assert result.exit_code == 1, result.output
    [line] = error_lines(result.output)
    assert "TOTALSEG_HOME_DIR" in line and str(tmp_path / "weights") in line
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


def test_segment_uses_totalsegmentators_label_map_and_keeps_it(
    real_ct_dir, checkpoint, tmp_path, monkeypatch
):
    calls = tmp_path / "calls.txt"
    use_totalsegmentator(
        monkeypatch,
        f"""
        import shutil
        assert ml and task == "total" and "vertebrae_L1" in roi_subset
        open({str(calls)!r}, "a").write(input + "\\n")
        shutil.copyfile({str(real_ct_dir / "seg.nii.gz")!r}, output)
        """,
        tmp_path / "fake",
    )
    ct = real_ct_dir / "ct.nii.gz"
    made = run_predict(predict_config(checkpoint, tmp_path / "made", ct=ct, segment=True))
    run_predict(
        predict_config(checkpoint, tmp_path / "given", ct=ct, seg=real_ct_dir / "seg.nii.gz")
    )
    [scan] = made.scans
    assert scan.ok and scan.segmented and scan.scheme == "totalseg"
    kept = tmp_path / "made" / "ct" / "vertebrae-totalseg.nii.gz"
    assert kept.read_bytes() == (real_ct_dir / "seg.nii.gz").read_bytes()
    a = read_predictions(tmp_path / "made" / "predictions.csv")
    b = read_predictions(tmp_path / "given" / "predictions.csv")
    assert a.keys == b.keys == ["ct_L1"] and np.array_equal(a.probs, b.probs)
    assert "made by TotalSegmentator" in (tmp_path / "made" / "ct" / "report.html").read_text()
    # A second run reuses the kept label map: TotalSegmentator runs once.
    run_predict(
        predict_config(
            checkpoint, tmp_path / "made", ct=ct, segment=True, attention=False, replace=True
        )
    )
    assert calls.read_text().count("\n") == 1


# --- the rule a model was trained with, and what eval, explain and predict do with it ---------------


def mask_model(folder: Path, rule: ClipRule) -> Path:
    """A small random classifier saved with `rule` as the rule it was finetuned with."""
    torch.manual_seed(3)
    model = build_classifier("tiny", num_classes=2, **SMALL_MODEL)
    return save_model(model, folder / "best.safetensors", clip=rule)


def test_eval_evaluates_exactly_the_selected_levels_and_says_how_many_it_left_out(
    checkpoint, ingested, tmp_path
):
    manifest = read_rows(ingested / "manifest.csv")
    kept = sorted(row["key"] for row in manifest if row["level"] in ("L1", "L2"))
    assert 0 < len(kept) < len(manifest)
    shards = sorted(str(p) for p in ingested.glob("*.tar"))
    from vctmae.cli import app

    result = CliRunner().invoke(
        app,
        ["eval", "--checkpoint", str(checkpoint), "--shards", *shards, "--levels", "L1,L2",
         "--workers", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{len(manifest) - len(kept)} crop(s) of other levels left out" in result.output
    predictions = read_predictions(tmp_path / "predictions.csv")
    assert predictions.keys == kept
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["left_out_by_levels"] == len(manifest) - len(kept)
    assert metrics["levels"] == "L1,L2"


def test_eval_applies_the_checkpoints_rule_and_says_when_a_flag_differs(ingested, tmp_path):
    rule = ClipRule(frames="mask", multiview=6, combine="logits", levels="T9-L5")
    weights = mask_model(tmp_path, rule)
    default = eval_predictions(weights, ingested, tmp_path / "default", multiview=None)
    levels = {key.rsplit("_", 1)[1] for key in default.keys}
    assert levels <= set(parse_levels("T9-L5")) and levels
    metrics = json.loads((tmp_path / "default" / "metrics.json").read_text())
    assert (metrics["frames"], metrics["combine"], metrics["multiview"]) == ("mask", "logits", 6)
    explicit = eval_predictions(
        weights, ingested, tmp_path / "explicit", frames="mask", combine="logits",
        loader=LoaderOptions(workers=0, levels="T9-L5"),
    )  # fmt: skip
    assert explicit.keys == default.keys
    np.testing.assert_array_equal(explicit.probs, default.probs)
    # Another rule, asked for explicitly, is used — and said.
    from vctmae.clip import resolve_rule

    crop_mode, lines = resolve_rule(rule, who="w", frames="crop")
    assert crop_mode.frames == "crop" and len(lines) == 1 and "--frames mask" in lines[0]
    other = eval_predictions(weights, ingested, tmp_path / "crop", frames="crop", multiview=None)
    assert other.keys == default.keys
    assert np.abs(other.probs - default.probs).max() > 1e-4


def test_predict_and_its_pictures_follow_the_checkpoints_frame_rule(raw, ingested, tmp_path):
    rule = ClipRule(frames="mask", multiview=6, combine="probs", levels=REFERENCE_LEVELS)
    weights = mask_model(tmp_path, rule)
    result = run_predict(predict_config(weights, tmp_path / "report", src=raw))
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["run"]["rule"] == rule.to_json()
    # The precision that ran: --precision auto as this CPU resolves it.
    auto = resolve_precision("auto", torch.device("cpu"), inference=True)
    assert summary["run"]["precision"] == auto
    # The same probabilities as eval under the same (recorded) rule.
    expected = eval_predictions(weights, ingested, tmp_path / "eval", multiview=None)
    got = read_predictions(tmp_path / "report" / "predictions.csv")
    order = np.argsort(got.keys)
    assert [got.keys[i] for i in order] == expected.keys
    np.testing.assert_allclose(got.probs[order], expected.probs, rtol=0, atol=1e-5)
    # The pictures show the mask-mode frames of the middle view: over the vertebra's own extent.
    from vctmae import clip
    from vctmae.predict.run import Predictor

    predictor = Predictor(predict_config(weights, tmp_path / "unused", src=raw))
    case = Case(case="case000", patient="case000", ct=raw / "ct" / "case000.nii.gz",
                seg=raw / "seg" / "case000.nii.gz", ct_name="ct", seg_name="seg")  # fmt: skip
    _, _, cut = cut_scan(case, predict_config(weights, tmp_path / "x", src=raw), case.seg,
                         levels=LEVELS, segmented=False)  # fmt: skip
    crop = cut.crops[0]
    _, (shown,) = predictor.assess([crop.array], [tuple(crop.bbox)], attention=True)
    extent = clip.extent_from_bbox(crop.bbox)
    assert shown["slices"] == tuple(clip.frame_indices("mask", 0, extent))
    assert shown["slices"] != tuple(3 + 6 * k for k in range(16))
    assert result.vertebrae == len(expected.keys)


def test_a_threshold_holds_only_for_the_rule_it_was_measured_with(raw, tmp_path):
    rule = ClipRule(frames="crop", multiview=6, combine="probs")
    weights = mask_model(tmp_path, rule)
    record = DecisionThreshold(
        threshold=0.37, f1=0.8, f1_at_half=0.7, epoch=2, samples=10, positives=5,
        frames="crop", multiview=6, combine="probs",
    )  # fmt: skip
    threshold_path(weights).write_text(json.dumps(record.to_json()))
    ct, seg = raw / "ct" / "case001.nii.gz", raw / "seg" / "case001.nii.gz"
    same = run_predict(predict_config(weights, tmp_path / "a", ct=ct, seg=seg, attention=False))
    assert (same.threshold.value, same.threshold.source) == (0.37, "validation")
    for name, changes in (("b", {"multiview": 1}), ("c", {"combine": "logits"})):
        other = run_predict(
            predict_config(weights, tmp_path / name, ct=ct, seg=seg, attention=False, **changes)
        )
        assert (other.threshold.value, other.threshold.source) == (0.5, "default")
        assert "measured with --frames crop --multiview 6 --combine probs" in other.threshold.detail


# --- checkpoints and threshold files that no longer say what they hold -------------------------------


def test_an_edited_model_description_is_refused(tmp_path):
    from vctmae.model.checkpoint import CheckpointError, config_path, load_classifier

    weights = mask_model(tmp_path, ClipRule())
    description = json.loads(config_path(weights).read_text())
    load_classifier(weights)  # as written: loads
    for edit in (
        {"config": {**description["config"], "num_heads": 4}},
        {"config": {**description["config"], "input_std": 2.0}},
        {"config": {**description["config"], "input_mean": 0.25}},
        {"clip": {**description["clip"], "frames": "mask"}},
    ):
        config_path(weights).write_text(json.dumps({**description, **edit}))
        with pytest.raises(CheckpointError, match="does not describe the weights"):
            load_classifier(weights)
    config_path(weights).write_text(json.dumps({**description, "version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_classifier(weights)
    # A version-1 description (no digest) is still read, but every field must have its type.
    old = {**description, "version": 1, "config": {**description["config"], "num_heads": "2"}}
    config_path(weights).write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="num_heads must be of type int"):
        load_classifier(weights)
    old["config"]["num_heads"] = True
    config_path(weights).write_text(json.dumps(old))
    with pytest.raises(CheckpointError, match="num_heads must be of type int"):
        load_classifier(weights)


def test_an_ill_typed_threshold_file_is_refused(tmp_path):
    from vctmae.model.checkpoint import CheckpointError

    weights = mask_model(tmp_path, ClipRule())
    good = DecisionThreshold(
        threshold=0.4, f1=0.8, f1_at_half=0.7, epoch=2, samples=10, positives=5,
        frames="crop", multiview=6, combine="probs",
    ).to_json()  # fmt: skip
    for change in ({"threshold": True}, {"multiview": 0}, {"epoch": "2"}, {"threshold": 1.5},
                   {"combine": "mean"}, {"extra": 1}):  # fmt: skip
        threshold_path(weights).write_text(json.dumps({**good, **change}))
        with pytest.raises(CheckpointError, match="unreadable decision threshold"):
            read_threshold(weights)
    missing = {key: value for key, value in good.items() if key != "frames"}
    threshold_path(weights).write_text(json.dumps(missing))
    with pytest.raises(CheckpointError, match="missing"):
        read_threshold(weights)


# --- report folders, reused --out, interruptions ---------------------------------------------------


def test_a_long_case_id_gets_a_short_folder_and_keeps_its_name(raw, checkpoint, tmp_path):
    from vctmae.predict.results import MAX_FOLDER, case_folder

    long_id = "patient-" + "x" * 292
    other = "patient-" + "x" * 291 + "y"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "ct,seg,case\n"
        f"{raw / 'ct' / 'case000.nii.gz'},{raw / 'seg' / 'case000.nii.gz'},{long_id}\n"
        f"{raw / 'ct' / 'case001.nii.gz'},{raw / 'seg' / 'case001.nii.gz'},{other}\n"
    )
    result = run_predict(predict_config(checkpoint, tmp_path / "out", pairs=pairs, attention=False))
    assert not result.failed
    folders = [case_folder(long_id), case_folder(other)]
    assert len(set(folders)) == 2 and all(len(folder) <= MAX_FOLDER for folder in folders)
    for folder in folders:
        assert (tmp_path / "out" / folder / "report.html").is_file()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [scan["case"] for scan in summary["scans"]] == [long_id, other]
    rows = read_rows(tmp_path / "out" / "predictions.csv")
    assert {row["case"] for row in rows} == {long_id, other}
    assert long_id in (tmp_path / "out" / folders[0] / "report.html").read_text()


def test_a_reused_out_is_refused_unless_replaced_and_no_page_outlives_its_run(
    raw, checkpoint, tmp_path
):
    out = tmp_path / "report"
    run_predict(predict_config(checkpoint, out, src=raw, attention=False))
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"case000", "case001"}
    ct, seg = raw / "ct" / "case001.nii.gz", raw / "seg" / "case001.nii.gz"
    result = cli("predict", "--checkpoint", str(checkpoint), "--ct", str(ct), "--seg", str(seg),
                 "--out", str(out), "--device", "cpu", "--no-progress")  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert "earlier predict run" in line and "--replace" in line
    (out / "notes.txt").write_text("kept")
    run_predict(predict_config(checkpoint, out, ct=ct, seg=seg, attention=False, replace=True))
    # Only the new run's case remains; a file of the user's stays.
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"case001"}
    assert (out / "notes.txt").read_text() == "kept"
    summary = json.loads((out / "summary.json").read_text())
    assert [scan["case"] for scan in summary["scans"]] == ["case001"]


def test_summary_names_the_checkpoint_as_given_and_absolute(raw, checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(checkpoint.parent)
    ct, seg = raw / "ct" / "case001.nii.gz", raw / "seg" / "case001.nii.gz"
    run_predict(
        predict_config(Path(checkpoint.name), tmp_path / "r", ct=ct, seg=seg, attention=False)
    )
    facts = json.loads((tmp_path / "r" / "summary.json").read_text())["run"]
    assert facts["checkpoint"] == checkpoint.name
    assert facts["checkpoint_path"] == str(checkpoint.resolve())


def test_ctrl_c_before_the_first_scan_says_no_report_exists(raw, checkpoint, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vctmae.predict.run.cut_scan", interrupt)
    result = cli("predict", "--checkpoint", str(checkpoint), "--src", str(raw), "--out", str(tmp_path / "r"),
                 "--device", "cpu", "--no-progress")  # fmt: skip
    assert result.exit_code == 130
    assert "no report was written" in result.output
    assert not (tmp_path / "r" / "summary.json").exists()


def test_case_ids_in_any_script_draw_without_font_warnings(raw, checkpoint, tmp_path):
    import warnings

    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        f"ct,seg,case\n{raw / 'ct' / 'case000.nii.gz'},{raw / 'seg' / 'case000.nii.gz'},患者一号\n",
        encoding="utf-8",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_predict(
            predict_config(checkpoint, tmp_path / "out", pairs=pairs, attention=False)
        )
    assert not result.failed
    assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
    page = (tmp_path / "out" / result.scans[0].folder / "report.html").read_text(encoding="utf-8")
    assert "患者一号" in page


def test_explain_draws_the_view_of_the_checkpoints_rule(ingested, tmp_path):
    from vctmae import clip
    from vctmae.infer.config import ExplainConfig
    from vctmae.infer.explain import run_explain

    rule = ClipRule(frames="mask", multiview=6, combine="probs", levels=REFERENCE_LEVELS)
    weights = mask_model(tmp_path, rule)
    expected = eval_predictions(weights, ingested, tmp_path / "eval", multiview=None)
    key = expected.keys[0]
    store = ZarrCrops(ingested / "crops.zarr")
    extent = clip.extent_from_bbox(store.bbox(key))
    summary = run_explain(
        ExplainConfig(
            checkpoint=weights, zarr=ingested / "crops.zarr", key=key, out=tmp_path / "x.png"
        )  # fmt: skip
    )
    assert summary["prob_multiview"] == pytest.approx(expected.probs[0], abs=1e-5)
    assert summary["precision"] == resolve_precision("auto", torch.device("cpu"), inference=True)
    assert (tmp_path / "x.png").stat().st_size > 10_000
    # A shift outside the vertebra's views is refused, naming them.
    views = clip.view_shifts("mask", extent)
    with pytest.raises(UsageError, match="--offset 40"):
        run_explain(
            ExplainConfig(
                checkpoint=weights,
                zarr=ingested / "crops.zarr",
                key=key,
                out=tmp_path / "y.png",
                offset=40,
            )  # fmt: skip
        )
    assert 40 not in views
