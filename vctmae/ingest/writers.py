"""Byte-deterministic writers for ingest's outputs: WebDataset shards, the Zarr store, the manifest.

Everything here writes into a staging folder; `vctmae.ingest.publish` moves the
finished set into `--out`. A full disk raises `OutOfSpaceError` naming the file
being written. Determinism: tar members carry a fixed mtime,
owner and mode; the Zarr store is written chunk by chunk with fixed metadata;
the manifest is plain csv with "\\n" line ends. Identical samples in identical
order therefore give identical bytes.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from vctmae.clip import (
    CLASS_MEMBER,
    CROP_MEMBER,
    META_MEMBER,
    ZARR_CLASSES,
    ZARR_CROPS,
    ZARR_GRADES,
)
from vctmae.files import out_of_space_as_error

TAR_BLOCK = 512
TAR_END = 2 * TAR_BLOCK
MANIFEST_COLUMNS = (
    "key",
    "case",
    "patient",
    "level",
    "label_value",
    "class",
    "grade",
    "split",
    "shard",
    "zarr_index",
    "centroid_x",
    "centroid_y",
    "centroid_z",
    "spacing",
    "truncated",
    "sha256",
)
# The Zarr group's index-aligned attributes, each from a field of the samples' metadata.
ZARR_ATTRS = {
    "keys": "key",
    "splits": "split",
    "levels": "level",
    "cases": "case",
    "patients": "patient",
}
SHARD_NAME = re.compile(r"^(train|val|test|unlabeled)-\d{6}\.tar$")
# One codec for the Zarr chunks and the work files, so that workers compress each
# crop once, in parallel, and assembly copies the bytes. zstd level 1 with byte
# shuffle: within a few % of level 5's ratio on CT at several times its speed.
ZSTD_LEVEL = 1


def crop_codec():
    """numcodecs Blosc/Zstd exactly as the Zarr array's BloscCodec encodes a chunk."""
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=ZSTD_LEVEL, shuffle=Blosc.SHUFFLE, blocksize=0)


def encode_crop(array: np.ndarray) -> bytes:
    """Compressed chunk bytes of one int16 crop (little endian, C order).

    Blosc's multi-threaded compressor emits different (equally valid) bytes for
    different thread counts, so encoding runs single-threaded: the bytes then
    depend only on the crop. Parallelism comes from the worker processes.
    """
    from numcodecs import blosc

    previous = blosc.use_threads
    blosc.use_threads = False
    try:
        return bytes(crop_codec().encode(np.ascontiguousarray(array, dtype="<i2")))
    finally:
        blosc.use_threads = previous


def decode_crop(data: bytes, shape: Sequence[int]) -> np.ndarray:
    return np.frombuffer(crop_codec().decode(data), dtype="<i2").reshape(tuple(shape))


