"""Publishing a new set of ingest outputs into `--out` as one step, through a journal.

The published set is the shards (`{split}-NNNNNN.tar`), `crops.zarr` and
`manifest.csv`; they refer to each other (the manifest names shards and Zarr
indices), so a reader must never find half of one set and half of another.
Assembly writes the new set into `OUT/.ingest-work/staging/`; moving it into
`OUT` takes several renames, since the shards lie directly under
`--out` (so that `vctmae pretrain --shards data/*.tar` works as typed — a
generation folder behind one pointer would move them out of that glob). The
journal makes those renames a single step:

1. `publish` writes the journal `OUT/.ingest-work/publish.json` (the new set's
   shard names, formats and fingerprint) under a temporary name, fsyncs it and
   renames it into place. **That rename is the commit point.** Killed before
   it, the published set is the old one, untouched (staging leftovers are
   deleted by the next run). After it, the new set is the published one.
2. `publish` then applies the journal; every step is idempotent: rename each
   new shard in, remove shards the new set does not have, swap `crops.zarr`
   (or remove it when the new set has none), rename the manifest in, record the
   set in `assembled.json`, delete the journal, delete staging.
3. `finish_publish(OUT)` runs at the start of every ingest into `OUT`, under
   its lock, before anything else: a journal left by a killed run is applied
   again from the step where it stopped, so the folder is the complete new set.

So after any kill and the next `vctmae ingest` into the folder, the folder is
either the complete old set (killed before the commit) or the complete new set
(killed after it). Between such a kill and that next run the folder may hold a
mix; `interrupted_publish(OUT)` says so in one line: the next ingest prints it
as it completes the set, and the shard readers of training and eval refuse
such a folder with it. `ingest-report.json` is not part of the set:
it describes a run and is rewritten after every run's publish.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from vctmae.clip import ZARR_STORE
from vctmae.files import write_atomically
from vctmae.ingest.errors import IngestError
from vctmae.ingest.writers import SHARD_NAME

WORK = ".ingest-work"  # the work folder inside --out (a cache, see pipeline)
MANIFEST = "manifest.csv"
ZARR = ZARR_STORE
STAGING = "staging"  # inside WORK: where assembly writes the next set
JOURNAL = "publish.json"  # inside WORK: present from the commit point until the set is in place
PUBLISHED = "assembled.json"  # inside WORK: what the published set is (fingerprint, shards)
OLD_ZARR = f"old-{ZARR}"  # inside WORK: the replaced Zarr store, until it is deleted
INTERRUPTED = "an ingest was interrupted while publishing its outputs"


def _after_step(step: str) -> None:
    """Called after each step of publishing; tests replace it to stop the process there."""


def publish(out: Path, published: dict[str, Any]) -> None:
    """Make the set staged in `out/.ingest-work/staging` the published one.

    `published` lists the new set: `shards` (file names), `formats`, `fingerprint`.
    """
    work = out / WORK
    write_atomically(work / JOURNAL, json.dumps(published, indent=1).encode(), durable=True)
    _after_step("journal written")
    _apply(out, published)


def finish_publish(out: Path) -> bool:
    """Complete a publish that a killed run left half done; True when there was one."""
    journal = Path(out) / WORK / JOURNAL
    try:
        published = json.loads(journal.read_text())
    except FileNotFoundError:
        return False
    except ValueError:
        # Written under a temporary name and renamed: only a hand edit can garble it.
        raise IngestError(
            journal, "publish journal is unreadable; delete it and rerun with --force"
        ) from None
    _apply(Path(out), published)
    return True


def interrupted_publish(out: Path) -> str | None:
    """One line saying that `out` holds a half-published set, or None when it does not."""
    if (Path(out) / WORK / JOURNAL).exists():
        return f"{out}: {INTERRUPTED}"
    return None


def _apply(out: Path, published: dict[str, Any]) -> None:
    """Steps 2 of the module docstring; each one can be redone after a kill."""
    work = out / WORK
    staging = work / STAGING
    shards = set(published["shards"])
    wants_zarr = "zarr" in published["formats"]
    for name in sorted(shards):
        if (staging / name).exists():
            os.replace(staging / name, out / name)
            _after_step(f"shard {name} renamed in")
    for stale in sorted(out.iterdir()):
        if SHARD_NAME.match(stale.name) and stale.name not in shards:
            stale.unlink()
            _after_step(f"stale shard {stale.name} removed")
    new_zarr, old_zarr = staging / ZARR, work / OLD_ZARR
    replace_zarr = new_zarr.exists() if wants_zarr else True
    if replace_zarr and (out / ZARR).exists():
        shutil.rmtree(old_zarr, ignore_errors=True)
        os.replace(out / ZARR, old_zarr)
        _after_step("old crops.zarr moved aside")
    if wants_zarr and new_zarr.exists():
        os.replace(new_zarr, out / ZARR)
        _after_step("crops.zarr renamed in")
    shutil.rmtree(old_zarr, ignore_errors=True)
    if (staging / MANIFEST).exists():
        os.replace(staging / MANIFEST, out / MANIFEST)
        _after_step("manifest renamed in")
    write_atomically(work / PUBLISHED, json.dumps(published, indent=1).encode())
    _after_step("published set recorded")
    (work / JOURNAL).unlink()
    _after_step("journal removed")
    shutil.rmtree(staging, ignore_errors=True)
