"""Command line: ``kornia-siglip2`` / ``python -m kornia_siglip2`` with ``classify``, ``embed``, ``compare``, ``demo``.

- ``classify IMAGE_OR_FOLDER... --labels L1 L2 ...``: table of zero-shot sigmoid probabilities (a folder stands
  for every image in it, recursively, in sorted order).
- ``embed IMAGE_DIR --out FILE``: L2-normalized image embeddings of every image in a folder (any sizes; NaFlex
  models pack them, batched by token budget), decoded and preprocessed in worker processes, with a progress bar in
  images/s, written atomically as ``.safetensors`` or ``.npy`` + a ``.json`` sidecar. Rows follow the sorted
  relative paths; the metadata ``files`` names the image of every row, ``skipped`` what ``--skip-errors`` left
  out. Work is kept in chunks (``FILE.parts/``): an interrupted run resumes when rerun, and ``--rank R
  --world-size W`` (or ``torchrun``'s ``RANK`` / ``WORLD_SIZE``) splits the job over processes or machines sharing
  the output folder; the last one to finish writes ``FILE``, identical to a one-process run.
- ``compare --model M``: parity report against transformers (state-dict keys, weights, outputs).
- ``export --model M --out DIR``: ONNX files of the towers (``vision.onnx``, ``text.onnx``) and ``export.json``
  describing them (inputs, outputs, limits); they run in onnxruntime without PyTorch (needs ``onnx`` and
  ``onnxscript``: the ``dev`` extra).
- ``demo``: offline end-to-end run on a tiny random checkpoint built on the spot, with the parity report; with
  ``--workdir DIR`` it keeps the checkpoint (``DIR/checkpoint``, tokenizer included) for offline use.

Every failure prints one line to stderr and exits with status 1 (2 for a wrong command line, 130 on Ctrl-C);
``embed --skip-errors`` lists the skipped images on stderr and exits with status 3 when it skipped any, unless
``--allow-skipped``. ``--help`` answers without importing torch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_MODEL", "main", "parity_report"]

DEFAULT_MODEL = "google/siglip2-base-patch16-naflex"
_PROG = "kornia-siglip2"
_SKIPPED_STATUS = 3
_EMBED_EPILOG = """output: .safetensors holds tensor 'image_embeds' [N, D] float32 (L2-normalized) and metadata
'files' (JSON list: image of each row), 'skipped' (JSON list of {file, error}), 'model', 'model_fingerprint',
'dtype', 'row_order'; .npy holds the array and FILE's .json sidecar the same metadata. Rows follow the sorted
relative POSIX paths of the images, whatever the number of processes. Chunks are kept in FILE.parts/ until FILE
is written: rerun the same command to resume an interrupted run (refused, naming what changed, if the images,
the model's files or the options did). Several processes: run the same command with --rank 0..W-1
--world-size W (or under torchrun); each computes its share of the chunks and the last one writes FILE."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (argparse prints the usage block too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description="SigLIP / SigLIP 2 zero-shot classification, embeddings and parity.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    classify = commands.add_parser("classify", help="zero-shot probabilities of images against labels")
    classify.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files or folders (every image in a folder, sorted)"
    )
    classify.add_argument("--labels", nargs="+", required=True, metavar="LABEL", help="class names")
    classify.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or folder (default {DEFAULT_MODEL})")
    classify.add_argument(
        "--template", default=None, help='prompt with {label} (default "This is a photo of {label}.")'
    )
    classify.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")

    embed = commands.add_parser(
        "embed",
        help="image embeddings of a folder to .safetensors or .npy",
        epilog=_EMBED_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    embed.add_argument("image_dir", metavar="IMAGE_DIR", help="folder searched recursively for images")
    embed.add_argument("--out", required=True, metavar="FILE", help="output .safetensors or .npy file")
    embed.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or folder (default {DEFAULT_MODEL})")
    embed.add_argument("--batch-size", type=_positive, default=32, help="most images per forward (default 32)")
    embed.add_argument(
        "--max-tokens", type=_positive, default=None, help="NaFlex: most patches per forward (default 32 images' worth)"
    )
    embed.add_argument("--max-num-patches", type=_positive, default=None, help="NaFlex patch budget per image")
    embed.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    embed.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype (default float32; auto: bfloat16 where the CPU has native bf16 matmul (AMX / "
        "AVX512-BF16) or on a GPU, else float32); the output is float32",
    )
    embed.add_argument(
        "--workers", type=int, default=None, help="decoding / preprocessing processes (default: the CPU count, <= 8)"
    )
    embed.add_argument(
        "--decoder",
        default="pillow",
        choices=["pillow", "kornia-rs", "pillow-draft"],
        help="pillow (default: pixels equal transformers'), kornia-rs (faster JPEGs, pixels may differ slightly) or "
        "pillow-draft (JPEGs decoded at a reduced scale, >= 2x the model's input size: much faster on large photos, "
        "pixels differ from pillow's by 0.2-1.7 levels on average after the resize)",
    )
    embed.add_argument("--chunk-size", type=_positive, default=1024, help="rows per kept chunk (default 1024)")
    embed.add_argument("--rank", type=int, default=None, help="this process's rank (default $RANK or 0)")
    embed.add_argument("--world-size", type=_positive, default=None, help="processes (default $WORLD_SIZE or 1)")
    embed.add_argument(
        "--skip-errors", action="store_true", help="skip unreadable folders and images; list them on stderr"
    )
    embed.add_argument("--allow-skipped", action="store_true", help="exit 0 even when images were skipped")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = commands.add_parser("compare", help="parity report against transformers")
    compare.add_argument("--model", required=True, help="hub id or folder")
    compare.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    compare.add_argument("--rtol", type=float, default=1e-4, help="tolerance relative to the largest value")
    compare.add_argument("--device", default="cpu", help="device of both models (default cpu)")

    export = commands.add_parser("export", help="ONNX files of the towers + export.json (onnxruntime, no torch)")
    export.add_argument("--model", required=True, help="hub id or folder")
    export.add_argument("--out", required=True, metavar="DIR", help="output folder")
    export.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights and compute dtype"
    )
    export.add_argument("--opset", type=_positive, default=18, help="ONNX opset (default 18)")
    export.add_argument(
        "--towers", nargs="+", default=["vision", "text"], choices=["vision", "text"], help="default: both"
    )
    export.add_argument(
        "--max-patches",
        type=_positive,
        default=None,
        help="NaFlex: largest h*w per image the file accepts (attention memory grows as images x max_patches^2; "
        "default: the position table's size)",
    )

    demo = commands.add_parser("demo", help="offline end-to-end run on a tiny random checkpoint")
    demo.add_argument(
        "--workdir",
        default=None,
        help="keep the checkpoint (DIR/checkpoint, with tokenizer files: a ready offline model folder) and the "
        "images (DIR/images) here (default: a temporary folder, deleted at the end)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        the exit status: 0 on success, 1 on an error or a failed parity check, 2 on a bad command line, 3 when
        ``embed --skip-errors`` skipped images (unless ``--allow-skipped``), 130 on Ctrl-C.

    Example:
        >>> main(["classify", "missing.png", "--labels", "cat", "--model", "/no/such/folder"])
        1
    """
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad command line (2), already printed by argparse
        return int(stop.code or 0)
    command = {"classify": _classify, "embed": _embed, "compare": _compare, "export": _export, "demo": _demo}[
        args.command
    ]
    try:
        _quiet_transformers()
        return command(args)
    except KeyboardInterrupt:
        print(f"{_PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the CLI promise: one line, never a traceback
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{_PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1


def _device(name: str | None) -> torch.device:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _quiet_transformers() -> None:
    """Keep transformers' warnings (config defaults, the PIL image-processor fallback) out of the output.

    Sets ``TRANSFORMERS_VERBOSITY=error`` unless the user chose a level, without importing transformers (the
    ``embed`` command never needs it); when it is already imported, sets its verbosity directly.
    """
    if "TRANSFORMERS_VERBOSITY" in os.environ:
        return  # the user's choice
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.set_verbosity_error()


def _hide_transformers_progress() -> None:
    """Hide transformers' own progress bars (writing shards, loading weights) in the demo and the report."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _expand_images(arguments: Sequence[str]) -> list[str]:
    """Image paths of the command line; a folder stands for every image in it (recursive, sorted)."""
    from kornia_siglip2._embed import list_images

    images: list[str] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = list_images(path).files
            if not found:
                raise FileNotFoundError(f"no images in folder {argument}")
            images += [str(path / name) for name in found]
        elif path.is_file():
            images.append(argument)
        else:
            raise FileNotFoundError(f"no such image file or folder: {argument}")
    return images


def _classify(args: argparse.Namespace) -> int:
    import torch

    from kornia_siglip2.images import image_tensor
    from kornia_siglip2.zero_shot import DEFAULT_TEMPLATE, ZeroShotClassifier

    paths = _expand_images(args.images)
    # read every image before loading the model: a bad file fails in a second, not after the model load
    images = [image_tensor(path, path) for path in paths]
    classifier = ZeroShotClassifier.from_pretrained(args.model, device=_device(args.device))
    template = args.template or DEFAULT_TEMPLATE
    with torch.inference_mode():
        probabilities = classifier(images, args.labels, template).float().cpu()
    print(f"zero-shot sigmoid probabilities (independent per label), model {args.model}, prompt {template!r}")
    _print_table(
        ["image", *args.labels],
        [[image, *(f"{p:.4f}" for p in row)] for image, row in zip(paths, probabilities.tolist(), strict=True)],
    )
    return 0


def _embed(args: argparse.Namespace) -> int:
    from kornia_siglip2 import _embed as embed

    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"--out must end in .safetensors or .npy, got {out.name}")
    rank = int(os.environ.get("RANK", 0)) if args.rank is None else args.rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if args.world_size is None else args.world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"--rank must be in [0, {world_size}) for --world-size {world_size}, got {rank}")
    folder = Path(args.image_dir)
    listing = embed.list_images(folder, skip_errors=args.skip_errors)
    if not listing.files:
        raise FileNotFoundError(f"no images ({', '.join(embed.IMAGE_SUFFIXES)}) in {folder}")
    embed.check_writable(out)  # before any compute: a bad --out fails now, not after hours
    import torch

    from kornia_siglip2.zero_shot import ZeroShotClassifier

    device = _device(args.device)
    dtype = embed.auto_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    overrides = {} if args.max_num_patches is None else {"max_num_patches": args.max_num_patches}
    classifier = ZeroShotClassifier.from_pretrained(
        args.model, device=device, dtype=dtype, load_tokenizer=False, **overrides
    )
    max_tokens = args.max_tokens
    if max_tokens is None and classifier.model.config.is_naflex:
        max_tokens = args.batch_size * classifier.preprocessor.max_num_patches
    workers = args.workers if args.workers is not None else max(1, min(8, os.cpu_count() or 1))
    from kornia_siglip2.hub import resolve_checkpoint

    job = embed.EmbedJob(
        folder=folder,
        out=out,
        listing=listing,
        model_name=str(args.model),
        dtype=dtype,
        rank=rank,
        world_size=world_size,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        max_tokens=max_tokens,
        workers=max(0, workers),
        decoder=args.decoder,
        skip_errors=args.skip_errors,
        progress=False if args.no_progress else None,
        settings={"preprocessor": repr(classifier.preprocessor), "decoder": args.decoder},
        # what the chunks record: new weights in the same folder must not resume old chunks
        model_sha256=embed.model_fingerprint(resolve_checkpoint(args.model)),
        width=classifier.model.config.vision_config.hidden_size,
    )
    with embed.rank_lock(job):
        try:
            computed, resumed = embed.run_embed(job, classifier)
        except KeyboardInterrupt:
            kept = len(list(job.parts.glob("chunk-*.safetensors")))
            print(
                f"{_PROG} embed: interrupted; {kept} finished chunk(s) kept in {job.parts}: rerun the same command "
                "to resume",
                file=sys.stderr,
            )
            return 130
        result = embed.merge(job)
    note = f" ({resumed} chunk(s) resumed from {job.parts})" if resumed else ""
    if result is None:
        print(
            f"rank {rank}/{world_size}: computed {computed} embeddings{note} into {job.parts}; the last rank to "
            f"finish writes {out}"
        )
        return 0
    if result.get("merged_by_other"):
        print(f"rank {rank}/{world_size}: computed {computed} embeddings{note}; another rank wrote {out}")
        return 0
    rows, dim = result["embeddings"].shape
    where = f"{out}: tensor '{embed.EMBED_KEY}' [{rows}, {dim}] float32" if out.suffix == ".safetensors" else str(out)
    meta = "metadata" if out.suffix == ".safetensors" else f"sidecar {embed.sidecar_path(out)}"
    print(
        f"wrote {rows} embeddings of dimension {dim} to {where}{note}; {meta} 'files' names the image of each row "
        f"(sorted relative paths), 'skipped' the {len(result['skipped'])} skipped"
    )
    skipped = result["skipped"]
    for entry in skipped:
        print(f"{_PROG} embed: skipped {entry['file']}: {entry['error']}", file=sys.stderr)
    if skipped and not args.allow_skipped:
        print(
            f"{_PROG} embed: {len(skipped)} image(s) or folder(s) skipped (listed above and in the output's "
            f"'skipped' metadata); exit status {_SKIPPED_STATUS} (--allow-skipped: 0)",
            file=sys.stderr,
        )
        return _SKIPPED_STATUS
    return 0


