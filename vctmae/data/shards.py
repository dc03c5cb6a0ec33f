"""Shard lists and shard indexes: which tar files, and where each crop's bytes lie in them.

A shard is a WebDataset tar written by ingest: per sample `KEY.crop.npy` (int16,
C order), `KEY.json` (metadata), and for labelled splits `KEY.cls` ("0"/"1"). A sample's key
is its member path up to the first dot of the last path component, as
WebDataset splits it: `a/x.crop.npy` and `b/x.crop.npy` are two samples, `a/x`
and `b/x` (folders are never dropped). Before
streaming, the loader indexes each shard once — it walks the tar headers and
parses each `.npy` header — so that reading a crop later is a single `preadv`
of its raw int16 bytes straight into the batch buffer (no intermediate bytes
object, no decode copy). From each sample's JSON the index keeps the two fields
the loader needs: the vertebra `level` (for `--levels`) and the mask's `bbox`
(for `--frames mask`). The index also gives exact sample counts, which the
rank/worker split needs to promise "every sample exactly once". Remote shards
(any URL webdataset's gopen opens) are fetched once into a local cache first.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vctmae.clip import CLASS_MEMBER, CROP_MEMBER, META_MEMBER
from vctmae.errors import VctmaeError

# A sample whose JSON has no `bbox` gets this box (and no level: None): usable in crop mode and
# with `--levels all`, refused by `--frames mask` and a level filter (`check_metadata`).
NO_BOX = (-1, -1, -1, -1, -1, -1)
_NPY_MAGIC = b"\x93NUMPY"
_INT64 = np.iinfo(np.int64)  # the index's label array holds each .cls value
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class ShardError(VctmaeError, ValueError):
    """A shard that cannot be used; str() = "<path>: <problem>". A ValueError: bad input, which
    the commands report in one line."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


# ----------------------------------------------------------------------------- shard lists


