"""The peers and floors `vctmae bench` measures against (benchmarks/peers/, `vctmae.bench`).

A peer must do the work it stands for — the paper code's MONAI data path gives the
paper's model input, the MONAI crop recipe cuts 96³ int16 crops centred on each
vertebra — and the decode floor must read the same voxels ingest reads; predict's model
floor times the forward passes of predict's own clip rule; without the checkout's peers the
benchmark says so in one line. Small fresh inputs: seconds.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import SMALL_MODEL, write_split
from typer.testing import CliRunner

import vctmae.cli.bench  # noqa: F401  (registers the commands)
from vctmae.bench import peers
from vctmae.bench.ingest import decode_only
from vctmae.bench.peers import load_peer
from vctmae.cli.app import app
from vctmae.errors import VctmaeError
from vctmae.ingest.nifti import read_nifti_ct


def test_a_missing_peer_is_named_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(VctmaeError) as error:
        load_peer("paper_monai", folder=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "paper_monai.py") in message and "checkout" in message
    # The command stops before doing any work, with that line and exit code 1.
    monkeypatch.setattr(peers, "PEERS", tmp_path)
    for command in ("loader", "ingest"):
        result = CliRunner().invoke(app, ["bench", command, "--quick"])
        assert result.exit_code == 1, result.output
        assert f"{tmp_path}" in result.output and "checkout" in result.output


def test_the_paper_monai_path_gives_the_papers_model_input(tmp_path):
    paper = load_peer("paper_monai")
    # Each sagittal slice i of a crop holds one value, -1000 + 50 i HU (0.025 i once scaled),
    # so a frame tells which slice it came from.
    slices = -1000 + 50 * np.arange(40, dtype=np.int16)
    crops = np.broadcast_to(slices[None, :, None, None], (4, 40, 40, 40)).astype(np.int16)
    label_maps = np.zeros(crops.shape, dtype=np.uint8)
    label_maps[:, 10:30, 12:28, 8:30] = 20  # the vertebra: sagittal slices 10-29
    label_maps[:, 32:38] = 19  # its neighbour, not part of the mask
    records = paper.write_records(tmp_path, crops, label_maps, [20] * 4)
    assert {r["level_idx"] for r in records} == {20}
    assert all("/raw/" in r["image"] and "/seg/" in r["mask"] for r in records)
    batches = list(paper.paper_loader(records, batch_size=2, workers=0, seed=1))
    assert len(batches) == 2
    for batch in batches:
        images = batch["image"].numpy()
        assert images.shape == (2, 3, 16, 96, 96)
        # Grey frames repeated into three channels.
        assert np.array_equal(images[:, 0], images[:, 1])
        assert np.array_equal(images[:, 0], images[:, 2])
        # 16 frames spread over the mask's sagittal extent only, in order; each frame the
        # crop's 40 x 40 slice padded with zeros to 96 x 96.
        source = np.rint(images[:, 0].max(axis=(2, 3)) / 0.025)
        assert source.min() >= 10 and source.max() <= 29
        assert np.all(np.diff(source, axis=1) >= 0) and np.all(source[:, -1] - source[:, 0] >= 15)
        assert np.count_nonzero(images[0, 0, 0].any(axis=1)) == 40


def test_the_monai_crop_recipe_cuts_96_cubes_at_each_vertebra(tmp_path):
    crops = load_peer("monai_crops")
    rng = np.random.default_rng(2)
    shape = (150, 140, 160)
    ct = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[60:80, 50:70, 40:60] = 20
    labels[60:80, 50:70, 80:100] = 19
    affine = np.diag([0.8, 0.8, 1.0, 1.0])  # RAS, resampled to 1 mm by the recipe
    for kind, data in (("ct", ct), ("seg", labels)):
        (tmp_path / kind).mkdir()
        nib.save(nib.Nifti1Image(data, affine), tmp_path / kind / "case.nii.gz")
    out = tmp_path / "out"
    saved = crops.monai_crops(
        tmp_path / "ct" / "case.nii.gz", tmp_path / "seg" / "case.nii.gz", [19, 20, 21], out
    )
    assert saved == 2  # 21 is not in the map
    for value in (19, 20):
        image = nib.load(out / f"case_{value}.nii.gz")
        assert image.shape == (96, 96, 96) and image.get_data_dtype() == np.int16
        assert np.allclose(image.header.get_zooms(), 1.0)
        # Centred on the vertebra: the crop's middle lies at its centroid (world mm).
        centroid = affine[:3, :3] @ np.argwhere(labels == value).mean(axis=0)
        middle = image.affine[:3, :3] @ np.full(3, 48.0) + image.affine[:3, 3]
        assert np.abs(middle - centroid).max() <= 1.5


def test_decode_only_reads_the_voxels_ingest_reads(tmp_path, real_ct_dir):
    path = real_ct_dir / "ct.nii.gz"
    voxels = decode_only(path)
    assert voxels.size == int(np.prod(nib.load(path).shape))
    stored = read_nifti_ct(path).data
    np.testing.assert_array_equal(voxels, stored.ravel(order="F"))


@pytest.fixture
def predict_inputs(tmp_path):
    """A predict configuration of a small random classifier, and two shards of crops."""
    from vctmae.model import build_classifier
    from vctmae.model.checkpoint import save_model
    from vctmae.predict.config import PredictConfig

    torch.manual_seed(0)
    model = build_classifier("tiny", num_classes=2, **SMALL_MODEL)
    checkpoint = save_model(model, tmp_path / "model.safetensors")
    shards = [str(path) for path in write_split(tmp_path / "data", "test", 2, seed=5)]
    config = PredictConfig(
        checkpoint=checkpoint, src=tmp_path, out=tmp_path / "out", device="cpu", progress=False
    )
    return config, shards


def test_the_predict_model_floor_times_the_forward_passes_of_predicts_rule(predict_inputs):
    from vctmae.bench.predict import model_floor

    assert model_floor(*predict_inputs) > 0


def test_the_predict_bf16_agreement_compares_predicts_own_probabilities(predict_inputs):
    from vctmae.bench.predict import bf16_agreement

    difference = bf16_agreement(*predict_inputs)
    # bf16 keeps about 3 significant digits: the probabilities differ, but little.
    assert 0 < difference < 0.05
