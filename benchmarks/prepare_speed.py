"""Prepare throughput on a generated image folder, and the memory of one epoch over a large prepared set.

Part 1 (throughput): writes ``--images`` random JPEG/PNG files (sizes 64-160 px, RGB, ten
class subfolders) into a temporary folder, then times ``ddpm.prepare.prepare`` on it with
``source: imagefolder`` at each ``--num-proc``, side by side in one run (best of
``--repeats``), and checks that every run gives the same content hash.

Part 2 (memory, ``--epoch-gib`` > 0): writes a prepared ``train_images.npy`` of that size
(uint8 (N, 3, 32, 32), filled chunk by chunk through ``open_memmap``), then, in a fresh
process, reads one epoch of batches from it the way ``ddpm.train`` does (memory-mapped,
a sorted random batch of rows, converted to float in [-1, 1]) and reports peak memory
from /proc/self/status: RssAnon (private memory: what the process really holds),
RssFile (pages of the mapped file: clean page cache, which the kernel reclaims under
pressure) and VmHWM (peak RSS, the sum). A second reader fetches each row with
``os.preadv`` into a reused buffer instead of mapping the file, so no file page counts
towards its RSS.

    python benchmarks/prepare_speed.py                       # 3000 images, num_proc 1 and 2
    python benchmarks/prepare_speed.py --epoch-gib 20 --out benchmarks/results/prepare_speed_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from ddpm.config import PrepareConfig  # noqa: E402
from ddpm.prepare import prepare  # noqa: E402
from ddpm.sources import open_source  # noqa: E402

IN_MEMORY_LIMIT_GIB = 2  # ddpm.train reads prepared sets up to this size into RAM, larger ones stay mapped


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` random RGB images, 64-160 px a side, half JPEG and half PNG, in ten class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = rng.integers(64, 161, size=2)
        # smooth noise (a random 8x8 grid, upscaled) compresses like a photo, unlike white noise
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((int(w), int(h)), Image.BILINEAR)
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        if i % 2:
            img.save(folder / f"{i:05d}.jpg", quality=90)
        else:
            img.save(folder / f"{i:05d}.png")
    return root


def _cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the decoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_prepare(folder: Path, out: Path, num_proc: int, resolution: int) -> tuple[float, float, dict]:
    """Wall time and CPU time (all processes) of one run, and its manifest."""
    cfg = PrepareConfig(source="imagefolder", source_path=str(folder), out_dir=str(out), resolution=resolution,
                        num_proc=num_proc)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    manifest = prepare(cfg)
    return time.perf_counter() - t0, _cpu_seconds() - c0, manifest


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import PIL

    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem:.0f} GiB RAM; {platform.platform()}; "
            f"Python {platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}")


# -- part 2: one epoch over a memory-mapped set -------------------------------------------------


def write_big_npy(path: Path, gib: float, shape=(3, 32, 32), seed: int = 0) -> int:
    row = int(np.prod(shape))
    n = int(gib * 2**30) // row
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *shape))
    chunk = np.random.default_rng(seed).integers(0, 256, (max(1, (256 << 20) // row), *shape), dtype=np.uint8)
    for start in range(0, n, len(chunk)):
        stop = min(n, start + len(chunk))
        mm[start:stop] = chunk[: stop - start]
        mm[start:stop, 0, 0, 0] = np.arange(start, stop) % 251  # rows differ, so nothing can be deduplicated
    mm.flush()
    del mm
    return n


def _status() -> dict[str, int]:
    """RssAnon, RssFile, VmRSS, VmHWM in KiB from /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def epoch(path: str, batch: int, reader: str, max_steps: int = 0) -> dict:
    """One epoch of sorted random batches from a .npy, as ddpm.train reads them.

    reader "memmap": ``np.load(mmap_mode="r")`` and fancy indexing (ddpm.train today);
    reader "pread": one ``os.preadv`` per row into a reused buffer, no mapping at all.
    ``max_steps`` > 0 stops after that many batches.
    """
    import torch

    images = np.load(path, mmap_mode="r")
    n, row_shape, offset = len(images), images.shape[1:], images.offset
    row_bytes = int(np.prod(row_shape))
    fd = os.open(path, os.O_RDONLY)
    buffer = np.empty((batch, *row_shape), dtype=np.uint8)
    base = _status()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy()  # once per epoch
    peak = dict(base)
    t0 = time.perf_counter()
    steps = min(n // batch, max_steps) if max_steps else n // batch
    for step in range(steps):
        idx = np.sort(perm[step * batch : (step + 1) * batch])
        if reader == "memmap":
            rows = images[idx]
        else:
            for j, i in enumerate(idx):
                os.preadv(fd, [buffer[j]], offset + int(i) * row_bytes)
            rows = buffer
        x0 = torch.from_numpy(rows).float().div(127.5).sub(1)  # (B, C, H, W) in [-1, 1], as ddpm.train
        del x0, rows
        if step % 256 == 0:
            peak = {k: max(v, peak[k]) for k, v in _status().items()}
    os.close(fd)
    seconds = time.perf_counter() - t0
    peak = {k: max(v, peak[k]) for k, v in _status().items()}
    # what ddpm.train does today: a fresh randperm(n) for every batch
    t1 = time.perf_counter()
    for e in range(5):
        torch.randperm(n, generator=torch.Generator().manual_seed(e))
    return {"n": n, "batch": batch, "steps": steps, "seconds": seconds, "images_per_s": steps * batch / seconds,
            "start": base, "peak": peak, "randperm_s": (time.perf_counter() - t1) / 5,
            "file_gib": os.path.getsize(path) / 2**30}


READERS = {"memmap": "memmap + fancy indexing (ddpm.train)", "pread": "one pread per row, no mapping"}


def memory_rows(gib: float, batch: int, pread_steps: int, workdir: Path) -> list[dict]:
    path = workdir / "train_images.npy"
    t0 = time.perf_counter()
    n = write_big_npy(path, gib)
    print(f"wrote {path} ({n} images, {path.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - t0:.0f} s")
    rows = []
    for reader in READERS:  # each in a fresh process, so peak RSS is the epoch's own
        cmd = [sys.executable, __file__, "--_epoch", str(path), "--batch", str(batch), "--reader", reader,
               "--max-steps", str(pread_steps if reader == "pread" else 0)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(rows[-1])
    path.unlink()
    return rows


def memory_table(rows: list[dict]) -> str:
    mib = lambda kib: f"{kib / 1024:,.0f}"  # noqa: E731
    lines = ["| reader | images read | file GiB | seconds | images/s | RssAnon start / peak MiB | bytes/image | "
             "RssFile peak MiB | VmHWM (peak RSS) MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        growth = (r["peak"]["RssAnon"] - r["start"]["RssAnon"]) * 1024 / r["n"]
        lines.append(f"| {READERS[r['reader']]} | {r['steps'] * r['batch']:,} | {r['file_gib']:.1f} | {r['seconds']:.0f} | "
                     f"{r['images_per_s']:,.0f} | {mib(r['start']['RssAnon'])} / {mib(r['peak']['RssAnon'])} | "
                     f"{growth:.1f} | {mib(r['peak']['RssFile'])} | {mib(r['peak']['VmHWM'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epoch-gib", type=float, default=0.0, help="size of the memory-mapped set; 0: skip part 2")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pread-steps", type=int, default=3000,
                   help="batches for the pread reader (its memory is flat by construction; a whole epoch of "
                        "single-row reads from disk takes long)")
    p.add_argument("--reader", choices=list(READERS), default="memmap", help=argparse.SUPPRESS)
    p.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help="where to write the generated data (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the results as markdown to this file")
    p.add_argument("--_epoch", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._epoch:  # the fresh process of part 2
        result = epoch(args._epoch, args.batch, args.reader, args.max_steps)
        print(json.dumps({**result, "reader": args.reader}))
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        import datasets

        datasets.config.HF_DATASETS_CACHE = tmp / "hf-cache"
        t0 = time.perf_counter()
        folder = make_folder(tmp / "photos", args.images)
        made = time.perf_counter() - t0
        size_mib = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
        listing = []
        for _ in range(2):  # the first call builds datasets' Arrow index of the files, the second reuses it
            t0 = time.perf_counter()
            open_source(PrepareConfig(source="imagefolder", source_path=str(folder)))
            listing.append(time.perf_counter() - t0)
        best: dict[int, tuple[float, float, dict]] = {}
        for _ in range(args.repeats):  # alternate the settings, so drifting load affects all alike
            for num_proc in args.num_proc:
                run = time_prepare(folder, tmp / f"out{num_proc}", num_proc, args.resolution)
                if num_proc not in best or run[0] < best[num_proc][0]:
                    best[num_proc] = run
        rows = []
        for num_proc in args.num_proc:
            seconds, cpu, manifest = best[num_proc]
            count = sum(manifest["splits"][s]["count"] for s in ("train", "test"))
            rows.append((num_proc, seconds, cpu, count, manifest["content_hash"]))
        speed = ["| num_proc | images | wall s | images/s | speed-up | CPU s (all processes) | CPU ms/image | "
                 "content hash |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for num_proc, seconds, cpu, count, digest in rows:
            speed.append(f"| {num_proc} | {count} | {seconds:.2f} | {count / seconds:,.0f} | "
                         f"{rows[0][1] / seconds:.2f}x | {cpu:.2f} | {1000 * cpu / count:.2f} | `{digest[:12]}` |")
        same = len({r[4] for r in rows}) == 1
        memory = memory_rows(args.epoch_gib, args.batch, args.pread_steps, tmp) if args.epoch_gib else []

    report = [
        "# Prepare throughput" + (" and epoch memory" if memory else ""),
        "",
        f"- command: `python {shlex.join(['benchmarks/prepare_speed.py', *sys.argv[1:]])}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- load average (1 min) before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
        "(other jobs share this machine's cores; a load above the core count slows every row)",
        "",
        f"## Prepare: {args.images} generated images ({size_mib:.0f} MiB; RGB JPEG/PNG, 64-160 px) "
        f"-> {args.resolution}x{args.resolution}",
        "",
        f"Best of {args.repeats} runs of the whole stage (list, decode, EXIF, resize + crop, write, hash), "
        f"the settings alternating. Same content hash at every num_proc: {same}. Generating the folder took "
        f"{made:.1f} s.",
        "",
        *speed,
        "",
        f"Listing the folder through `load_dataset(\"imagefolder\")` takes {listing[0]:.2f} s the first time "
        f"and {listing[1]:.2f} s once datasets has cached its index ({1000 * listing[1] / args.images:.2f} ms "
        "per file, in the main process, before any decoding): the serial part that bounds the speed-up "
        "of num_proc. Decoding processes are spawned (about 0.5 s to start) while the folder is listed.",
    ]
    if memory:
        r = memory[0]
        report += [
            "",
            f"## One training epoch over {r['file_gib']:.0f} GiB of uint8 images "
            f"({r['file_gib'] / IN_MEMORY_LIMIT_GIB:.0f}x the {IN_MEMORY_LIMIT_GIB} GiB that ddpm.train reads into RAM)",
            "",
            f"Batch {r['batch']}, one sorted random batch of rows per step from the memory-mapped "
            f"`train_images.npy`, converted to float (what ddpm.train does per step, minus the model).",
            "",
            memory_table(memory),
            "",
            f"ddpm.train draws a fresh `torch.randperm(n)` for every batch: at n = {r['n']:,} that costs "
            f"{r['randperm_s']:.2f} s per step (measured), against "
            f"{r['seconds'] / r['steps'] * 1000:.2f} ms per step for reading the batch.",
        ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
