"""`vctmae ingest`."""

from __future__ import annotations

from pathlib import Path

import typer

from vctmae.cli.app import app, expected_failures

INTERRUPTED = "finished cases are kept; run the same command again to resume"


@app.command()
def ingest(
    src: Path = typer.Option(
        None,
        "--src",
        help="Folder searched recursively for cases: ct/NAME.nii[.gz] (or a DICOM series folder ct/NAME/) + seg/NAME.nii[.gz], VerSe X_ct.nii.gz + X_seg-vert_msk.nii.gz (beside it or under derivatives/).",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Output folder: {split}-NNNNNN.tar shards, crops.zarr, manifest.csv, ingest-report.json.",
    ),
    labels: Path = typer.Option(
        None,
        "--labels",
        help="labels.csv: case,level,fracture|grade[,split,patient]. Without it every crop is 'unlabeled'.",
    ),
    pairs: Path = typer.Option(
        None,
        "--pairs",
        help="pairs.csv: ct,seg[,case,patient,series] for any other layout (paths relative to the csv; ct may be a DICOM series folder).",
    ),
    format: str = typer.Option(
        "wds,zarr", "--format", help="Outputs to write: wds, zarr or wds,zarr."
    ),
    spacing: float = typer.Option(1.0, "--spacing", help="Isotropic voxel size of the crops, mm."),
    size: int = typer.Option(96, "--size", help="Crop edge length, voxels."),
    align: str = typer.Option(
        "auto",
        "--align",
        help="spline: follow a curve through the vertebra centroids; axis: scanner axes; auto: spline when a case has ≥ 3 vertebrae.",
    ),
    levels: str = typer.Option(
        None, "--levels", help="Levels to keep, e.g. T1-L6 or T12,L1 (default: all)."
    ),
    label_scheme: str = typer.Option(
        "auto", "--label-scheme", help="Label map scheme: auto, verse or totalseg."
    ),
    workers: int = typer.Option(
        None, "--workers", help="Worker processes (default: one per core)."
    ),
    executor: str = typer.Option(
        "process",
        "--executor",
        help="Where cases are extracted: process (a pool on this machine) or dask (a Dask cluster; pip install 'vctmae[dask]').",
    ),
    scheduler: str = typer.Option(
        None,
        "--scheduler",
        help="Dask scheduler address (e.g. tcp://host:8786) for --executor dask; without it a LocalCluster of --workers processes. --out must be on storage the workers share.",
    ),
    series: str = typer.Option(
        None,
        "--series",
        help="SeriesInstanceUID to read from DICOM series folders (default: the CT series with the most slices).",
    ),
    segment: bool = typer.Option(
        False,
        "--segment",
        help="CTs without a label map: make one with TotalSegmentator (pip install 'vctmae[totalseg]'; its weights must be available offline, TOTALSEG_HOME_DIR).",
    ),
    part: str = typer.Option(
        None,
        "--part",
        help="Process only part I of N (e.g. 2/8) of the sorted cases, for many machines; join with --merge.",
    ),
    shard_size: str = typer.Option(
        "1GiB", "--shard-size", help="Close a shard before it passes this size (e.g. 1GiB, 500MB)."
    ),
    keep_truncated: bool = typer.Option(
        False, "--keep-truncated", help="Also write vertebrae whose mask touches the scan border."
    ),
    force: bool = typer.Option(
        False, "--force", help="Redo every case instead of resuming finished ones."
    ),
    merge: list[Path] = typer.Option(
        None,
        "--merge",
        help="Join the outputs of --part runs (give each part folder, e.g. --merge data/part-*) into --out.",
    ),
    extra_merge: list[Path] = typer.Argument(
        None,
        help="More part folders for --merge (what a shell makes of data/part-*).",
        show_default=False,
        metavar="[PART_DIR]...",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="Do not show progress bars."),
) -> None:
    """Cut raw spine CTs into int16 vertebra crops: WebDataset shards + Zarr store + manifest."""
    with expected_failures(interrupted=INTERRUPTED):
        from vctmae.clip import NUM_FRAMES, STRIDE
        from vctmae.errors import UsageError
        from vctmae.ingest.geometry import MIN_TRAINING_SIZE, GeometryConfig
        from vctmae.ingest.levels import parse_levels
        from vctmae.ingest.pipeline import IngestConfig, parse_part, run_ingest

        merge_dirs = [*(merge or []), *(extra_merge or [])]
        if extra_merge and not merge:
            raise UsageError(
                f"unexpected argument {extra_merge[0]} (did you mean --merge {extra_merge[0]} …?)"
            )
        if size < MIN_TRAINING_SIZE:
            raise UsageError(
                f"--size {size} is too small to train on: the model samples {NUM_FRAMES} sagittal "
                f"frames {STRIDE} slices apart, which needs crops of at least {MIN_TRAINING_SIZE} "
                "voxels"
            )
        config = IngestConfig(
            src=src,
            out=out,
            labels=labels,
            pairs=pairs,
            formats=frozenset(f.strip() for f in format.split(",") if f.strip()),
            geometry=GeometryConfig(
                spacing=spacing,
                size=size,
                align=align,
                levels=parse_levels(levels),
                label_scheme=label_scheme,
                keep_truncated=keep_truncated,
            ),
            workers=workers,
            part=parse_part(part) if part else None,
            shard_size=shard_size,
            force=force,
            merge=tuple(merge_dirs),
            executor=executor,
            scheduler=scheduler,
            series=series,
            segment=segment,
        )
        for path, what in ((src, "--src"), (labels, "--labels"), (pairs, "--pairs")):
            if path is not None and not path.exists():
                raise UsageError(f"{path}: {what} does not exist")
        report = run_ingest(config, progress=not no_progress)
    summary = (
        f"{report['cases_ok']}/{report['cases_seen']} cases ok, {report['vertebrae_written']} vertebrae "
        f"written, {report['vertebrae_skipped']} skipped → {out}"
    )
    typer.echo(summary, err=True)
    if report["splits"]:
        typer.echo(
            "  "
            + ", ".join(
                f"{split}: {s['vertebrae']} vertebrae / {s['patients']} patients"
                for split, s in report["splits"].items()
            ),
            err=True,
        )
    if report["cases_failed"]:
        typer.echo(
            f"error: {report['cases_failed']} case(s) failed; see {out / 'ingest-report.json'}",
            err=True,
        )
        raise typer.Exit(1)
