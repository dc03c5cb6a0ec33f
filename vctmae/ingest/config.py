"""The configs of one ingest run, each command-line option of `vctmae ingest` declared once here.

`GeometryConfig` says how crops are cut from a case, `IngestConfig` which cases, where the
outputs go and how the run is spread over processes. Options given as text on the command line
(`--format wds,zarr`, `--levels T1-L6`, `--part 2/8`, `--shard-size 1GiB`) are accepted as that
text here too and parsed in `__post_init__`, so a config built in Python and one built from
flags hold the same values. Light at import (no scipy, zarr or torch): the command line imports
it to build its options.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from vctmae.clip import NUM_FRAMES, STRIDE
from vctmae.errors import UsageError
from vctmae.flags import flag
from vctmae.ingest.levels import LEVELS, SCHEMES, parse_levels

ALIGNMENTS = ("auto", "spline", "axis")
LABEL_SCHEMES = ("auto", *SCHEMES)
SERIES_HELP = (
    "SeriesInstanceUID to read from DICOM series folders (default: the CT series with the most "
    "slices)."
)
FORMATS = ("wds", "zarr")
EXECUTORS = ("process", "dask")
# The smallest `size` the training frame rule can sample: 16 frames `stride` 6 slices apart.
MIN_TRAINING_SIZE = NUM_FRAMES * STRIDE


@dataclass(frozen=True, kw_only=True)
class GeometryConfig:
    """How crops are cut from a case."""

    spacing: float = flag(1.0, "Isotropic voxel size of the crops, mm.")
    size: int = flag(96, "Crop edge length, voxels.")
    align: str = flag(
        "auto",
        "spline: follow a curve through the vertebra centroids; axis: scanner axes; auto: spline "
        "when a case has ≥ 3 vertebrae.",
    )
    # Keep only these levels; None keeps all. Text is parsed as `--levels` is.
    levels: frozenset[str] | str | None = flag(
        None, "Levels to keep, e.g. T1-L6 or T12,L1 (default: all)."
    )
    label_scheme: str = flag("auto", "Label map scheme: auto, verse or totalseg.")
    keep_truncated: bool = flag(False, "Also write vertebrae whose mask touches the scan border.")
    min_fragment_mm3: float = 1000.0  # smaller masks are skipped as fragments

    def __post_init__(self) -> None:
        if isinstance(self.levels, str):
            object.__setattr__(self, "levels", parse_levels(self.levels))
        if not (self.spacing > 0 and math.isfinite(self.spacing)):
            raise UsageError(f"spacing must be a positive number of mm, got {self.spacing}")
        if self.size < 1:
            raise UsageError(f"size must be at least 1 voxel, got {self.size}")
        if self.align not in ALIGNMENTS:
            raise UsageError(f"align must be one of {', '.join(ALIGNMENTS)}, got {self.align!r}")
        if self.label_scheme not in LABEL_SCHEMES:
            raise UsageError(
                f"label_scheme must be one of {', '.join(LABEL_SCHEMES)}, got {self.label_scheme!r}"
            )
        if self.levels is not None:
            unknown = sorted(set(self.levels) - set(LEVELS))
            if unknown:
                raise UsageError(f"unknown levels {unknown}; expected names like T12, L1")
        if self.min_fragment_mm3 < 0:
            raise UsageError(f"min_fragment_mm3 must be ≥ 0, got {self.min_fragment_mm3}")


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """One `vctmae ingest` run. Either `src`/`pairs` (extract) or `merge` (join part outputs)."""

    src: Path | None = flag(
        None,
        "Folder searched recursively for cases: ct/NAME.nii[.gz] (or a DICOM series folder "
        "ct/NAME/) + seg/NAME.nii[.gz], VerSe X_ct.nii.gz + X_seg-vert_msk.nii.gz (beside it or "
        "under derivatives/).",
    )
    out: Path = flag(
        help="Output folder: {split}-NNNNNN.tar shards, crops.zarr, manifest.csv, "
        "ingest-report.json."
    )
    labels: Path | None = flag(
        None,
        "labels.csv: case,level,fracture|grade[,split,patient]. Without it every crop is "
        "'unlabeled'.",
    )
    pairs: Path | None = flag(
        None,
        "pairs.csv: ct,seg[,case,patient,series] for any other layout (paths relative to the "
        "csv; ct may be a DICOM series folder).",
    )
    # Text: a comma-separated list.
    formats: frozenset[str] | str = flag(
        ",".join(FORMATS), "Outputs to write: wds, zarr or wds,zarr.", name="--format"
    )
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    # None: one per usable core (Dask LocalCluster: as many).
    workers: int | None = flag(None, "Worker processes (default: one per core).")
    executor: str = flag(
        "process",
        "Where cases are extracted: process (a pool on this machine) or dask (a Dask cluster; "
        "pip install 'vctmae\\[dask]').",
    )
    # None: a LocalCluster.
    scheduler: str | None = flag(
        None,
        "Dask scheduler address (e.g. tcp://host:8786) for --executor dask; without it a "
        "LocalCluster of --workers processes. --out must be on storage the workers share.",
    )
    series: str | None = flag(None, SERIES_HELP)
    segment: bool = flag(
        False,
        "CTs without a label map: make one with TotalSegmentator (pip install "
        "'vctmae\\[totalseg]'; its weights must be available offline, TOTALSEG_HOME_DIR).",
    )
    # (i, n), 1-based: every n-th case starting at i. Text: "I/N".
    part: tuple[int, int] | str | None = flag(
        None,
        "Process only part I of N (e.g. 2/8) of the sorted cases, for many machines; join with "
        "--merge.",
    )
    # Bytes; text such as "1GiB" or "500MB" is parsed.
    shard_size: int | str = flag(
        "1GiB", "Close a shard before it passes this size (e.g. 1GiB, 500MB)."
    )
    force: bool = flag(False, "Redo every case instead of resuming finished ones.")
    merge: tuple[Path, ...] = flag(
        (),
        "Join the outputs of --part runs (give each part folder, e.g. --merge data/part-*) into "
        "--out.",
        many=True,
    )
    progress: bool = flag(True, "Show progress bars.", negatable=True)

    def __post_init__(self) -> None:
        formats = self.formats
        if isinstance(formats, str):
            formats = (f.strip() for f in formats.split(",") if f.strip())
        object.__setattr__(self, "formats", frozenset(formats))
        if isinstance(self.part, str):
            object.__setattr__(self, "part", parse_part(self.part))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "shard_size", parse_size(self.shard_size))
        object.__setattr__(self, "merge", tuple(Path(p) for p in self.merge))
        for name in ("src", "labels", "pairs"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        unknown = self.formats - set(FORMATS)
        if unknown or not self.formats:
            raise UsageError(
                f"formats must be a non-empty subset of {', '.join(FORMATS)}; got {sorted(self.formats)}"
            )
        if self.merge and (self.src is not None or self.pairs is not None or self.part is not None):
            raise UsageError(
                "--merge joins finished part outputs; it takes no --src, --pairs or --part"
            )
        if not self.merge and self.src is None and self.pairs is None:
            raise UsageError(
                "give --src (a folder of cases), --pairs (a csv) or --merge (part outputs)"
            )
        if self.part is not None:
            i, n = self.part
            if not (n >= 1 and 1 <= i <= n):
                raise UsageError(f"--part must be I/N with 1 ≤ I ≤ N, got {i}/{n}")
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers must be ≥ 1, got {self.workers}")
        if self.executor not in EXECUTORS:
            raise UsageError(
                f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}"
            )
        if self.scheduler is not None and self.executor != "dask":
            raise UsageError("--scheduler is the address of a Dask scheduler: add --executor dask")


def parse_part(text: str) -> tuple[int, int]:
    """'2/8' → (2, 8)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--part must look like I/N (e.g. 2/8), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_size(text: str | int) -> int:
    """'1GiB' / '500MB' / '2g' / 1048576 → bytes (binary and decimal units)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", text.lower())
    if not match:
        raise UsageError(f"cannot read size {text!r}; write e.g. 1GiB, 500MB or 1048576")
    number, prefix, binary, bytes_suffix = match.groups()
    # KiB/Ki/k/K = 1024; kB (a "B" without the "i") = 1000, as the SI units say.
    base = 1000 if bytes_suffix and not binary else 1024
    value = float(number) * base ** " kmgt".index(prefix or " ")
    if value < 1:
        raise UsageError(f"size {text!r} must be at least one byte")
    return int(value)