def _compare(args: argparse.Namespace) -> int:
    import torch

    _hide_transformers_progress()
    passed, lines = parity_report(args.model, device=torch.device(args.device), atol=args.atol, rtol=args.rtol)
    print("\n".join(lines))
    return 0 if passed else 1


def _export(args: argparse.Namespace) -> int:
    import torch

    from kornia_siglip2.export import export_towers
    from kornia_siglip2.model import SigLip2

    model = SigLip2.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    description = export_towers(model, args.out, args.towers, args.opset, args.max_patches)
    for name, entry in description["files"].items():
        inputs = ", ".join(f"{key} {value['dtype']} {value['shape']}" for key, value in entry["inputs"].items())
        outputs = ", ".join(entry["outputs"])
        print(f"{Path(args.out) / name}: {entry['tower']} tower; inputs {inputs}; outputs {outputs}")
    print(f"{Path(args.out) / 'export.json'}: what each file is")
    return 0


def parity_report(
    name_or_path: str | Path, device: torch.device, atol: float = 1e-4, rtol: float = 1e-4
) -> tuple[bool, list[str]]:
    """Compare our model with transformers' ``AutoModel`` on one checkpoint (the ``compare`` command).

    Checks the state-dict keys (ours written back in the HF layout), the weight values, and the image features,
    text features and ``logits_per_image`` on three images of different sizes and three texts (tokenized when
    the checkpoint has tokenizer files, else random ids), both models fed the same preprocessed tensors.

    Args:
        name_or_path: checkpoint folder or hub id.
        device: device of both models.
        atol: absolute output tolerance.
        rtol: output tolerance relative to the largest transformers value of each output.

    Returns:
        whether everything matches, and the report lines.
    """
    import torch
    import transformers
    from transformers import AutoModel

    from kornia_siglip2.hub import resolve_checkpoint, to_hf_state_dict
    from kornia_siglip2.tokenizer import TOKENIZER_FILES
    from kornia_siglip2.zero_shot import ZeroShotClassifier

    folder = resolve_checkpoint(name_or_path)
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    ours = ZeroShotClassifier.from_pretrained(folder, device=device, load_tokenizer=has_tokenizer)
    # never trust_remote_code; float32 explicitly (transformers 5 would keep the checkpoint's dtype)
    theirs = AutoModel.from_pretrained(str(folder), trust_remote_code=False).to(device=device, dtype=torch.float32)
    theirs.eval()
    lines = [f"parity: kornia_siglip2 vs transformers {transformers.__version__} {type(theirs).__name__}, {device}"]

    ours_state = to_hf_state_dict(ours.model)
    theirs_state = {key: value for key, value in theirs.state_dict().items() if not key.endswith("position_ids")}
    only_ours, only_theirs = sorted(set(ours_state) - set(theirs_state)), sorted(set(theirs_state) - set(ours_state))
    shared = sorted(set(ours_state) & set(theirs_state))
    weight_diff = max((_max_diff(ours_state[key], theirs_state[key]) for key in shared), default=math.inf)
    lines.append(
        f"state dict: {len(shared)} keys in both, {len(only_ours)} only ours {only_ours[:3]}, "
        f"{len(only_theirs)} only transformers {only_theirs[:3]}"
    )
    lines.append(f"weights: max |ours - transformers| = {weight_diff:.3g} over {len(shared)} tensors")

    ours_images, theirs_images, input_ids, description = _parity_inputs(ours, device)
    with torch.inference_mode():
        rows = [
            _diff_row(
                "image features",
                ours.model.encode_image(**ours_images),
                _pooled(theirs.get_image_features(**theirs_images)),
            ),
            _diff_row(
                "text features",
                ours.model.encode_text(input_ids),
                _pooled(theirs.get_text_features(input_ids=input_ids)),
            ),
            _diff_row(
                "logits_per_image",
                ours.model(input_ids, **ours_images).logits_per_image,
                theirs(input_ids=input_ids, **theirs_images).logits_per_image,
            ),
        ]
    lines.append(f"inputs: {description}")
    header = ["output", "shape", "max|diff|", "mean|diff|", "ours mean", "ours std", "ours min", "ours max"]
    lines.extend(_format_table(header, [cells for cells, _, _ in rows]))
    outputs_ok = all(diff <= atol + rtol * scale for _, diff, scale in rows)
    keys_ok, weights_ok = not (only_ours or only_theirs), weight_diff == 0.0
    worst = max(diff for _, diff, _ in rows)
    lines.append(
        f"verdict: {'PASS' if keys_ok and weights_ok and outputs_ok else 'FAIL'} "
        f"(keys {'match' if keys_ok else 'differ'}, weights {'identical' if weights_ok else 'differ'}, "
        f"outputs max diff {worst:.3g} {'<=' if outputs_ok else '>'} atol {atol:g} + rtol {rtol:g} x max|transformers|)"
    )
    return keys_ok and weights_ok and outputs_ok, lines


