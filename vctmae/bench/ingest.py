"""`vctmae bench ingest`: ingest at clinical scale — per case against a MONAI user's crop recipe
and against only decoding the files, throughput at 1 and N workers, peak memory, and the
projection for the paper's set.

Inputs: clinical-size phantoms (`vctmae synth --clinical`: 512 × 512 × ~330 voxels of
~0.7 × 0.7 × 1.1 mm, 12–14 vertebrae, int16 or uint16 + intercept, several storage
orders), and a real-like case: the real CT fixture resampled to a clinical CT's voxel
size (`write_real_like_case`, made in a temporary folder at bench time; real CTs
compress better than phantoms, so the work after decoding weighs more). A few
distinct phantoms are written and linked under more case names, so the benchmark
does not spend its time writing phantoms; ingest reads each link as a file of its
own (from the page cache, as a warm file server would serve it).

Measured in one run:
1. **Per case, one process**, after one untimed case (`first_case_in_process`: the
   process loads or compiles the numba sampler once), best of `rounds`, the three
   alternating on each case:
   `ingest` — what one ingest worker does for a case (`extract_case`: read, cut,
   compress, hash, write its work files); `decode_only` — the floor: ISA-L gunzip
   of the CT and the label map into memory + `np.frombuffer`; `monai_crops` — the
   peer, a MONAI user's recipe for the same vertebrae (`benchmarks/peers/monai_crops.py`).
   Ratios are of rates: `ingest_over_decode_*` is at most 1 (1: ingest costs no more
   than decoding its inputs).
2. **`vctmae ingest` end to end** in a child process at 1 and N workers (fresh
   output, every case extracted): wall time, s/case, crops/s, and the peak
   resident memory of the process tree (sampled every 50 ms); at N workers also
   on half the cases, to show memory does not grow with the case count.
3. **Projection** for the paper's pretraining set (3,446 CTs → 27,776 crops) on 16
   cores: the per-case cost split into a fixed part (reading, label passes) and a
   per-crop part, evaluated at the paper's 8.06 crops per case, divided over 15
   extraction workers — at ideal scaling, and at ingest's parallel efficiency
   relative to what the machine allowed during the run (`parallel_probe`) —
   against the assembly (one core, behind extraction) at its measured cost per
   crop; the slower of the two is the projected wall time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip
from scipy import ndimage

from vctmae.bench.peers import load_peer, monai_version
from vctmae.bench.report import REAL_CT_DIR, Report
from vctmae.ingest import geometry
from vctmae.ingest.discover import Case
from vctmae.ingest.extract import ExtractJob, extract_case
from vctmae.ingest.geometry import GeometryConfig

PAGE = os.sysconf("SC_PAGE_SIZE")
PAPER_CASES = 3446
PAPER_CROPS = 27776
PROJECTION_CORES = 16
# Voxel size of the real-like case: a clinical CT's (in-plane 0.7 mm, 1 mm slices).
REAL_LIKE_SPACING = (0.7, 0.7, 1.0)


# ---------------------------------------------------------------------------
# Measuring.


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Field 4 (ppid) follows the parenthesised command name, which may hold spaces.
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    total, tree = 0, [pid]
    while tree:
        member = tree.pop()
        tree += children.get(member, [])
        try:
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def measure_ingest(src: Path, out: Path, workers: int) -> dict:
    """Run `vctmae ingest` in a child process; returns its report plus wall time and peak tree RSS."""
    command = [sys.executable, "-m", "vctmae", "ingest", "--src", str(src), "--out", str(out)]
    command += ["--labels", str(src / "labels.csv"), "--workers", str(workers), "--no-progress"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(process.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(
            f"ingest failed (exit {process.returncode}):\n{stderr.decode(errors='replace')}"
        )
    report = json.loads((out / "ingest-report.json").read_text())
    return {"report": report, "wall_s": wall, "peak_rss": peak}


def link_cases(store: Path, src: Path, distinct: int, cases: int) -> Path:
    """The first `distinct` phantoms of `store` linked as `cases` cases under `src` (ct/, seg/,
    labels.csv), one patient per case; returns `src`."""
    for kind in ("ct", "seg"):
        (src / kind).mkdir(parents=True)
    rows = (store / "labels.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    lines = [header]
    for index in range(cases):
        origin = f"case{index % distinct:03d}"
        name = f"case{index:04d}"
        for kind in ("ct", "seg"):
            (src / kind / f"{name}.nii.gz").symlink_to(store / kind / f"{origin}.nii.gz")
        for row in body:
            case, rest = row.split(",", 1)
            if case == origin:
                # One patient per case (patient column last): the split is by case.
                lines.append(f"{name},{rest.rsplit(',', 1)[0]},P{name}")
    (src / "labels.csv").write_text("\n".join(lines) + "\n")
    return src


def decode_only(path: Path) -> np.ndarray:
    """The floor of reading a case file: its bytes gunzipped in memory by ISA-L and seen as
    its voxel array (np.frombuffer), nothing else."""
    raw = igzip.decompress(Path(path).read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[: nib.Nifti1Header.sizeof_hdr]))
    return np.frombuffer(
        raw,
        dtype=header.get_data_dtype(),
        count=int(np.prod(header.get_data_shape())),
        offset=int(header.get_data_offset()),
    )


def write_real_like_case(root: Path, fixture: Path = REAL_CT_DIR) -> Path:
    """The real CT fixture and its label map resampled to 0.7 × 0.7 × 1 mm (CT linear, labels
    nearest), as `root`/ct|seg/real0.nii.gz: the voxel size of a clinical CT, with a real
    CT's texture (which compresses better than a phantom's). Returns `root`."""
    ct, seg = nib.load(fixture / "ct.nii.gz"), nib.load(fixture / "seg.nii.gz")
    zoom = np.array(ct.header.get_zooms()[:3]) / np.array(REAL_LIKE_SPACING)
    volume = ndimage.zoom(np.asarray(ct.dataobj, dtype=np.float32), zoom, order=1)
    labels = ndimage.zoom(np.asarray(seg.dataobj), zoom, order=0)
    affine = ct.affine.copy()
    affine[:3, :3] = affine[:3, :3] / zoom
    for kind, data in (("ct", np.rint(volume).astype(np.int16)), ("seg", labels)):
        (root / kind).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), root / kind / "real0.nii.gz")
    return root


def ingest_case(ct: Path, seg: Path, work: Path) -> list[int]:
    """What one ingest worker does for one case (`extract_case`: read, cut, compress, write
    its work files); returns the label values of the crops written."""
    case = Case(
        case=ct.name.split(".")[0], patient="P", ct=ct, seg=seg, ct_name=ct.name, seg_name=seg.name
    )
    job = ExtractJob(
        index=0, case=case, geometry=GeometryConfig(), record=work / f"{case.case}.json"
    )
    extracted = extract_case(job)
    if extracted.record.status != "ok":
        raise RuntimeError(f"{ct}: ingest failed: {extracted.record.error}")
    return [crop.label_value for crop in extracted.record.crops]


def _per_case(src: Path, cases: list[str], rounds: int, work: Path) -> dict:
    """Seconds per case (best of `rounds`, one process, contenders alternating) of ingest, of
    decoding only, and of the MONAI crop recipe on the same vertebrae; crops per case."""
    monai_crops = load_peer("monai_crops").monai_crops
    best = {"ingest": {}, "decode": {}, "monai": {}}
    crops = 0
    for round_index in range(rounds):
        for case in cases:
            ct, seg = src / "ct" / f"{case}.nii.gz", src / "seg" / f"{case}.nii.gz"
            timings = {}
            started = time.perf_counter()
            decode_only(ct), decode_only(seg)
            timings["decode"] = time.perf_counter() - started
            started = time.perf_counter()
            values = ingest_case(ct, seg, work)
            timings["ingest"] = time.perf_counter() - started
            if round_index == 0:
                crops += len(values)
            out = work / f"monai-{case}-{round_index}"
            started = time.perf_counter()
            written = monai_crops(ct, seg, values, out)
            timings["monai"] = time.perf_counter() - started
            if written != len(values):
                raise RuntimeError(f"{ct}: MONAI recipe cut {written} of {len(values)} vertebrae")
            for name, seconds in timings.items():
                best[name][case] = min(best[name].get(case, np.inf), seconds)
    mean = {name: float(np.mean(list(times.values()))) for name, times in best.items()}
    return {**mean, "crops_per_case": crops / len(cases)}


def _cost_split(src: Path, cases: list[str]) -> dict:
    """Ingest's cost per case split into a fixed part (reading, label passes) and a per-crop
    part (cutting, compressing, hashing), for the projection."""
    from vctmae.ingest.writers import encode_crop

    fixed, per_crop, n_crops = 0.0, 0.0, 0
    for case in cases:
        ct_path, seg_path = src / "ct" / f"{case}.nii.gz", src / "seg" / f"{case}.nii.gz"
        t0 = time.perf_counter()
        ct, labels = geometry.read_ct(ct_path), geometry.read_label_map(seg_path)
        t1 = time.perf_counter()
        geometry.label_counts(labels)
        geometry.label_boxes(labels)
        t2 = time.perf_counter()
        result = geometry.crops_from_volumes(ct, labels, GeometryConfig())
        for crop in result.crops:
            encode_crop(crop.array)
            hashlib.sha256(crop.array.tobytes()).hexdigest()
        t3 = time.perf_counter()
        fixed += t2 - t0
        per_crop += (t3 - t2) - (t2 - t1)
        n_crops += len(result.crops)
    return {"fixed_s": fixed / len(cases), "per_crop_s": per_crop / max(1, n_crops)}


def _spin(loops: int) -> float:
    started = time.perf_counter()
    total = 0
    for i in range(loops):
        total += i
    return time.perf_counter() - started


def parallel_probe(processes: int, loops: int = 5_000_000) -> float:
    """How much faster `processes` copies of a pure-Python loop run at once than one after
    another (ideal: `processes`). On a shared machine other jobs' load shows here, so ingest's
    scaling is judged against what the machine itself allowed at that moment."""
    import multiprocessing

    alone = _spin(loops)
    context = multiprocessing.get_context("fork")
    started = time.perf_counter()
    with context.Pool(processes) as pool:
        pool.map(_spin, [loops] * processes)
    together = time.perf_counter() - started
    return processes * alone / together


def run_bench(
    *,
    json_path: Path | None = None,
    quick: bool = False,
    workers: int | None = None,
    cases: int | None = None,
    rounds: int | None = None,
    real_ct: Path = REAL_CT_DIR,
) -> Path:
    """Run the benchmark (module docstring); writes and returns the JSON report."""
    from vctmae.ingest.pipeline import default_workers
    from vctmae.synth import SynthConfig
    from vctmae.synth.phantoms import write_phantoms

    load_peer("monai_crops")  # before any work: a missing peer stops the benchmark at once
    n_cases = cases or (2 if quick else 8)
    distinct = min(n_cases, 1 if quick else 4)
    rounds = rounds or (1 if quick else 2)
    n_workers = workers or default_workers()
    report = Report("ingest-clinical")
    with tempfile.TemporaryDirectory(prefix="vctmae-bench-ingest-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        write_phantoms(SynthConfig(out=root / "phantoms", cases=distinct, seed=0, clinical=True))
        synth_s = time.perf_counter() - started
        src = link_cases(root / "phantoms", root / "raw", distinct, n_cases)
        shape = nib.load(str(src / "ct" / "case0000.nii.gz")).shape
        phantoms = [f"case{i:04d}" for i in range(distinct)]
        kinds = {"phantom": (src, phantoms)}
        if real_ct.is_dir():
            kinds["real_like"] = (write_real_like_case(root / "real-like", real_ct), ["real0"])
            real_shape = nib.load(str(root / "real-like" / "ct" / "real0.nii.gz")).shape
        work = root / "work"
        work.mkdir()
        # One untimed case first: this process loads (or compiles) the numba sampler and label
        # pass once, a cost an ingest worker pays once, not per case.
        started = time.perf_counter()
        ingest_case(
            src / "ct" / f"{phantoms[0]}.nii.gz", src / "seg" / f"{phantoms[0]}.nii.gz", work
        )
        report.add("first_case_in_process", time.perf_counter() - started, "s")
        per_case = {}
        for kind, (folder, names) in kinds.items():
            measured_kind = per_case[kind] = _per_case(folder, names, rounds, work)
            report.add(f"{kind}_ingest", measured_kind["ingest"], "s/case")
            report.add(f"{kind}_decode_only", measured_kind["decode"], "s/case")
            report.add(f"{kind}_monai_crops", measured_kind["monai"], "s/case")
            report.add(f"{kind}_crops", measured_kind["crops_per_case"], "crops/case")
            # Rates (cases/s) over rates: above 1, ingest is the faster.
            report.ratios[f"ingest_over_monai_crops_{kind}"] = (
                measured_kind["monai"] / measured_kind["ingest"]
            )
            report.ratios[f"ingest_over_decode_{kind}"] = (
                measured_kind["decode"] / measured_kind["ingest"]
            )
        split = _cost_split(src, phantoms)
        report.add("phantom_fixed_part", split["fixed_s"], "s/case")
        report.add("phantom_per_crop_part", split["per_crop_s"], "s/crop")

        # The worker counts alternate, round after round: a burst of other work hits both.
        runs: dict[int, list[dict]] = {w: [] for w in sorted({1, n_workers})}
        for round_index in range(rounds):
            for w, done in runs.items():
                done.append(measure_ingest(src, root / f"out-w{w}-r{round_index}", w))
        # Each worker count's fastest run, with the highest peak memory of any of its runs.
        measured = {
            w: {
                **min(done, key=lambda r: r["wall_s"]),
                "peak_rss": max(r["peak_rss"] for r in done),
            }
            for w, done in runs.items()
        }
        written = measured[n_workers]["report"]["vertebrae_written"]
        for w, run in measured.items():
            report.add(f"wall_s_w{w}", run["wall_s"], "s")
            report.add(f"s_per_case_w{w}", run["wall_s"] / n_cases, "s/case")
            report.add(f"crops_per_s_w{w}", written / run["wall_s"], "crops/s")
            report.add(f"assemble_s_w{w}", run["report"]["timings_s"]["assemble"], "s")
            report.add(f"peak_tree_rss_w{w}", run["peak_rss"] / 2**20, "MiB")
        # Ingest's parallel efficiency, relative to what the machine allowed (`parallel_probe`).
        efficiency = 1.0
        if n_workers != 1:
            speedup = measured[1]["wall_s"] / measured[n_workers]["wall_s"]
            probe = parallel_probe(n_workers)
            report.ratios[f"w{n_workers}_over_w1"] = speedup
            report.ratios[f"machine_probe_{n_workers}_processes_over_1"] = probe
            efficiency = min(1.0, speedup / min(probe, n_workers))
        if not quick and n_cases >= 4:
            half = link_cases(root / "phantoms", root / "raw-half", distinct, n_cases // 2)
            run = measure_ingest(half, root / "out-half", n_workers)
            report.add(f"peak_tree_rss_w{n_workers}_half_cases", run["peak_rss"] / 2**20, "MiB")
            report.ratios["peak_rss_full_over_half_cases"] = (
                measured[n_workers]["peak_rss"] / run["peak_rss"]
            )

        # Projection for the paper's set on PROJECTION_CORES cores: one core assembles.
        paper_crops_per_case = PAPER_CROPS / PAPER_CASES
        case_s = split["fixed_s"] + paper_crops_per_case * split["per_crop_s"]
        extract_workers = PROJECTION_CORES - 1
        extract_min = PAPER_CASES * case_s / (extract_workers * efficiency) / 60
        ideal_min = PAPER_CASES * case_s / extract_workers / 60
        report_w1 = measured[1]["report"]
        assemble_per_crop = report_w1["timings_s"]["assemble"] / max(
            1, report_w1["vertebrae_written"]
        )
        assemble_min = PAPER_CROPS * assemble_per_crop / 60
        report.add("paper_case_s_now", case_s, "s/case")
        report.add("projected_extract_16_cores_ideal_scaling", ideal_min, "min")
        report.add("projected_extract_16_cores", extract_min, "min")
        report.add("projected_assembly_one_core", assemble_min, "min")
        report.add("projected_paper_set_16_cores", max(extract_min, assemble_min), "min")
    return report.write(
        json_path=json_path,
        config={
            "cases": n_cases,
            "distinct_phantoms": distinct,
            "grid": list(shape),
            "crops_written": written,
            "real_like_grid": list(real_shape) if "real_like" in per_case else None,
            "real_like": "the real CT fixture and its label map resampled to 0.7 x 0.7 x 1 mm "
            "(CT linear, labels nearest), generated in a temporary folder at bench time"
            if "real_like" in per_case
            else "not measured: no real CT fixture",
            "crops_per_case": {kind: m["crops_per_case"] for kind, m in per_case.items()},
            "workers": n_workers,
            "quick": quick,
            "rounds": rounds,
            "phantom_seed": 0,
            "crop_size": 96,
            "spacing_mm": 1.0,
            "synth_s": round(synth_s, 1),
            "ingest": "per case, one process, best of rounds: extract_case, what one ingest worker "
            "does for a case (read CT + label map, cut every vertebra, compress, hash, write its "
            "work files)",
            "decode_only": "the floor: ISA-L gunzip of the CT and of the label map into memory "
            "(isal.igzip.decompress of the file's bytes) + np.frombuffer, nothing else",
            "monai_crops": f"the peer: MONAI {monai_version()} as its users write it "
            "(benchmarks/peers/monai_crops.py): LoadImaged (default reader), "
            "EnsureChannelFirstd, Orientationd RAS, Spacingd 1 mm (bilinear / nearest), one "
            "SpatialCrop 96^3 per vertebra at its centroid, SaveImage int16 .nii.gz; the same "
            "vertebrae ingest wrote; no alignment to the spine (vctmae's crops are aligned)",
            "parallel_efficiency_used": round(efficiency, 3),
            "parallel_efficiency_note": "ingest's N-worker speedup divided by the speedup "
            "N pure-Python loops got at the same time (machine_probe_*): this 2-core machine is "
            "shared with other jobs, and a probe near 1 means only one core was free",
            "note": "ratios are of rates (cases/s): ingest_over_X = X's seconds per case / "
            "ingest's; wall/s_per_case/crops_per_s: `vctmae ingest` end to end in a child "
            "process (discovery, extraction, assembly behind it, publish); projection: fixed + "
            "8.06 x per-crop seconds per case over 15 extraction workers at the measured "
            "parallel efficiency, vs assembly on one core at its measured s/crop. This 2-core "
            "machine is shared with other agents' work while measuring (load_avg_*)",
        },
    )
