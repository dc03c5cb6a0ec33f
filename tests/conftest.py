"""Shared test fixtures.

The real-CT fixture (a 3 mm abdominal CT with a TotalSegmentator label map) is
kept out of the repository. It is found through `$VCTMAE_REAL_CT`, else at
`../shared/data/real-ct` beside the checkout. On a plain clone without it, the
tests that need it skip with one line saying so; with
`VCTMAE_REQUIRE_REAL_CT=1` (set by `.ci/run`, where the fixture exists) they
fail instead, so CI can never skip them silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def real_ct_location() -> Path:
    configured = os.environ.get("VCTMAE_REAL_CT")
    return Path(configured) if configured else REPO.parent / "shared" / "data" / "real-ct"


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """Folder holding the real CT's `ct.nii.gz` and `seg.nii.gz`."""
    folder = real_ct_location()
    if (folder / "ct.nii.gz").is_file() and (folder / "seg.nii.gz").is_file():
        return folder
    reason = (
        f"real-CT fixture not found at {folder} "
        "(set VCTMAE_REAL_CT to a folder with ct.nii.gz and seg.nii.gz)"
    )
    if os.environ.get("VCTMAE_REQUIRE_REAL_CT") == "1":
        pytest.fail(f"{reason}; VCTMAE_REQUIRE_REAL_CT=1 forbids skipping it")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def easy_data(tmp_path_factory) -> dict[str, list[str]]:
    """Labelled easy crops (`helpers.easy_crop`): train, val and test shards."""
    from helpers import write_split

    root = tmp_path_factory.mktemp("easy")
    return {
        "train": [str(p) for p in write_split(root, "train", 32, seed=1)],
        "val": [str(p) for p in write_split(root, "val", 12, seed=2)],
        "test": [str(p) for p in write_split(root, "test", 16, seed=3, shards=2)],
    }


@pytest.fixture(scope="session")
def finetuned(easy_data, tmp_path_factory):
    """A tiny classifier pretrained one epoch and finetuned five on `easy_data` (it tells the
    classes apart)."""
    from helpers import TEST_RUN, finetune_config, pretrain_config

    from vctmae.train.config import RunOptions
    from vctmae.train.finetune import run_finetune
    from vctmae.train.pretrain import run_pretrain

    out = tmp_path_factory.mktemp("ft")
    pre = run_pretrain(
        pretrain_config(easy_data["train"], out / "pre", epochs=1, warmup_epochs=0, preview=False)
    )
    run = RunOptions(
        shards=tuple(easy_data["train"]), out=out / "ft", init=pre.model_path, **TEST_RUN
    )
    return run_finetune(finetune_config(run, easy_data["val"]))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Two phantoms in ct/ + seg/ (one stored LAS, one ASL), made afresh for each test module."""
    from vctmae.synth import SynthConfig
    from vctmae.synth.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("raw")
    write_phantoms(SynthConfig(out=root / "raw", cases=2, seed=0))
    return root / "raw"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small random classifier (its probabilities vary from crop to crop), one per test
    module."""
    from helpers import random_classifier

    return random_classifier(tmp_path_factory.mktemp("model"))


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `cuda` (run by benchmarks/gpu_check.sh as `pytest -m cuda`) skip, saying
    why, where torch sees no GPU: the one rule for every CUDA-only test."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