def npy_header(shape: Sequence[int], dtype: str | np.dtype = "<i2") -> bytes:
    """The header `np.save` writes before a C-order array's bytes (format 1.0, 64-byte aligned)."""
    buffer = io.BytesIO()
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(int(n) for n in shape),
    }
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _member_bytes(name: str, size: int) -> int:
    """Bytes a tar member takes: header + data padded to 512 (+ a PAX header for long names)."""
    pax = 3 * TAR_BLOCK if len(name.encode("utf-8")) > 100 else 0
    return pax + TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def _file_bytes(content: int) -> int:
    """Size of a finished tar: content + end-of-archive blocks, padded to whole records."""
    return -(-(content + TAR_END) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Writes one split's samples into `{split}-000000.tar`, `-000001.tar`, … of at most `max_bytes`.

    A shard closes before a sample that would take it past `max_bytes` (a sample
    larger than the limit gets a shard of its own). Members carry mtime 0,
    uid/gid 0 and no owner names, so the bytes depend only on the samples.
    """

    def __init__(self, folder: Path, split: str, max_bytes: int) -> None:
        self.folder = folder
        self.split = split
        self.max_bytes = max_bytes
        self.names: list[str] = []
        self._file = None
        self._tar: tarfile.TarFile | None = None
        self._size = 0
        self._samples = 0

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.names):06d}.tar"
        self.names.append(name)
        with out_of_space_as_error(self.folder / name):
            self._file = open(self.folder / name, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._size = 0
        self._samples = 0

    def write(self, key: str, members: Sequence[tuple[str, bytes]]) -> str:
        """Add one sample (`[(extension, bytes), …]`); returns the shard's file name."""
        needed = sum(_member_bytes(f"{key}.{extension}", len(data)) for extension, data in members)
        if self._tar is None or (
            self._samples and _file_bytes(self._size + needed) > self.max_bytes
        ):
            self._open_next()
        for extension, data in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with out_of_space_as_error(self.folder / self.names[-1]):
                self._tar.addfile(info, io.BytesIO(data))
        self._size += needed
        self._samples += 1
        return self.names[-1]

    def close(self) -> None:
        if self._tar is not None:
            with out_of_space_as_error(self.folder / self.names[-1]):
                self._tar.close()
                self._file.close()
            self._tar = self._file = None


class ZarrWriter:
    """The Zarr store: `crops` (N, S, S, S) int16, one Blosc/Zstd chunk per crop, plus labels.

    Group attrs `keys`, `splits`, `levels`, `cases`, `patients` are index-aligned
    with the arrays `crops`, `classes` (int8, −1 unlabeled) and `grades` (int8, −1 unknown).

    Crops stream in, one at a time, before N is known: chunks already encoded by
    `encode_crop` (in the workers) are stored as they are, in a folder beside the
    store, under the key zarr's default v3 chunk-key encoding gives them
    (`c/i/0/0/0`); `close` creates the arrays and their metadata through zarr with
    the final N, moves the chunks under `crops/`, and reads the first and last
    chunk back through zarr to check that the two agree.
    """

    def __init__(self, path: Path, size: int) -> None:
        import zarr

        self.path = path
        self.size = size
        self._chunks = path.with_name(f"{path.name}-chunks")
        with out_of_space_as_error(path):
            self.group = zarr.open_group(path, mode="w", zarr_format=3)
            self._chunks.mkdir()
        self._classes: list[int] = []
        self._grades: list[int] = []
        self._attrs: dict[str, list[str]] = {name: [] for name in ZARR_ATTRS}
        # Each crop's vertebra mask box in crop indices (what `--frames mask` reads).
        self._bboxes: list[list[int]] = []
        self._check: dict[int, bytes] = {}

    @property
    def count(self) -> int:
        return len(self._attrs["keys"])

    def write(
        self, index: int, encoded: bytes, meta: dict, cls: int | None, grade: int | None
    ) -> None:
        """Store crop `index` from its `encode_crop` bytes; `meta` is the sample's `KEY.json`."""
        if index != self.count:
            raise ValueError("ZarrWriter.write expects indices in order")
        chunk = self._chunks / "c" / str(index) / "0" / "0" / "0"
        with out_of_space_as_error(chunk):
            chunk.parent.mkdir(parents=True, exist_ok=True)
            with open(chunk, "wb") as file:
                file.write(encoded)
        if index == 0:
            self._check[0] = encoded
        self._last = (index, encoded)
        self._classes.append(-1 if cls is None else cls)
        self._grades.append(-1 if grade is None else grade)
        self._bboxes.append([int(v) for v in meta["bbox"]])
        for name, key in ZARR_ATTRS.items():
            self._attrs[name].append(meta[key])

    def close(self) -> None:
        from zarr.codecs import BloscCodec, BloscShuffle

        count, size = self.count, self.size
        with out_of_space_as_error(self.path):
            self.crops = self.group.create_array(
                ZARR_CROPS,
                shape=(count, size, size, size),
                chunks=(1, size, size, size),
                dtype="int16",
                compressors=BloscCodec(
                    cname="zstd", clevel=ZSTD_LEVEL, shuffle=BloscShuffle.shuffle
                ),
                chunk_key_encoding={"name": "default", "separator": "/"},
                fill_value=-1024,
                dimension_names=("crop", "left_right", "superior_inferior", "anterior_posterior"),
            )
            if count:
                (self._chunks / "c").rename(self.path / ZARR_CROPS / "c")
                self._check[self._last[0]] = self._last[1]
            self._chunks.rmdir()
            for name, values in ((ZARR_CLASSES, self._classes), (ZARR_GRADES, self._grades)):
                array = self.group.create_array(
                    name,
                    shape=(count,),
                    chunks=(max(1, count),),
                    dtype="int8",
                    fill_value=-1,
                )
                if count:
                    array[:] = np.array(values, dtype=np.int8)
            self.group.attrs.update({**self._attrs, "bboxes": self._bboxes})
        for index, encoded in self._check.items():
            expected = decode_crop(encoded, self.crops.shape[1:])
            if not np.array_equal(self.crops[index], expected):
                raise RuntimeError(f"{self.path}: zarr does not read back crop {index} as written")


class ManifestWriter:
    """manifest.csv with MANIFEST_COLUMNS, one row per crop, streamed row by row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with out_of_space_as_error(path):
            self._file = open(path, "w", newline="", encoding="utf-8")
            self._writer = csv.DictWriter(
                self._file, fieldnames=MANIFEST_COLUMNS, lineterminator="\n"
            )
            self._writer.writeheader()

    def write(self, row: dict) -> None:
        with out_of_space_as_error(self.path):
            self._writer.writerow(row)

    def close(self) -> None:
        with out_of_space_as_error(self.path):
            self._file.close()


# A sample of made-up crops: (key, int16 crop, class or None for an unlabelled one).
Sample = tuple[str, np.ndarray, int | None]


def write_shards(folder: Path, split: str, shards: Iterable[Iterable[Sample]]) -> list[Path]:
    """Shards `{split}-000000.tar`, `-000001.tar`, … of given crops under `folder`, one per group
    of samples, in ingest's own format (for benchmarks and tests that make up their crops).

    Each sample is `KEY.crop.npy`, `KEY.json` (its key and level, the key's last `_` part, as
    ingest names keys) and, when labelled, `KEY.cls`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, split, 1 << 62)
    for samples in shards:
        for key, crop, label in samples:
            meta = {"key": key, "level": key.rsplit("_", 1)[-1]}
            npy = npy_header(crop.shape, crop.dtype) + np.ascontiguousarray(crop).tobytes()
            members = [(CROP_MEMBER, npy), (META_MEMBER, json.dumps(meta).encode())]
            if label is not None:
                members.append((CLASS_MEMBER, str(int(label)).encode()))
            writer.write(key, members)
        # Closing ends this shard: the next sample opens the next one.
        writer.close()
    return [folder / name for name in writer.names]
