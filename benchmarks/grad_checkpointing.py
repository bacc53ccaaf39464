"""Activation checkpointing: peak host memory and time of one training step, with and without it.

``python -m benchmarks.grad_checkpointing [--layers 4] [--tokens 1024] [--images 4] [--threads 1]``

Each mode runs in a fresh process (started by this launcher, which imports no torch, so the child's
``ru_maxrss`` does not inherit a large high-water mark): it builds a NaFlex vision tower of ViT-B width
(768, 12 heads, MLP 3072) with ``--layers`` blocks, packs ``--images`` images of ``--tokens / --images``
patches each, resets its high-water mark (``/proc/self/clear_refs`` ``5``, as :mod:`benchmarks.memory`), runs
one forward + backward of the mean square of the pooled features and reports the peak RSS beyond that
baseline (activations + gradients) and the step time. glibc's mmap threshold is pinned at 128 KiB as in
:mod:`benchmarks.memory`. It prints one JSON line per mode and the ratios; the timings are one run each on
whatever load the machine has, so read the memory, not the speed, as the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(checkpointing: bool, layers: int, tokens: int, images: int) -> dict:
    import gc
    import resource
    import time

    import torch

    from kornia_siglip2.config import VisionConfig
    from kornia_siglip2.packing import PackedImages
    from kornia_siglip2.vision import VisionTransformer

    torch.manual_seed(0)
    config = VisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=layers,
        num_attention_heads=12,
        patch_size=16,
        num_patches=256,
        position_embedding="naflex",
    )
    tower = VisionTransformer(config).train()
    tower.encoder.set_grad_checkpointing(checkpointing)
    side = max(1, round((tokens // images) ** 0.5))
    patches = torch.randn(images * side * side, 16 * 16 * 3)
    packed = PackedImages(patches, torch.tensor([[1, side, side]] * images))
    # gradients of the weights are allocated by the first backward: warm them up so both modes count the same
    tower(patches=packed.patches, grid_thw=packed.grid_thw).pooler_output.square().mean().backward()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    tower(patches=packed.patches, grid_thw=packed.grid_thw).pooler_output.square().mean().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"grad_checkpointing": checkpointing, "step_mib": round(peak - baseline, 1), "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child == "on", args.layers, args.tokens, args.images)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    results = {}
    for mode in ("off", "on"):
        command = [sys.executable, "-m", "benchmarks.grad_checkpointing", "--child", mode]
        command += ["--layers", str(args.layers), "--tokens", str(args.tokens), "--images", str(args.images)]
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
        print(json.dumps(results[mode]))
    memory = results["on"]["step_mib"] / max(results["off"]["step_mib"], 1e-9)
    time_ratio = results["on"]["seconds"] / results["off"]["seconds"]
    print(f"with checkpointing: {memory:.2f}x the step memory, {time_ratio:.2f}x the step time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