def expand_braces(pattern: str) -> list[str]:
    """Expand `{000000..000041}` ranges (zero padding kept) and `{a,b}` lists, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def fetch_remote(url: str, cache_dir: Path | None = None) -> str:
    """A local copy of a remote shard (any URL webdataset's gopen opens: http(s), gs, pipe:…).

    Fetched once and kept under `cache_dir` (default $VCTMAE_SHARD_CACHE, else
    ~/.cache/vctmae/shards), named by the URL (a changed remote file under the same URL is
    not noticed: clear the cache). The loader then indexes and reads the local copy like any
    other shard.
    """
    if cache_dir is None:
        configured = os.environ.get("VCTMAE_SHARD_CACHE")
        cache_dir = Path(configured) if configured else Path.home() / ".cache/vctmae/shards"
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1])[-60:]
    local = cache_dir / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{tail}"
    if local.exists():
        return str(local)
    import webdataset

    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(local.name + f".{os.getpid()}.part")
    try:
        with webdataset.gopen(url, "rb") as stream, open(partial, "wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        if partial.stat().st_size == 0:
            raise OSError("empty download")
    except Exception as error:  # gopen raises many kinds (OSError, ValueError, subprocess errors)
        partial.unlink(missing_ok=True)
        raise ShardError(url, f"cannot fetch ({error})") from None
    partial.replace(local)
    return str(local)


def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a path, a glob, a brace pattern, or a sequence of any of these.

    A sequence is what an unquoted shell glob expands to; a quoted glob or brace
    pattern is expanded here. Globs are sorted (as a shell sorts them). A shard
    named twice — by the same path, by overlapping patterns, or spelt two ways
    (`data/x.tar ./data/x.tar`, a link) — is refused: it would be read twice.
    A glob matching nothing is an error; a plain path that does not exist is
    reported when the shard is opened.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ShardError("<shards>", "empty shard list")
    found: list[str] = []
    for item in specs:
        for pattern in expand_braces(os.fspath(item)):
            if not _is_url(pattern) and _GLOB_CHARS.search(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise ShardError(pattern, "glob matches no files")
                found.extend(matches)
            else:
                found.append(pattern)
    first: dict[str, str] = {}  # the file a path names → the path that named it first
    for path in found:
        same = path if _is_url(path) else os.path.realpath(path)
        if same in first:
            also = "" if first[same] == path else f" (also as {first[same]})"
            raise ShardError(path, f"listed twice in the shard list{also}; list each shard once")
        first[same] = path
    refuse_half_published(found)
    return found


def refuse_half_published(shards: Sequence[str]) -> None:
    """Raise `ShardError` for shards in a folder an ingest was interrupted while publishing
    into: it may hold part of the old set and part of the new one until ingest runs again."""
    from vctmae.ingest.publish import INTERRUPTED, interrupted_publish

    folders = (os.path.dirname(os.path.abspath(s)) for s in shards if not _is_url(s))
    for folder in dict.fromkeys(folders):
        if interrupted_publish(Path(folder)) is not None:
            raise ShardError(
                folder, f"{INTERRUPTED}; run the same `vctmae ingest` again to finish it"
            )


# ----------------------------------------------------------------------------- .npy decoding


def parse_npy_header(head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header length) of an .npy file from its first bytes; C order only."""
    if head[:6] != _NPY_MAGIC or len(head) < 10:
        raise ValueError("not an .npy file")
    major = head[6]
    if major == 1:
        (length,) = struct.unpack("<H", head[8:10])
        start = 10
    elif major in (2, 3):
        (length,) = struct.unpack("<I", head[8:12])
        start = 12
    else:
        raise ValueError(f"unknown .npy version {major}")
    if len(head) < start + length:
        raise ValueError("truncated .npy header")
    header = ast.literal_eval(head[start : start + length].decode("latin1"))
    if header.get("fortran_order"):
        raise ValueError(".npy array is Fortran-ordered; expected C order")
    return np.dtype(header["descr"]), tuple(header["shape"]), start + length


# ----------------------------------------------------------------------------- shard index


@dataclass(frozen=True, kw_only=True)
class ShardIndex:
    """Where each sample of one shard lies: key, byte offset of its raw crop data, label."""

    path: str
    keys: list[str]
    offsets: np.ndarray  # int64 (n,): byte offset of the first int16 of each crop
    labels: np.ndarray  # int64 (n,): class, -1 when unlabeled
    shape: tuple[int, ...]
    # int64 (n, 6): each sample's JSON `bbox` (half-open x0, x1, y0, y1, z0, z1 in crop
    # indices; NO_BOX when its JSON has none)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 6), dtype=np.int64))
    # each sample's JSON `level` (e.g. "L1"), None when its JSON has none
    levels: list[str | None] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<path>: <problem>" per bad sample
    source: str = ""  # the URL a remote shard was fetched from ("" for local shards)

    def __len__(self) -> int:
        return len(self.keys)


def shard_identity(index: ShardIndex) -> dict[str, int | str]:
    """What tells a shard apart from another under the same name: its size in bytes, its
    number of crops and a digest of its index (keys, crop offsets, classes, boxes, levels).
    Cheap: the index is already in memory; no crop bytes are read."""
    digest = hashlib.sha256("\n".join(index.keys).encode())
    for array in (index.offsets, index.labels, index.boxes):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    digest.update(json.dumps(index.levels).encode())
    return {
        "bytes": os.path.getsize(index.path),
        "crops": len(index),
        "index_sha256": digest.hexdigest(),
    }


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the extension starts at the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (ext if dot else "")


def index_shard(path: str, *, skip_corrupt: bool = False) -> ShardIndex:
    """Index one local shard. Raises ShardError naming the shard (and member) when it is unusable.

    With skip_corrupt, bad samples are left out and listed in `.skipped`; a shard
    that cannot be read at all still raises (the caller skips and counts it).
    """
    if _is_url(path):
        try:
            local = index_shard(fetch_remote(path), skip_corrupt=skip_corrupt)
        except ShardError as error:
            raise ShardError(path, error.problem) from None  # name the URL the user gave
        return replace(local, source=path)
    try:
        size = os.path.getsize(path)
        handle = open(path, "rb")
    except FileNotFoundError:
        raise ShardError(path, "no such file") from None
    except OSError as error:
        raise ShardError(path, f"cannot open ({error.strerror or error})") from None
    # Each sample's members, in the order the keys first appear: key → {extension: (data
    # offset, size, member name)}.
    samples: dict[str, dict[str, tuple[int, int, str]]] = {}
    with handle:
        try:
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > size:
                        raise ShardError(
                            path, f"truncated: member {member.name} ends past the end of the file"
                        )
                    key, ext = split_member_name(member.name)
                    found = samples.setdefault(key, {})
                    found[ext] = (member.offset_data, member.size, member.name)
        except tarfile.TarError as error:
            raise ShardError(path, f"not a readable tar archive ({error})") from None
        except OSError as error:
            raise ShardError(path, f"read error ({error})") from None
        keys: list[str] = []
        offsets: list[int] = []
        labels: list[int] = []
        boxes: list[tuple[int, ...]] = []
        levels: list[str | None] = []
        skipped: list[str] = []
        shape: tuple[int, ...] | None = None
        fd = handle.fileno()
        for key, found in samples.items():
            try:
                if CROP_MEMBER not in found:
                    raise ShardError(path, f"sample {key} has no .{CROP_MEMBER}")
                start, length, name = found[CROP_MEMBER]
                head = os.pread(fd, min(length, 4096), start)
                try:
                    dtype, sample_shape, header_length = parse_npy_header(head)
                except (ValueError, SyntaxError, KeyError) as error:
                    raise ShardError(path, f"{name}: bad .npy header ({error})") from None
                if dtype != np.dtype("<i2"):
                    raise ShardError(path, f"{name}: dtype {dtype}, expected int16")
                if header_length + int(np.prod(sample_shape)) * 2 != length:
                    raise ShardError(
                        path, f"{name}: .npy size does not match its shape {sample_shape}"
                    )
                if shape is not None and sample_shape != shape:
                    raise ShardError(path, f"{name}: shape {sample_shape} differs from {shape}")
                label = -1
                if CLASS_MEMBER in found:
                    member_offset, member_size, _ = found[CLASS_MEMBER]
                    raw = os.pread(fd, member_size, member_offset)
                    text = raw.decode("ascii", "replace").strip()
                    if not text.lstrip("-").isdigit():
                        raise ShardError(
                            path, f"{key}.{CLASS_MEMBER}: not an integer class ({text!r})"
                        )
                    label = int(text)
                    if not _INT64.min <= label <= _INT64.max:
                        raise ShardError(
                            path, f"{key}.{CLASS_MEMBER}: class {text} is out of range"
                        )
                box, level = NO_BOX, None
                if META_MEMBER in found:
                    member_offset, member_size, _ = found[META_MEMBER]
                    box, level = _read_metadata(path, fd, key, member_offset, member_size)
            except ShardError as error:
                if not skip_corrupt:
                    raise
                skipped.append(str(error))
                continue
            shape = sample_shape
            keys.append(key)
            offsets.append(start + header_length)
            labels.append(label)
            boxes.append(box)
            levels.append(level)
    return ShardIndex(
        path=path,
        keys=keys,
        offsets=np.asarray(offsets, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        shape=shape or (),
        boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 6),
        levels=levels,
        skipped=skipped,
    )


def _read_metadata(
    path: str, fd: int, key: str, offset: int, size: int
) -> tuple[tuple[int, ...], str | None]:
    """(bbox, level) of one sample's JSON; NO_BOX / None for a field it does not have."""
    name = f"{key}.{META_MEMBER}"
    try:
        meta = json.loads(os.pread(fd, size, offset))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(path, f"{name}: not JSON ({error})") from None
    if not isinstance(meta, dict):
        raise ShardError(path, f"{name}: not a JSON object")
    box: tuple[int, ...] = NO_BOX
    if "bbox" in meta:
        bbox = meta["bbox"]
        if (
            not isinstance(bbox, list)
            or len(bbox) != 6
            or not all(isinstance(v, int) and 0 <= v for v in bbox)
            or any(bbox[2 * i + 1] < bbox[2 * i] for i in range(3))
        ):
            raise ShardError(path, f"{name}: bbox {bbox!r} is not (x0, x1, y0, y1, z0, z1)")
        box = tuple(bbox)
    level = meta.get("level")
    if level is not None and not isinstance(level, str):
        raise ShardError(path, f"{name}: level {level!r} is not a name like L1")
    return box, level


def index_shards(
    shards: Sequence[str], *, skip_corrupt: bool = False
) -> tuple[list[ShardIndex], list[str]]:
    """Index every shard; returns (indexes of usable shards, "<path>: <problem>" for each thing skipped)."""
    indexes: list[ShardIndex] = []
    skipped: list[str] = []
    shape: tuple[int, ...] | None = None
    for path in shards:
        try:
            index = index_shard(path, skip_corrupt=skip_corrupt)
            if shape is not None and index.shape and index.shape != shape:
                raise ShardError(
                    path, f"crop shape {index.shape} differs from {shape} in earlier shards"
                )
        except ShardError as error:
            if not skip_corrupt:
                raise
            skipped.append(str(error))
            continue
        skipped.extend(index.skipped)
        if len(index):
            shape = index.shape
            indexes.append(index)
    return indexes, skipped


def select_levels(
    indexes: Sequence[ShardIndex], levels: frozenset[str] | None
) -> tuple[list[ShardIndex], int]:
    """Keep the samples whose JSON `level` is in `levels` (None: keep all); returns the indexes
    with samples left, and how many samples were dropped.

    A sample without a `level` in its JSON cannot be filtered: a ShardError naming it (pass
    `--levels all` to use such shards).
    """
    if levels is None:
        return list(indexes), 0
    kept: list[ShardIndex] = []
    dropped = 0
    for index in indexes:
        unknown = [
            key for key, level in zip(index.keys, index.levels, strict=True) if level is None
        ]
        if unknown:
            raise ShardError(
                index.path,
                f"{len(unknown)} sample(s) without a `level` in their JSON (e.g. {unknown[0]}); "
                "the level filter cannot place them — pass --levels all",
            )
        rows = [i for i, level in enumerate(index.levels) if level in levels]
        dropped += len(index) - len(rows)
        if len(rows) == len(index):
            kept.append(index)
        elif rows:
            kept.append(
                replace(
                    index,
                    keys=[index.keys[i] for i in rows],
                    offsets=index.offsets[rows],
                    labels=index.labels[rows],
                    boxes=index.boxes[rows],
                    levels=[index.levels[i] for i in rows],
                )
            )
    return kept, dropped


def check_boxes(indexes: Sequence[ShardIndex], *, option: str = "--frames mask") -> None:
    """Refuse shards with samples that have no mask `bbox` in their JSON (mask mode needs it)."""
    for index in indexes:
        missing = np.flatnonzero((index.boxes == -1).all(axis=1))
        if missing.size:
            raise ShardError(
                index.path,
                f"{missing.size} sample(s) without a mask `bbox` in their JSON "
                f"(e.g. {index.keys[int(missing[0])]}); {option} needs ingest's metadata — "
                "re-ingest, or use --frames crop",
            )


class ClassError(VctmaeError, ValueError):
    """Samples whose class a classifier cannot use (unlabelled, or outside 0/1), by shard."""


def check_classes(
    indexes: Sequence[ShardIndex], *, role: str, allow_unlabelled: bool = False
) -> None:
    """Refuse shards holding a class other than 0 (no fracture) and 1 (fracture) — and unlabelled
    samples (−1, no `.cls`) unless `allow_unlabelled` — naming each shard and its classes.

    `role` says which samples these are (e.g. "training samples (--shards)"). Checked from the
    shard index, so before the first step rather than at the first bad batch.
    """
    problems = []
    for index in indexes:
        values, counts = np.unique(index.labels, return_counts=True)
        bad = {
            int(v): int(n)
            for v, n in zip(values, counts, strict=True)
            if v not in (0, 1) and not (allow_unlabelled and v == -1)
        }
        if not bad:
            continue
        parts = []
        for value, count in bad.items():
            example = index.keys[int(np.flatnonzero(index.labels == value)[0])]
            what = "unlabelled (no .cls)" if value == -1 else f"class {value}"
            parts.append(f"{count} {what}, e.g. {example}")
        problems.append(f"{index.path} ({'; '.join(parts)})")
    if problems:
        raise ClassError(
            f"{', '.join(problems)}: {role} must be labelled 0 (no fracture) or 1 (fracture)"
        )


def shard_label(shards: Sequence[str]) -> str:
    """How a message names a list of shards: the one path, or the first and how many more."""
    if len(shards) == 1:
        return str(shards[0])
    return f"{shards[0]} (+{len(shards) - 1} more shards)"


def read_crop(fd: int, offset: int, out: np.ndarray) -> None:
    """Read one crop's raw int16 bytes at `offset` straight into `out` (C-contiguous)."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got


def iter_raw(shards: Sequence[str]):
    """Baseline raw read: tarfile + np.frombuffer on each member's bytes → (key, int16 array)."""
    for path in shards:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith("." + CROP_MEMBER):
                    data = tar.extractfile(member).read()
                    dtype, shape, offset = parse_npy_header(data[:4096])
                    crop = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=offset)
                    yield split_member_name(member.name)[0], crop.reshape(shape)
