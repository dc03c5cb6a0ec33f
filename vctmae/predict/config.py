"""`PredictConfig`: one `vctmae predict` run, each command-line option declared once here.

Torch-free (the command line imports it to build its options).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vctmae.errors import UsageError
from vctmae.flags import flag
from vctmae.infer.config import (
    COMBINE_HELP,
    DEVICES,
    FRAMES_HELP,
    MULTIVIEW_HELP,
    RULE_DEFAULT,
    SpeedOptions,
    check_rule_options,
)
from vctmae.ingest.config import EXECUTORS, LABEL_SCHEMES, SERIES_HELP
from vctmae.ingest.levels import parse_levels


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    """Which scans, which model, how to decide, where the report goes."""

    checkpoint: Path = flag(
        help="Classifier weights (.safetensors from finetune); the best.threshold.json finetuning "
        "wrote beside them sets the decision threshold."
    )
    out: Path = flag(
        Path("report"),
        "Report folder: index.html, CASE/report.html, predictions.csv, summary.json.",
    )
    src: Path | None = flag(
        None,
        "Folder of scans, found as ingest finds them: ct/NAME.nii[.gz] (or a DICOM series "
        "folder ct/NAME/) + seg/NAME.nii[.gz], VerSe X_ct.nii.gz + X_seg-vert_msk.nii.gz "
        "(beside it or under derivatives/).",
    )
    pairs: Path | None = flag(
        None, "pairs.csv: ct,seg[,case,patient,series] for any other layout (like ingest)."
    )
    ct: Path | None = flag(None, "One scan: a NIfTI file or a DICOM series folder.")
    seg: Path | None = flag(
        None,
        "The vertebra label map of --ct (NIfTI, VerSe or TotalSegmentator values); "
        "without it, --segment.",
    )
    series: str | None = flag(None, SERIES_HELP)
    segment: bool = flag(
        False,
        "Scans without a label map: make one with TotalSegmentator (pip install "
        "'vctmae\\[totalseg]'; its weights must be available offline, TOTALSEG_HOME_DIR); kept "
        "as CASE/vertebrae-totalseg.nii.gz and reused by a later run.",
    )
    levels: str | None = flag(
        None,
        "Vertebra levels to assess: all, or a list/ranges (default: the levels the checkpoint was "
        "finetuned on; others are listed as not assessed).",
    )
    label_scheme: str = flag("auto", "Label map scheme: auto, verse or totalseg.")
    multiview: int | None = flag(None, MULTIVIEW_HELP + RULE_DEFAULT)
    frames: str | None = flag(None, FRAMES_HELP + RULE_DEFAULT)
    combine: str | None = flag(None, COMBINE_HELP + RULE_DEFAULT)
    threshold: float | None = flag(
        None,
        "Decision threshold on P(fracture) (default: the validation-optimal one finetuning "
        "recorded beside --checkpoint, else 0.5).",
    )
    batch_size: int = flag(
        16, "Crops per forward pass (crops of several scans share one).", resumable=True
    )
    device: str = flag("auto", "auto (GPU when present), cpu or cuda.", resumable=True)
    # None: with a GPU one per core less one (the model's), at most one per scan; on the CPU 0.
    workers: int | None = flag(
        None,
        "Processes that read and cut scans ahead of the model (0: in this process, one scan "
        "at a time; default: with a GPU one per core but one, at most one per scan; with the "
        "model on the CPU 0, since reading and cutting are a small part of a scan there and "
        "workers take the model's cores).",
        resumable=True,
    )
    executor: str = flag(
        "process",
        "Where scans are read and cut: process (a pool on this machine) or dask (a Dask cluster; "
        "pip install 'vctmae\\[dask]').",
        resumable=True,
    )
    scheduler: str | None = flag(
        None,
        "Dask scheduler address (e.g. tcp://host:8786) for --executor dask; without it a "
        "LocalCluster of --workers processes. The scans and --out must be on storage the "
        "workers share.",
        resumable=True,
    )
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    attention: bool = flag(
        True,
        "Draw each vertebra's attention over the frames of its middle view (from the forward pass "
        "that gives its probability).",
        negatable=True,
    )
    dicom_out: bool | None = flag(
        None,
        "Also write CASE/vertebrae.seg.dcm (DICOM SEG of the assessed vertebrae) and "
        "CASE/fractures.sr.dcm (DICOM SR of the findings) into the study of a DICOM series "
        "(default: on for DICOM input; NIfTI input has no study, so none).",
        negatable=True,
    )
    progress: bool = flag(True, "Show the progress bar.", negatable=True, resumable=True)
    resume: bool = flag(
        False,
        "Continue a stopped run into the same --out: the scans already reported there are kept, "
        "the others predicted. Refused when the checkpoint (by content), threshold or an option "
        "that changes the results differs.",
        resumable=True,
    )
    replace: bool = flag(
        False,
        "Replace the report of an earlier run in --out (its pages, pictures, CSV and summary are "
        "removed first; TotalSegmentator label maps kept there stay). Without it such an --out is "
        "refused.",
        resumable=True,
    )

    def __post_init__(self) -> None:
        for name in ("checkpoint", "out", "src", "pairs", "ct", "seg"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.ct is not None and (self.src is not None or self.pairs is not None):
            raise UsageError("give either --ct (one scan) or --src/--pairs (a folder), not both")
        if self.ct is None and self.src is None and self.pairs is None:
            raise UsageError("give --src (a folder of scans), --pairs (a csv) or --ct (one scan)")
        if self.seg is not None and self.ct is None:
            raise UsageError("--seg is the label map of --ct; with --src the label maps are found")
        if self.ct is not None and self.seg is None and not self.segment:
            raise UsageError(
                f"{self.ct}: no label map: give --seg, or --segment to make one with "
                "TotalSegmentator"
            )
        for name in ("checkpoint", "src", "pairs", "ct", "seg"):
            value = getattr(self, name)
            if value is not None and not value.exists():
                raise UsageError(f"{value}: --{name} does not exist")
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"{self.out}: --out names a file; give a folder for the report")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold must lie in [0, 1], got {self.threshold}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be >= 0, got {self.workers}")
        if self.executor not in EXECUTORS:
            raise UsageError(
                f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}"
            )
        if self.scheduler is not None and self.executor != "dask":
            raise UsageError("--scheduler is the address of a Dask scheduler: add --executor dask")
        if self.resume and self.replace:
            raise UsageError(
                "--resume continues the report in --out, --replace removes it: not both"
            )
        check_rule_options(self.frames, self.multiview, self.combine)
        if self.device not in DEVICES:
            raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.label_scheme not in LABEL_SCHEMES:
            raise UsageError(
                f"--label-scheme must be one of {', '.join(LABEL_SCHEMES)}, "
                f"got {self.label_scheme!r}"
            )
        if self.levels is not None:
            level_set(self.levels)  # a bad --levels is a usage error now


def level_set(levels: str) -> frozenset[str] | None:
    """The levels a `--levels` value keeps; None for all."""
    return None if levels.strip().lower() == "all" else parse_levels(levels)