def _parity_inputs(classifier: Any, device: torch.device) -> tuple[dict[str, Any], dict[str, Any], torch.Tensor, str]:
    """Same preprocessed images for both models (packed for us, padded for transformers' NaFlex) and texts."""
    import torch

    from kornia_siglip2.preprocess import NaFlexImagePreprocessor, to_padded

    generator = torch.Generator().manual_seed(0)
    # noise, a smooth gradient and an extreme aspect ratio
    ramp_y, ramp_x = torch.meshgrid(torch.linspace(0, 1, 480), torch.linspace(0, 1, 640), indexing="ij")
    images = [
        torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=generator),
        (torch.stack([ramp_x, ramp_y, 1 - ramp_x * ramp_y]) * 255).round().to(torch.uint8),
        torch.randint(0, 256, (3, 1000, 100), dtype=torch.uint8, generator=generator),
    ]
    preprocessor = classifier.preprocessor
    with torch.inference_mode():
        preprocessed = preprocessor([image.to(device) for image in images])
    if isinstance(preprocessor, NaFlexImagePreprocessor):
        padded = to_padded(preprocessed, preprocessor.max_num_patches)
        ours_images: dict[str, Any] = {"patches": preprocessed.patches, "grid_thw": preprocessed.grid_thw}
        theirs_images: dict[str, Any] = padded._asdict()
        image_text = f"patch grids {padded.spatial_shapes.tolist()}, packed for us, padded for transformers"
    else:
        ours_images = theirs_images = {"pixel_values": preprocessed}
        image_text = f"resized to {tuple(preprocessed.shape[-2:])}"
    texts = ["a photo of a cat", "This is a photo of TWO dogs!", "a " * 100 + "bird"]
    if classifier.tokenizer is not None:
        input_ids = classifier.tokenizer(texts)
        text_text = f"{len(texts)} texts tokenized by {type(classifier.tokenizer.tokenizer).__name__}"
    else:
        config = classifier.model.config.text_config
        input_ids = torch.randint(0, config.vocab_size, (3, config.max_position_embeddings), generator=generator)
        text_text = "3 random id sequences (the checkpoint has no tokenizer files)"
    description = f"3 images 224x224, 480x640, 1000x100 ({image_text}); {text_text}"
    return ours_images, theirs_images, input_ids.to(device), description


