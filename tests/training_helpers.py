"""Shared pieces of the training tests: the tiny SigLIP 2 model they train."""

from __future__ import annotations

from typing import Any

__all__ = ["RunsACommand", "free_port", "kill_at_step", "recipe_options", "spawn", "tiny_siglip2_config"]


def tiny_siglip2_config(vision_layers: int = 1, text_layers: int = 1, vocab_size: int = 258) -> dict[str, Any]:
    """A transformers-style ``Siglip2Config`` dict of a 16-wide model (patch 8, 16 patches, 12 text positions).

    ``vocab_size`` 258 is the byte tokenizer's (:class:`~kornia_siglip2.training.data.ByteTokenizer`).
    """
    return {
        "model_type": "siglip2",
        "vision_config": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "patch_size": 8,
            "num_patches": 16,
        },
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 12,
        },
    }


def recipe_options(root: Any, out: Any, **overrides: Any) -> dict[str, Any]:
    """``RecipeConfig`` keywords for a 2-step CPU run of the tiny model on ``root``'s 12-image manifest."""
    options = dict(
        data=str(root / "data" / "manifest.jsonl"),
        out=str(out),
        model_config=str(root / "tiny.json"),
        text_length=12,
        parallel="none",
        token_budget=64,
        max_num_patches=(16,),
        steps=2,
        warmup_steps=1,
        num_workers=0,
        threads=1,
        device="cpu",
    )
    options.update(overrides)
    return options


def kill_at_step(command: list[str], metrics: Any, step: int, environment: dict[str, str]) -> None:
    """Start ``command``, SIGKILL it once ``metrics`` (its ``metrics.jsonl``) holds ``step`` lines, and reap it."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= step):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"the run did not reach step {step}"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()


def free_port() -> int:
    """A free TCP port on localhost (for a gloo rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(function, world_size: int, *args, timeout_s: float = 240) -> None:
    """Run ``function(rank, world_size, port, *args)`` in ``world_size`` fresh processes; fail if they hang."""
    import time
    from pathlib import Path

    import pytest
    import torch.multiprocessing as mp

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
        context = mp.start_processes(function, args=(world_size, free_port(), *args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                pytest.fail(f"the {world_size} spawned gloo processes hung for {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


class RunsACommand:
    """Pickles to a call of ``os.system(command)``: what a hostile checkpoint pickle holds."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))
