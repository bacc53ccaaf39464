"""Start-up time and memory of the training recipe against the dataset size: tar shards versus a JSONL manifest.

``python -m benchmarks.stream_startup [--sizes 1000 1000000] [--manifest-sizes 1000 100000] [--folder DIR]``

For every size it writes generated samples (one 16x16 PNG, a caption and a ``json`` with width and height per
sample, 500 samples per shard; the manifest variant lists one image file many times with its width and height,
so that planning an epoch opens no file), then runs ``python -m kornia_siglip2.train`` on a tiny model (the tests'
16-wide one, 2 steps, 2 DataLoader workers, 1 thread) in a fresh process and measures, from the launch:

- **first step**: seconds until the first line of ``metrics.jsonl`` (imports, model, data set-up, the first batch
  through the workers, one optimizer step);
- **peak RSS**: the largest resident set of the main process and of each DataLoader worker, sampled every 20 ms
  with psutil over the whole run.

It prints a Markdown table. Run by hand (not part of ``make bench``): writing 10^6 samples takes a few minutes and
~3 GB of disk. Timings are single runs on whatever load the machine has.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD = 500
TINY = {
    "model_type": "siglip2",
    "vision_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "patch_size": 8,
        "num_patches": 16,
    },
    "text_config": {
        "vocab_size": 258,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 12,
    },
}


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, count: int) -> str:
    """``count`` samples in shards of :data:`PER_SHARD`; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    image = _png()
    meta = json.dumps({"width": 16, "height": 16}).encode()
    shards = (count + PER_SHARD - 1) // PER_SHARD
    for shard in range(shards):
        with tarfile.open(folder / f"s-{shard:06d}.tar", "w") as archive:
            for number in range(shard * PER_SHARD, min((shard + 1) * PER_SHARD, count)):
                caption = f"a red square number {number}".encode()
                for extension, data in (("png", image), ("txt", caption), ("json", meta)):
                    info = tarfile.TarInfo(f"{number:09d}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return str(folder / f"s-{{000000..{shards - 1:06d}}}.tar")


def write_manifest(folder: Path, count: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "square.png").write_bytes(_png())
    with (folder / "manifest.jsonl").open("w") as handle:
        for number in range(count):
            line = {"image": "square.png", "caption": f"a red square number {number}", "width": 16, "height": 16}
            handle.write(json.dumps(line) + "\n")
    return str(folder / "manifest.jsonl")


def measure(data: str, folder: Path) -> dict:
    import psutil

    (folder / "tiny.json").write_text(json.dumps(TINY))
    out = folder / "run"
    command = [sys.executable, "-m", "kornia_siglip2.train", "--data", data, "--out", str(out)]
    command += ["--model-config", str(folder / "tiny.json"), "--text-length", "12", "--parallel", "none"]
    command += ["--token-budget", "256", "--max-num-patches", "16", "--steps", "2", "--warmup-steps", "1"]
    command += ["--num-workers", "2", "--threads", "1", "--device", "cpu", "--no-tensorboard", "--no-resume"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    main, workers, first_step = 0, 0, None
    watched = psutil.Process(process.pid)
    metrics = out / "metrics.jsonl"
    while process.poll() is None:
        try:
            main = max(main, watched.memory_info().rss)
            for child in watched.children(recursive=True):
                workers = max(workers, child.memory_info().rss)
        except psutil.Error:
            pass
        if first_step is None and metrics.is_file() and metrics.read_text().strip():
            first_step = time.perf_counter() - start
        time.sleep(0.02)
    if process.returncode != 0:
        raise RuntimeError(process.stderr.read().decode()[-2000:])
    return {"first_step_s": first_step, "main_rss_mib": main / 2**20, "worker_rss_mib": workers / 2**20}


def measure_imports() -> dict:
    """The same measures for a process that only imports the recipe (the share of start-up no data size changes)."""
    import psutil

    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    command = [sys.executable, "-c", "import kornia_siglip2.training.recipe"]
    process = subprocess.Popen(command, env=environment)
    peak = 0
    while process.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, psutil.Process(process.pid).memory_info().rss)
        time.sleep(0.02)
    return {"first_step_s": time.perf_counter() - start, "main_rss_mib": peak / 2**20, "worker_rss_mib": 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 1000000], help="samples in shards")
    parser.add_argument("--manifest-sizes", type=int, nargs="*", default=[1000, 100000], help="samples in JSONL")
    parser.add_argument("--folder", default=None, help="where to write the data (default: a temporary folder)")
    args = parser.parse_args(argv)
    root = Path(args.folder or tempfile.mkdtemp(prefix="stream-startup-"))
    rows = [("imports only", 0, 0.0, measure_imports())]
    print(json.dumps({"data": "imports only", **rows[0][3]}), flush=True)
    for kind, sizes, writer in (
        ("tar shards", args.sizes, write_shards),
        ("JSONL", args.manifest_sizes, write_manifest),
    ):
        for count in sizes:
            folder = root / f"{kind.split()[0].lower()}-{count}"
            started = time.perf_counter()
            data = writer(folder / "data", count)
            written = time.perf_counter() - started
            result = measure(data, folder)
            rows.append((kind, count, written, result))
            print(json.dumps({"data": kind, "samples": count, "write_s": written, **result}), flush=True)
    print("\n| data | samples | first step (s) | peak RSS main (MiB) | peak RSS per worker (MiB) |")
    print("|---|---|---|---|---|")
    for kind, count, _, result in rows:
        print(
            f"| {kind} | {count:,} | {result['first_step_s']:.1f} | {result['main_rss_mib']:.0f} | "
            f"{result['worker_rss_mib']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
