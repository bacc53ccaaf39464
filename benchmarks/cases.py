"""Benchmark workloads: model sizes, shared random checkpoints, one loader per implementation, each case's inputs.

Every implementation of a case runs on the same weights: a seeded transformers model is written once with
``save_pretrained`` and each implementation loads that folder (ours with ``SigLip2.from_pretrained``, Kornia 0.9
with its HF-keyed ``load_state_dict``). The pytest benchmarks and the memory subprocesses
(:mod:`benchmarks.memory`) build the same inputs from the same case description and seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from benchmarks.flops import text_tower_flops, training_flops, vision_tower_flops

PATCH_SIZE = 16
TEXT_LENGTH = 64
TEXT_VOCAB = 32_000  # SigLIP v1's; the vocabulary only sizes the embedding table, not the compute
NAFLEX_TABLE = 256  # 16 x 16 position table, as google/siglip2-base-patch16-naflex

IMPLEMENTATIONS = ("ours", "transformers", "kornia")
#: graph-compiled runs of the inference cases (benchmarks/test_bench_compiled.py): ours and transformers under
#: ``torch.compile`` (inductor), and ours exported to ONNX in onnxruntime (CPU provider, float32 only)
COMPILED = ("ours_inductor", "transformers_inductor", "ours_onnxruntime")

#: benchmark dtype names -> torch dtypes; every implementation of an entry runs at the same dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class ModelSize:
    """Width and depth shared by both towers."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int