def _max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    if ours.shape != theirs.shape:
        return math.inf
    return float((ours.float() - theirs.float()).abs().max()) if ours.numel() else 0.0


def _pooled(output: Any) -> torch.Tensor:
    """Pooled features of transformers' ``get_*_features`` (a model output in transformers 5, a tensor in 4.x)."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def _diff_row(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> tuple[list[str], float, float]:
    ours, theirs = ours.detach().float().cpu(), theirs.detach().float().cpu()
    if ours.shape != theirs.shape:
        return [name, f"{tuple(ours.shape)} vs {tuple(theirs.shape)}", "shape", "", "", "", "", ""], math.inf, 0.0
    diff = (ours - theirs).abs()
    cells = [
        name,
        "x".join(str(size) for size in ours.shape),
        f"{diff.max():.2e}",
        f"{diff.mean():.2e}",
        f"{ours.mean():+.4f}",
        f"{ours.std():.4f}",
        f"{ours.min():+.4f}",
        f"{ours.max():+.4f}",
    ]
    return cells, float(diff.max()), float(theirs.abs().max())


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print("\n".join(_format_table(header, rows)))


def _demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.workdir is not None:
        return _run_demo(Path(args.workdir), start)
    with tempfile.TemporaryDirectory(prefix="kornia_siglip2_demo_") as workdir:
        return _run_demo(Path(workdir), start)


def _run_demo(workdir: Path, start: float) -> int:
    import torch

    from kornia_siglip2._demo import DEMO_LABELS, build_tiny_checkpoint, write_shape_images
    from kornia_siglip2.hub import read_config
    from kornia_siglip2.images import load_image
    from kornia_siglip2.lens import logit_lens
    from kornia_siglip2.zero_shot import DEFAULT_TEMPLATE, ZeroShotClassifier

    _hide_transformers_progress()
    # the demo's matrices are tiny: a second thread costs more in synchronisation than it computes
    torch.set_num_threads(1)
    print("kornia_siglip2 demo (offline). The weights are RANDOM: the numbers show that the pipeline runs and")
    print("matches transformers, not what the images contain.\n")

    checkpoint = build_tiny_checkpoint(workdir / "checkpoint")
    config = read_config(checkpoint)
    vision, text = config["vision_config"], config["text_config"]
    print(
        f"[1/5] tiny random checkpoint (transformers Siglip2Model, NaFlex): vision {vision['num_hidden_layers']} "
        f"layers x {vision['hidden_size']}, patch {vision['patch_size']}, {vision['num_patches']} patches max; "
        f"text {text['num_hidden_layers']} layers, Gemma-style BPE tokenizer of {text['vocab_size']} ids\n"
        f"      -> {checkpoint}"
    )
    paths = write_shape_images(workdir / "images")
    pixels = [load_image(path) for path in paths]
    sizes = ", ".join(
        f"{path.name} {image.shape[1]}x{image.shape[2]}" for path, image in zip(paths, pixels, strict=True)
    )
    print(f"[2/5] {len(paths)} PNG images (H x W): {sizes}")

    classifier = ZeroShotClassifier.from_pretrained(checkpoint)
    prompts = [DEFAULT_TEMPLATE.format(label=label) for label in DEMO_LABELS]
    with torch.inference_mode():
        packed = classifier.preprocessor(pixels)
        input_ids = classifier.tokenizer(prompts)
        logits = classifier.model(input_ids, patches=packed.patches, grid_thw=packed.grid_thw).logits_per_image
        lens = logit_lens(classifier.model, input_ids, patches=packed.patches, grid_thw=packed.grid_thw)
    print(
        f"[3/5] our pipeline: files -> {type(classifier.preprocessor).__name__} -> packed {packed.patches.shape[0]} "
        f"patches, grid_thw {packed.grid_thw.tolist()} -> SigLip2 -> logits {tuple(logits.shape)}"
    )

    print("[4/5] parity with transformers (Siglip2Processor + Siglip2Model on the same files):")
    checks = _demo_checks(checkpoint, paths, prompts, classifier, packed, input_ids, logits)
    checks.append(("logit lens, last layer == logits_per_image", bool(torch.equal(lens[-1], logits)), "bit-exact"))
    for name, ok, detail in checks:
        print(f"    {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    model_ok, report = parity_report(checkpoint, torch.device("cpu"))
    print("    model parity report (as `kornia-siglip2 compare`):")
    print("\n".join(f"      {line}" for line in report))

    print("[5/5] zero-shot sigmoid probabilities (random weights: expect no meaningful ranking)")
    probabilities = torch.sigmoid(logits).tolist()
    rows = [[path.name, *(f"{p:.4f}" for p in row)] for path, row in zip(paths, probabilities, strict=True)]
    print("\n".join(f"    {line}" for line in _format_table(["image", *DEMO_LABELS], rows)))
    lens_rows = [[f"layer {index}", *(f"{v:+.3f}" for v in layer[0].tolist())] for index, layer in enumerate(lens)]
    print(f"    logit lens of {paths[0].name} (layer 0 = embeddings; last = its logits):")
    print("\n".join(f"      {line}" for line in _format_table(["", *DEMO_LABELS], lens_rows)))

    passed = model_ok and all(ok for _, ok, _ in checks)
    seconds = time.perf_counter() - start
    print(f"\n{'PASS' if passed else 'FAIL'}: demo finished in {seconds:.1f} s (weights are random).")
    return 0 if passed else 1


def _demo_checks(
    checkpoint: Path,
    paths: Sequence[Path],
    prompts: Sequence[str],
    classifier: Any,
    packed: Any,
    input_ids: torch.Tensor,
    logits: torch.Tensor,
) -> list[tuple[str, bool, str]]:
    """Compare our pipeline's intermediate results with transformers' processor + model on the same files."""
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, Siglip2Model, Siglip2Processor
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    from kornia_siglip2.preprocess import to_padded

    image_processor = Siglip2ImageProcessorPil.from_pretrained(checkpoint)
    processor = Siglip2Processor(image_processor, AutoTokenizer.from_pretrained(str(checkpoint)))
    reference_model = Siglip2Model.from_pretrained(str(checkpoint)).eval()
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    # Siglip2Processor's class defaults (patch 16, 256 patches) would override its image processor's settings
    sizes = {"patch_size": image_processor.patch_size, "max_num_patches": image_processor.max_num_patches}
    inputs = processor(text=list(prompts), images=images, return_tensors="pt", **sizes)
    with torch.inference_mode():
        reference = reference_model(**inputs).logits_per_image
        same_inputs = classifier.model(
            inputs["input_ids"],
            inputs["pixel_values"],
            pixel_attention_mask=inputs["pixel_attention_mask"],
            spatial_shapes=inputs["spatial_shapes"],
        ).logits_per_image
    padded = to_padded(packed, inputs["pixel_values"].shape[1])
    mask = padded.pixel_attention_mask.bool()
    pixel_diff = float((padded.pixel_values[mask] - inputs["pixel_values"][mask]).abs().max())
    same_diff = float((same_inputs - reference).abs().max())
    end_diff = float((logits - reference).abs().max())
    return [
        (
            "token ids equal to Siglip2Processor's",
            torch.equal(input_ids, inputs["input_ids"]),
            str(tuple(input_ids.shape)),
        ),
        (
            "patch grids equal",
            torch.equal(padded.spatial_shapes, inputs["spatial_shapes"]),
            str(padded.spatial_shapes.tolist()),
        ),
        (
            "pixels equal (Pillow's integer resize replayed)",
            pixel_diff == 0,
            f"max diff {pixel_diff:.1e}",
        ),
        ("logits on the same input tensors", same_diff <= 1e-4, f"max diff {same_diff:.2e} (atol 1e-4)"),
        (
            "logits end to end from the files",
            end_diff <= 1e-4,
            f"max diff {end_diff:.2e} (atol 1e-4)",
        ),
    ]
