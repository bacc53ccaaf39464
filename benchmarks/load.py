"""Load and start-up: ``from_pretrained`` time, host memory after load and after one forward, in fresh processes.

The checkpoint is the largest CI can hold comfortably: a random SigLIP model written with transformers'
``save_pretrained``, So400m width (1152 wide, MLP 4304, 16 heads, the geometry of
``google/siglip-so400m-patch14-384``) with reduced depth (8 vision and 4 text layers; patch 16 at 224 so the
forward stays short), 0.9 GB of float32 safetensors. ``tiny`` is the same at the quick model's size.

Method (one fresh ``python -m benchmarks.load --measure`` process per measurement; the page cache holds the
file already, so the disk is not what is timed):

1. import torch and the implementation's library (their import time is reported apart as ``import_s``),
   read ``VmRSS`` (``base``) and reset the high-water mark (``/proc/self/clear_refs`` ``5``);
2. time ``from_pretrained`` (``load_s``); read ``VmRSS`` (``rss_load``) and ``VmHWM`` (``peak_load``);
3. reset the high-water mark, run one ``get_image_features`` on a 224 x 224 image under
   ``torch.inference_mode`` (``forward_s``; NaFlex: transformers' padded inputs of 14 x 14 patches), read
   ``VmRSS`` / ``VmHWM`` again (``rss_forward``, ``peak_forward``).

``RssAnon`` (``anon_load``, ``anon_forward``) is the anonymous part of the resident set: memory the process
owns, as opposed to the memory-mapped safetensors pages that the kernel can drop and re-read. Every memory
figure is MiB above ``base`` (``RssAnon``: above its own base); the printed and recorded ratios ours /
transformers (:data:`MEMORY_KEYS`) are the figure of merit: <= 1.0 is the target. ``VmHWM`` rather than
``ru_maxrss``: a process started by ``exec`` inherits its parent's ``ru_maxrss`` (see :mod:`benchmarks.memory`).

``python -m benchmarks.load [--size tiny|so400m|so400m-naflex] [--rounds N]`` prints the comparison; the pytest
entries are ``benchmarks/test_bench_load.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["LOAD_SIZES", "MEMORY_KEYS", "measure_in_subprocess", "write_load_checkpoint"]

REPO_ROOT = Path(__file__).resolve().parents[1]

#: (width, MLP width, heads, vision layers, text layers); a ``-naflex`` size is a ``Siglip2Model`` (NaFlex, 256
#: position rows, linear patch embedding), the others ``SiglipModel`` (fixed resolution, Conv2d patch embedding)
LOAD_SIZES = {
    "so400m": (1152, 4304, 16, 8, 4),
    "so400m-naflex": (1152, 4304, 16, 8, 4),
    "tiny": (64, 256, 4, 2, 2),
}
#: memory figures whose ratio ours / transformers is reported (target: <= 1.0)
MEMORY_KEYS = (
    "rss_load_mib",
    "anon_load_mib",
    "peak_load_mib",
    "rss_forward_mib",
    "anon_forward_mib",
    "peak_forward_mib",
)


def write_load_checkpoint(size: str, folder: Path, seed: int = 0) -> Path:
    """Save a seeded random transformers ``SiglipModel`` of load size ``size`` to ``folder`` (safetensors)."""
    import torch
    from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel

    from benchmarks.cases import TEXT_LENGTH, TEXT_VOCAB, _quiet_transformers

    _quiet_transformers()
    width, mlp_width, heads, vision_layers, text_layers = LOAD_SIZES[size]
    dims = dict(hidden_size=width, intermediate_size=mlp_width, num_attention_heads=heads)
    text = dict(
        dims,
        num_hidden_layers=text_layers,
        vocab_size=TEXT_VOCAB,
        max_position_embeddings=TEXT_LENGTH,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=1,
    )
    vision = dict(dims, num_hidden_layers=vision_layers, patch_size=16)
    torch.manual_seed(seed)
    if size.endswith("-naflex"):
        model = Siglip2Model(Siglip2Config(text_config=text, vision_config=dict(vision, num_patches=256)))
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=dict(vision, image_size=224)))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_hiwater() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _image_inputs(folder: Path) -> dict:
    """One 224 x 224 image: ``pixel_values`` for a fixed checkpoint, transformers' padded inputs for NaFlex."""
    import torch

    generator = torch.Generator().manual_seed(0)
    if json.loads((folder / "config.json").read_text())["model_type"] == "siglip2":  # 14 x 14 patches of 16
        return {
            "pixel_values": torch.rand(1, 196, 768, generator=generator) * 2 - 1,
            "pixel_attention_mask": torch.ones(1, 196, dtype=torch.int32),
            "spatial_shapes": torch.tensor([[14, 14]]),
        }
    return {"pixel_values": torch.rand(1, 3, 224, 224, generator=generator) * 2 - 1}