SIZES = {
    # ViT-B/16: the geometry of google/siglip2-base-patch16-*
    "base": ModelSize(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    # ViT-B/16 width, 4 layers: the tower of the speed issue's targets (fp32 and bf16 in minutes on 2 cores)
    "vitb4": ModelSize(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12),
    # same patch grids and token counts, a thin model: `make bench-quick`
    "tiny": ModelSize(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
}


def hf_config(family: str, size: str):
    """transformers config of ``family`` ``"siglip"`` (fixed resolution 224) or ``"siglip2"`` (NaFlex)."""
    dims = vars(SIZES[size])
    text = dict(
        dims,
        vocab_size=TEXT_VOCAB,
        max_position_embeddings=TEXT_LENGTH,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=1,
    )
    if family == "siglip":
        from transformers import SiglipConfig

        config = SiglipConfig(text_config=text, vision_config=dict(dims, patch_size=PATCH_SIZE, image_size=224))
    elif family == "siglip2":
        from transformers import Siglip2Config

        vision = dict(dims, patch_size=PATCH_SIZE, num_patches=NAFLEX_TABLE)
        config = Siglip2Config(text_config=text, vision_config=vision)
    else:
        raise ValueError(f"Unknown family {family!r}; expected 'siglip' or 'siglip2'.")
    config._attn_implementation = "sdpa"
    return config


def _quiet_transformers() -> None:
    """No progress bars or load reports from transformers in benchmark output."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def write_checkpoint(family: str, size: str, folder: Path, seed: int = 0) -> Path:
    """Save a seeded random transformers model of ``family``/``size`` to ``folder`` (safetensors)."""
    from transformers import Siglip2Model, SiglipModel

    _quiet_transformers()

    torch.manual_seed(seed)
    model_class = SiglipModel if family == "siglip" else Siglip2Model
    model = model_class(hf_config(family, size))
    with torch.no_grad():  # move norms and biases off their init so that a dropped weight would show
        generator = torch.Generator().manual_seed(seed)
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def load_model(implementation: str, folder: Path, dtype: str = "float32") -> nn.Module:
    """Load the checkpoint in ``folder`` with ``implementation`` (``ours``, ``transformers`` or ``kornia``).

    ``dtype`` is a key of :data:`DTYPES`; each library converts the float32 weights in its own way.
    """
    torch_dtype = DTYPES[dtype]
    if implementation in ("ours", "ours_inductor", "ours_onnxruntime"):
        from kornia_siglip2 import SigLip2

        return SigLip2.from_pretrained(folder, dtype=torch_dtype).eval()
    if implementation in ("transformers", "transformers_inductor"):
        from transformers import AutoModel

        _quiet_transformers()
        return AutoModel.from_pretrained(folder, attn_implementation="sdpa", dtype=torch_dtype).eval()
    if implementation == "kornia":
        return _load_kornia(folder).to(torch_dtype)
    raise ValueError(f"Unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}.")


def _load_kornia(folder: Path) -> nn.Module:
    """Kornia 0.9's ``SigLip2Model`` (fixed resolution only) with the HF-keyed weights of ``folder``."""
    import json

    from kornia.models.siglip2 import SigLip2Config, SigLip2Model
    from kornia.models.siglip2.config import SigLip2TextConfig, SigLip2VisionConfig
    from safetensors.torch import load_file

    hf = json.loads((folder / "config.json").read_text())
    if hf["model_type"] != "siglip":
        raise ValueError("Kornia 0.9's SigLip2Model has a fixed position table: it cannot run NaFlex checkpoints.")
    vision, text = hf["vision_config"], hf["text_config"]
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    config = SigLip2Config(
        vision_config=SigLip2VisionConfig(
            image_size=vision["image_size"], patch_size=vision["patch_size"], **{k: vision[k] for k in keys}
        ),
        text_config=SigLip2TextConfig(
            vocab_size=text["vocab_size"],
            max_position_embeddings=text["max_position_embeddings"],
            **{k: text[k] for k in keys},
        ),
        projection_dim=vision["hidden_size"],
    )
    state = load_file(folder / "model.safetensors")
    # the one key Kornia names differently (see kornia.models.siglip2.builder.from_pretrained_hf)
    state["vision_model.embeddings.position_embedding"] = state.pop("vision_model.embeddings.position_embedding.weight")
    model = SigLip2Model(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


# 8 images of different aspect ratios (height, width in pixels) for transformers' default NaFlex pipeline
DEFAULT_IMAGE_SIZES = ((480, 480), (480, 640), (640, 480), (360, 640), (640, 360), (400, 800), (800, 400), (300, 900))
# their patch grids under the 256-patch budget, as `naflex_default_grids()` computes (kept literal so that a
# memory worker of ours need not import transformers; test_bench_naflex checks the two agree)
DEFAULT_GRIDS = ((16, 16), (14, 18), (18, 14), (12, 21), (21, 12), (11, 22), (22, 11), (9, 27))
NATIVE_GRIDS = ((8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32))  # 64 ... 1024 patches


def naflex_default_grids(max_num_patches: int = 256) -> tuple[tuple[int, int], ...]:
    """Patch grids that transformers' ``Siglip2ImageProcessor`` gives :data:`DEFAULT_IMAGE_SIZES`."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    grids = []
    for height, width in DEFAULT_IMAGE_SIZES:
        height, width = get_image_size_for_max_num_patches(height, width, PATCH_SIZE, max_num_patches)
        grids.append((height // PATCH_SIZE, width // PATCH_SIZE))
    return tuple(grids)


@dataclass(frozen=True)
class Case:
    """One benchmark workload.

    Attributes:
        name: short id, also the memory worker's key.
        family: checkpoint family, ``"siglip"`` (fixed resolution) or ``"siglip2"`` (NaFlex).
        tower: ``"vision"`` or ``"text"``.
        grids: patch grid ``(h, w)`` of each image (vision), empty for text.
        text_batch: number of texts (text tower).
        padded_length: transformers' padded length (NaFlex), the longest grid when ``None``.
        packed_input: whether ours gets packed ``patches`` + ``grid_thw`` (NaFlex at native resolution)
            rather than transformers' padded ``pixel_values`` + ``pixel_attention_mask`` + ``spatial_shapes``.
        train: forward + backward (a training step without the optimizer) instead of inference.
        implementations: what runs it, ours first.
    """

    name: str
    family: str
    tower: str = "vision"
    grids: tuple[tuple[int, int], ...] = ()
    text_batch: int = 0
    padded_length: int | None = None
    packed_input: bool = False
    train: bool = False
    implementations: tuple[str, ...] = ("ours", "transformers")

    @property
    def seqlens(self) -> list[int]:
        """Real tokens of every sequence."""
        if self.tower == "text":
            return [TEXT_LENGTH] * self.text_batch
        return [height * width for height, width in self.grids]

    @property
    def num_items(self) -> int:
        """Images or texts in the batch."""
        return len(self.seqlens)

    @property
    def num_tokens(self) -> int:
        """Real tokens in the batch."""
        return sum(self.seqlens)

    @property
    def padded_tokens(self) -> int:
        """Tokens a padded implementation computes on (equal to :attr:`num_tokens` without padding)."""
        if self.family != "siglip2" or self.tower == "text":
            return self.num_tokens
        return self.num_items * (self.padded_length or max(self.seqlens))

    def flops(self, size: str) -> int:
        """Useful FLOPs of one step on model ``size`` (real tokens only; see :mod:`benchmarks.flops`)."""
        dims = SIZES[size]
        width, mlp_width, layers = dims.hidden_size, dims.intermediate_size, dims.num_hidden_layers
        if self.tower == "text":
            forward = text_tower_flops(self.text_batch, TEXT_LENGTH, width, mlp_width, layers)
            return training_flops(forward) if self.train else forward
        patch_dim = 3 * PATCH_SIZE**2
        forward = vision_tower_flops(self.seqlens, width, mlp_width, layers, patch_dim)
        return training_flops(forward, 2 * self.num_tokens * patch_dim * width) if self.train else forward

    def reduced(self) -> Case:
        """The same case on its first two items: a cheap parity check between implementations."""
        if self.tower == "text":
            return replace(self, text_batch=2)
        grids = self.grids[:2]
        padded = None if self.padded_length is None else max(self.padded_length, max(h * w for h, w in grids))
        return replace(self, grids=grids, padded_length=padded)

    def inputs(self, implementation: str, seed: int = 0, dtype: str = "float32") -> dict[str, torch.Tensor]:
        """Keyword inputs of ``implementation`` for this case (equal content for every implementation).

        Pixel values and patches are drawn in float32 and then rounded to ``dtype``, so every dtype sees
        the same images up to that rounding.
        """
        torch_dtype = DTYPES[dtype]
        inputs = self._inputs_float32(implementation, seed)
        return {name: value.to(torch_dtype) if value.is_floating_point() else value for name, value in inputs.items()}

    def _inputs_float32(self, implementation: str, seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        if self.tower == "text":
            return {"input_ids": torch.randint(0, TEXT_VOCAB, (self.text_batch, TEXT_LENGTH), generator=generator)}
        if self.family == "siglip":
            (height, width), count = self.grids[0], len(self.grids)
            shape = (count, 3, height * PATCH_SIZE, width * PATCH_SIZE)
            return {"pixel_values": torch.rand(shape, generator=generator) * 2 - 1}
        patch_dim = 3 * PATCH_SIZE**2
        patches = torch.rand(self.num_tokens, patch_dim, generator=generator) * 2 - 1
        grid_thw = torch.tensor([[1, height, width] for height, width in self.grids])
        # ours compiled / exported always gets packed patches: the padded convention un-pads with a host read
        if implementation.startswith("ours") and (self.packed_input or implementation != "ours"):
            return {"patches": patches, "grid_thw": grid_thw}
        from kornia_siglip2.packing import packed_to_padded

        max_length = self.padded_length or max(self.seqlens)
        pixel_values, mask = packed_to_padded(patches, torch.tensor(self.seqlens), max_length)
        return {
            "pixel_values": pixel_values,
            "pixel_attention_mask": mask.long(),
            "spatial_shapes": grid_thw[:, 1:].clone(),
        }


def forward_fn(case: Case, implementation: str, model: nn.Module) -> Callable[..., torch.Tensor]:
    """The call that returns pooled features :math:`(n, D)` of ``case`` for ``implementation``."""
    if case.tower == "text":
        if implementation in ("ours", "transformers"):  # ours has transformers' output type since the redesign
            return lambda **inputs: model.get_text_features(**inputs).pooler_output
        return lambda input_ids: model.get_text_features(input_ids, normalize=False)
    if implementation in ("ours", "transformers"):
        return lambda **inputs: model.get_image_features(**inputs).pooler_output
    return lambda pixel_values: model.get_image_features(pixel_values, normalize=False)


def _compiled_runner(case: Case, implementation: str, model: nn.Module, inputs: dict) -> Callable[[], torch.Tensor]:
    """Inference of a :data:`COMPILED` implementation, compiled (or exported) and warmed up before it is returned.

    Ours gets a ``PackedImages`` built here, outside the compiled function, as a data loader would hand it over.
    """
    from kornia_siglip2 import PackedImages

    model.eval()
    if "patches" in inputs:
        inputs = {"pixel_values": PackedImages(inputs["patches"], inputs["grid_thw"])}
    # every entry compiles afresh, as a user's process would: the suite's many models, dtypes and cases would
    # otherwise pile up on the same function's cache and reach dynamo's recompile limit (an error under fullgraph)
    torch._dynamo.reset()
    if implementation == "ours_onnxruntime":
        return _onnxruntime_runner(case, model, inputs)
    if implementation == "ours_inductor":
        tower = model.text_model if case.tower == "text" else model.vision_model
        compiled = torch.compile(lambda x: tower(x).pooler_output, fullgraph=True)
        (argument,) = inputs.values()

        def forward() -> torch.Tensor:
            return compiled(argument)

    else:
        compiled = torch.compile(forward_fn(case, "transformers", model))

        def forward() -> torch.Tensor:
            return compiled(**inputs)

    def infer() -> torch.Tensor:
        with torch.inference_mode():
            return forward()

    infer(), infer()  # compile, then one run of the compiled code
    return infer


def _onnxruntime_runner(case: Case, model: nn.Module, inputs: dict) -> Callable[[], torch.Tensor]:
    import tempfile

    import onnxruntime

    from kornia_siglip2.export import export_towers

    cache = model.__dict__.setdefault("_bench_onnx", {})
    longest = max(CASES[case.name].seqlens, default=1)  # the full case's (the parity check runs a part first)
    key = (case.tower, max(NAFLEX_TABLE, longest))  # a file exported for 256 patches cannot take a 1024-patch image
    if key not in cache:
        folder = tempfile.mkdtemp(prefix="bench-onnx-")
        export_towers(model, folder, towers=[case.tower], max_patches=key[1])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(
            f"{folder}/{case.tower}.onnx", options, providers=["CPUExecutionProvider"]
        )
        cache[key] = session
    session = cache[key]
    (value,) = inputs.values()
    if case.tower == "text":
        feed = {"input_ids": value.numpy()}
    elif isinstance(value, torch.Tensor):
        feed = {"pixel_values": value.numpy()}
    else:
        feed = {"patches": value.patches.numpy(), "grid_thw": value.grid_thw.numpy()}

    def infer() -> torch.Tensor:
        return torch.from_numpy(session.run(["pooler_output"], feed)[0])

    infer()
    return infer


def make_runner(case: Case, implementation: str, model: nn.Module, inputs: dict) -> Callable[[], torch.Tensor]:
    """A no-argument callable running one step of ``case``: inference, or forward + backward when ``train``."""
    if implementation in COMPILED:
        return _compiled_runner(case, implementation, model, inputs)
    forward = forward_fn(case, implementation, model)
    if not case.train:
        model.eval()

        def infer() -> torch.Tensor:
            with torch.inference_mode():
                return forward(**inputs)

        return infer

    model.train()

    def train_step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        features = forward(**inputs)
        loss = features.float().square().mean()
        loss.backward()
        return loss.detach()

    return train_step


def _cases() -> dict[str, Case]:
    default = DEFAULT_GRIDS
    cases = [
        Case("fixed_b1", "siglip", grids=((14, 14),), implementations=(*IMPLEMENTATIONS, *COMPILED)),
        Case("fixed_b32", "siglip", grids=((14, 14),) * 32, implementations=(*IMPLEMENTATIONS, *COMPILED)),
        Case("fixed_b8_train", "siglip", grids=((14, 14),) * 8, train=True, implementations=IMPLEMENTATIONS),
        Case(
            "naflex_default",
            "siglip2",
            grids=default,
            padded_length=256,
            implementations=("ours", "transformers", *COMPILED),
        ),
        # 8 equal 14 x 14 grids: no padding anywhere, so packing itself saves nothing
        Case(
            "naflex_equal",
            "siglip2",
            grids=((14, 14),) * 8,
            packed_input=True,
            implementations=("ours", "transformers", *COMPILED),
        ),
        Case("naflex_default_train", "siglip2", grids=default, padded_length=256, train=True),
        Case(
            "naflex_native",
            "siglip2",
            grids=NATIVE_GRIDS,
            packed_input=True,
            implementations=("ours", "transformers", *COMPILED),
        ),
        Case("naflex_native_train", "siglip2", grids=NATIVE_GRIDS, packed_input=True, train=True),
        Case("text_b256", "siglip", tower="text", text_batch=256),
        Case("text_b64", "siglip", tower="text", text_batch=64),
    ]
    return {case.name: case for case in cases}


CASES = _cases()


def parity_tolerance(size: str) -> float:
    """Absolute tolerance between implementations on float32 features (deeper models drift more)."""
    return 1e-4 * math.sqrt(SIZES[size].num_hidden_layers)