def _measure(implementation: str, folder: Path) -> dict:
    """Steps 1-3 of the method, in this (fresh) process."""
    start = time.perf_counter()
    import torch

    from benchmarks.cases import _quiet_transformers

    if implementation == "ours":
        from kornia_siglip2 import SigLip2

        def load():
            return SigLip2.from_pretrained(folder)

        def features(model, inputs):
            return model.get_image_features(**inputs).pooler_output

    else:
        from transformers import AutoModel

        _quiet_transformers()

        def load():
            return AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()

        def features(model, inputs):
            return model.get_image_features(**inputs).pooler_output

    import_s = time.perf_counter() - start
    inputs = _image_inputs(folder)
    base, base_anon = _status_mib("VmRSS"), _status_mib("RssAnon")
    _reset_hiwater()
    start = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - start
    rss_load, peak_load, anon_load = _status_mib("VmRSS"), _status_mib("VmHWM"), _status_mib("RssAnon")
    _reset_hiwater()
    start = time.perf_counter()
    with torch.inference_mode():
        features(model, inputs)
    forward_s = time.perf_counter() - start
    rss_forward, peak_forward, anon_forward = _status_mib("VmRSS"), _status_mib("VmHWM"), _status_mib("RssAnon")
    weights_mib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    return {
        "implementation": implementation,
        "import_s": import_s,
        "load_s": load_s,
        "forward_s": forward_s,
        "weights_mib": weights_mib,
        "rss_load_mib": rss_load - base,
        "anon_load_mib": anon_load - base_anon,
        "peak_load_mib": peak_load - base,
        "rss_forward_mib": rss_forward - base,
        "anon_forward_mib": anon_forward - base_anon,
        "peak_forward_mib": peak_forward - base,
        "threads": torch.get_num_threads(),
    }


def measure_in_subprocess(implementation: str, folder: Path, timeout: float = 600) -> dict:
    """Run :func:`_measure` in a fresh interpreter; returns its record (raises with its stderr on failure)."""
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)), MALLOC_MMAP_THRESHOLD_="131072")
    command = [sys.executable, "-m", "benchmarks.load", "--measure", implementation, str(folder)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"load measurement of {implementation} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _warm_page_cache(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as handle:
            while handle.read(1 << 24):
                pass


def compare(size: str, rounds: int = 3) -> dict[str, list[dict]]:
    """``rounds`` alternating measurements of ours and transformers on a fresh checkpoint of ``size``."""
    with tempfile.TemporaryDirectory(prefix=f"load-{size}-") as tmp:
        folder = write_load_checkpoint(size, Path(tmp))
        _warm_page_cache(folder)
        records: dict[str, list[dict]] = {"ours": [], "transformers": []}
        for _ in range(rounds):
            for implementation in records:
                records[implementation].append(measure_in_subprocess(implementation, folder))
    return records


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=2, metavar=("IMPLEMENTATION", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(LOAD_SIZES), default="so400m")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(_measure(args.measure[0], Path(args.measure[1]))))
        return
    import statistics

    records = compare(args.size, args.rounds)
    medians = {}
    for implementation, rows in records.items():
        median = {key: statistics.median(row[key] for row in rows) for key in rows[0] if key.endswith(("_s", "_mib"))}
        medians[implementation] = median
        print(implementation, json.dumps({key: round(value, 3) for key, value in median.items()}))
    ratios = {key: medians["ours"][key] / medians["transformers"][key] for key in MEMORY_KEYS}
    print("memory ours / transformers", json.dumps({key: round(value, 3) for key, value in ratios.items()}))


if __name__ == "__main__":
    main()
