"""Compare Kornia's ``kornia.models.siglip2`` with transformers and kornia_siglip2 on one tiny checkpoint.

Every row loads the *same* tiny random transformers ``SiglipModel`` (or ``Siglip2Model``) into Kornia's
``SigLip2Model`` (as ``SigLip2Builder.from_pretrained_hf`` would, minus the download) and into
:class:`kornia_siglip2.SigLip2`, runs both on the same tensors, and prints the largest difference from
transformers. Offline, CPU, a few seconds.

Usage::

    python scripts/kornia_compare.py                       # the installed kornia (0.9.2 here)
    python scripts/kornia_compare.py --source DIR          # another copy of kornia/models/siglip2, e.g. the
                                                           # series applied: build/kornia_pr/tree/kornia/models/siglip2
    python scripts/kornia_compare.py --markdown            # the table of docs/upstreaming.md

The Kornia columns are measurements, not assertions: ``tests/test_kornia_patch.py`` asserts only the
kornia_siglip2 column (Kornia may fix its module at any time).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Row", "compare", "load_kornia_module", "main"]

# one width for both towers: Kornia's text head is Linear(hidden, hidden), so projection_size = hidden
WIDTH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
VOCAB, TEXT_LENGTH, PATCH, IMAGE = 99, 64, 4, 16


@dataclass
class Row:
    """One comparison: what is measured, Kornia's result, ours, and the test that pins ours."""

    check: str
    kornia: str
    ours: str
    test: str
    ours_ok: bool


def load_kornia_module(source: str | Path | None = None) -> ModuleType:
    """Import ``kornia.models.siglip2``, or the same package from the folder ``source`` (relative imports)."""
    if source is None:
        return importlib.import_module("kornia.models.siglip2")
    folder = Path(source)
    name = "_kornia_siglip2_source"
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{folder} is not a copy of kornia/models/siglip2 (no __init__.py).")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _perturb(model: torch.nn.Module, seed: int) -> None:
    # move every weight off its init, so a dropped or swapped tensor shows (as tests/conftest.py does)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.7)


def _hf_models(seed: int = 0) -> tuple[Any, Any]:
    from transformers import Siglip2Config, Siglip2Model, SiglipConfig, SiglipModel

    text = dict(WIDTH, vocab_size=VOCAB, max_position_embeddings=TEXT_LENGTH, pad_token_id=1, eos_token_id=1)
    torch.manual_seed(seed)
    fixed = SiglipModel(SiglipConfig(text_config=text, vision_config=dict(WIDTH, patch_size=PATCH, image_size=IMAGE)))
    torch.manual_seed(seed + 1)
    naflex = Siglip2Model(
        Siglip2Config(text_config=text, vision_config=dict(WIDTH, patch_size=PATCH, num_patches=IMAGE))
    )
    for model in (fixed, naflex):
        _perturb(model.eval(), seed)
    return fixed.double(), naflex.double()


def _kornia_config(kornia: ModuleType) -> Any:
    config_module = importlib.import_module(kornia.__name__ + ".config")
    vision = config_module.SigLip2VisionConfig(image_size=IMAGE, patch_size=PATCH, **WIDTH)
    text = config_module.SigLip2TextConfig(vocab_size=VOCAB, max_position_embeddings=TEXT_LENGTH, **WIDTH)
    return kornia.SigLip2Config(vision_config=vision, text_config=text, projection_dim=WIDTH["hidden_size"])


def _load_into_kornia(kornia: ModuleType, hf_model: Any) -> Any:
    """What ``SigLip2Builder.from_pretrained_hf`` does after its download: rename one key, load strictly."""
    state_dict = {key: value.clone() for key, value in hf_model.state_dict().items()}
    key = "vision_model.embeddings.position_embedding.weight"
    state_dict[key.removesuffix(".weight")] = state_dict.pop(key)
    model = kornia.SigLip2Builder.from_config(_kornia_config(kornia)).double()
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _ours(hf_model: Any, folder: Path) -> Any:
    from kornia_siglip2 import SigLip2

    hf_model.save_pretrained(folder, safe_serialization=True)
    return SigLip2.from_pretrained(folder, dtype=torch.float64)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _fmt(value: float) -> str:
    return f"{value:.1e}"


def _attempt(function: Callable[[], str]) -> str:
    try:
        return function()
    except Exception as error:  # report any failure as a measurement, with its type
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # load_state_dict's first line only names the model: show the first mismatch instead
        message = next((line for line in lines if "size mismatch" in line or "Missing" in line), lines[0])
        return f"{type(error).__name__}: {message[:90]}{'...' if len(message) > 90 else ''}"


def _fixed_loss(kornia_model: Any, image: torch.Tensor, text: torch.Tensor, scale: float, bias: float) -> float:
    """Kornia's ``return_loss`` on given embeddings (the towers are bypassed)."""
    kornia_model.get_image_features = lambda *args, **kwargs: image
    kornia_model.get_text_features = lambda *args, **kwargs: text
    with torch.no_grad():
        kornia_model.logit_scale.fill_(math.log(scale))
        kornia_model.logit_bias.fill_(bias)
    dummy_ids = torch.zeros(image.shape[0], 1, dtype=torch.long)
    return kornia_model(pixel_values=image, input_ids=dummy_ids, return_loss=True).loss.item()


def compare(source: str | Path | None = None, workdir: str | Path | None = None) -> list[Row]:
    """Run every check; ``source`` picks a copy of ``kornia/models/siglip2`` other than the installed one."""
    import tempfile

    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.utils import logging as transformers_logging

    from kornia_siglip2.losses import sigmoid_loss
    from kornia_siglip2.preprocess import SigLipImagePreprocessor

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    kornia = load_kornia_module(source)
    workdir = Path(workdir or tempfile.mkdtemp())
    hf_fixed, hf_naflex = _hf_models()
    ours = _ours(hf_fixed, workdir / "siglip")
    ours_naflex = _ours(hf_naflex, workdir / "siglip2")
    kornia_model = _load_into_kornia(kornia, hf_fixed)
    rows: list[Row] = []

    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(3, 3, IMAGE, IMAGE, generator=generator, dtype=torch.float64)
    input_ids = torch.randint(0, VOCAB, (3, TEXT_LENGTH), generator=generator)
    with torch.no_grad():
        expected = hf_fixed(input_ids=input_ids, pixel_values=pixel_values)
        theirs = kornia_model(pixel_values=pixel_values, input_ids=input_ids)
        mine = ours(input_ids=input_ids, pixel_values=pixel_values)
    d_kornia, d_ours = (
        _diff(theirs.logits_per_image, expected.logits_per_image),
        _diff(mine.logits_per_image, expected.logits_per_image),
    )
    rows.append(
        Row(
            "fixed-resolution forward, no mask: max abs(logits - transformers) (fp64)",
            _fmt(d_kornia),
            _fmt(d_ours),
            "tests/test_model.py::TestParitySiglip::test_forward",
            d_ours < 1e-10,
        )
    )

    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 40:] = 0
    attention_mask[1, 10:] = 0
    with torch.no_grad():
        expected_text = hf_fixed.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        theirs_text = kornia_model.get_text_features(input_ids, attention_mask=attention_mask, normalize=False)
        mine_text = ours.encode_text(input_ids, attention_mask)
    d_kornia, d_ours = _diff(theirs_text, expected_text), _diff(mine_text, expected_text)
    rows.append(
        Row(
            "text with a padding attention_mask: max abs(pooled - transformers) (fp64)",
            _fmt(d_kornia) + (" (NaN)" if theirs_text.isnan().any() else ""),
            _fmt(d_ours),
            "tests/test_model.py::TestParitySiglip::test_text_attention_mask",
            d_ours < 1e-10,
        )
    )

    with torch.no_grad():
        expected_loss = hf_fixed(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss
        theirs_loss = kornia_model(pixel_values=pixel_values, input_ids=input_ids, return_loss=True).loss
        mine_loss = ours(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss
    rows.append(
        Row(
            f"return_loss vs transformers' loss ({expected_loss.item():.6f}) (fp64)",
            f"{theirs_loss.item():.6f} (diff {_fmt(abs(theirs_loss.item() - expected_loss.item()))})",
            f"{mine_loss.item():.6f} (diff {_fmt(abs(mine_loss.item() - expected_loss.item()))})",
            "tests/test_model.py::TestParitySiglip::test_loss",
            abs(mine_loss.item() - expected_loss.item()) < 1e-10,
        )
    )

    # closed form of the SigLIP loss: every image orthogonal to every text, t = 10, b = -10, n = 4
    basis = torch.eye(8, dtype=torch.float64)
    image_basis, text_basis = basis[:4], basis[4:]
    closed_form = F.softplus(torch.tensor(10.0, dtype=torch.float64)) + 3 * F.softplus(
        torch.tensor(-10.0, dtype=torch.float64)
    )
    loss_model = _load_into_kornia(kornia, hf_fixed)
    theirs_closed = _fixed_loss(loss_model, image_basis, text_basis, 10.0, -10.0)
    mine_closed = sigmoid_loss(
        image_basis, text_basis, torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0).double()
    ).item()
    rows.append(
        Row(
            f"closed form, all pairs orthogonal, t = 10, b = -10, n = 4: expected {closed_form.item():.6f}",
            f"{theirs_closed:.6f}",
            f"{mine_closed:.6f}",
            "tests/test_losses_sigmoid.py::TestSigmoidLoss::test_closed_form_orthogonal",
            abs(mine_closed - closed_form.item()) < 1e-6,
        )
    )

    # a released So400m learned exp(t') = 109.9: no clamp in transformers
    hf_big = _hf_models()[0]
    with torch.no_grad():
        hf_big.logit_scale.fill_(math.log(109.9))
    big_kornia, big_ours = _load_into_kornia(kornia, hf_big), _ours(hf_big, workdir / "siglip_big")
    with torch.no_grad():
        expected = hf_big(input_ids=input_ids, pixel_values=pixel_values).logits_per_image
        d_kornia = _diff(big_kornia(pixel_values=pixel_values, input_ids=input_ids).logits_per_image, expected)
        d_ours = _diff(big_ours(input_ids=input_ids, pixel_values=pixel_values).logits_per_image, expected)
    rows.append(
        Row(
            "logit_scale = log(109.9) (a released So400m): max abs(logits - transformers)",
            _fmt(d_kornia),
            _fmt(d_ours),
            "tests/test_model.py::TestSigLip2Module::test_logit_scale_is_not_clamped",
            d_ours < 1e-10,
        )
    )

    fresh = kornia.SigLip2Builder.from_config(_kornia_config(kornia))
    from kornia_siglip2.losses import SigmoidLoss

    our_init = SigmoidLoss()
    rows.append(
        Row(
            "initial (exp(t'), b); the paper (sec. 3.2) uses (10, -10)",
            f"({fresh.logit_scale.exp().item():.2f}, {fresh.logit_bias.item():.1f})",
            f"({our_init.logit_scale.exp().item():.2f}, {our_init.logit_bias.item():.1f})",
            "tests/test_losses_sigmoid.py::TestSigmoidLossModule::test_init_values",
            abs(our_init.logit_scale.exp().item() - 10) < 1e-5 and our_init.logit_bias.item() == -10,
        )
    )

    def load_naflex() -> str:
        _load_into_kornia(kornia, hf_naflex)
        return "loads"

    grid = torch.tensor([[1, 3, 5]])
    naflex_pixels = torch.randn(15, PATCH * PATCH * 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        reference_pooled = hf_naflex.vision_model(
            pixel_values=naflex_pixels[None],
            pixel_attention_mask=torch.ones(1, 15, dtype=torch.long),
            spatial_shapes=grid[:, 1:],
        ).pooler_output
        d_ours = _diff(ours_naflex.encode_image(patches=naflex_pixels, grid_thw=grid), reference_pooled)
    rows.append(
        Row(
            "load a SigLIP 2 NaFlex checkpoint (model_type siglip2) and run a 3x5-patch image",
            _attempt(load_naflex),
            f"pooled diff {_fmt(d_ours)}",
            "tests/test_model.py::TestParitySiglip2NaFlex::test_forward",
            # transformers resizes the NaFlex position table in float32 for every dtype (its
            # Siglip2VisionEmbeddings.resize_positional_embeddings), so float64 agrees only to float32 accuracy:
            # the float32 parity tolerance of tests/conftest.py (atol 1e-5)
            d_ours < 1e-5,
        )
    )

    other = torch.randn(2, 3, 24, 32, generator=generator, dtype=torch.float64)

    def kornia_other() -> str:
        with torch.no_grad():
            kornia_model.get_image_features(other)
        return "runs"

    with torch.no_grad():
        expected = hf_fixed.vision_model(other, interpolate_pos_encoding=True).pooler_output
        d_ours = _diff(ours.encode_image(other), expected)
    rows.append(
        Row(
            "fixed checkpoint at 24x32 (transformers: interpolate_pos_encoding=True)",
            _attempt(kornia_other),
            f"pooled diff {_fmt(d_ours)}",
            "tests/test_model.py::TestParitySiglip::test_other_resolution",
            d_ours < 1e-10,
        )
    )

    def from_name(name: str) -> Callable[[], str]:
        def build() -> str:
            config = kornia.SigLip2Config.from_name(name)
            return f"builds (hidden {config.vision_config.hidden_size}, patch {config.vision_config.patch_size})"

        return build

    for name in ("google/siglip2-so400m-patch14-384", "google/siglip-so400m-patch14-384"):
        rows.append(
            Row(
                f"architecture of {name} (ours reads config.json)",
                _attempt(from_name(name)) if hasattr(kornia.SigLip2Config, "from_name") else "no from_name",
                "any config.json",
                "tests/test_hub.py::test_minimal_hub_config_gets_transformers_defaults",
                True,
            )
        )

    # preprocessing against transformers' SiglipImageProcessor (PIL backend), 480x640 uint8 -> 224x224:
    # uniform noise (the worst case for an antialiasing filter) and a sinusoid of period ~30 pixels
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    sinusoid = np.stack([127 + 120 * np.sin(x / 5 + y / 7), x * 255 / 640, y * 255 / 480]).astype(np.uint8)
    images = {
        "noise": torch.from_numpy(rng.integers(0, 256, (3, 480, 640), dtype=np.uint8)),
        "sinusoid": torch.from_numpy(sinusoid),
    }
    level = 2 / 255  # one uint8 step after normalization
    preprocessor_module = importlib.import_module(kornia.__name__ + ".preprocessor")
    for resample, mode in ((3, "bicubic"), (2, "bilinear")):
        try:
            kornia_pre = preprocessor_module.SigLip2ImagePreprocessor(image_size=(224, 224), interpolation=mode)
        except TypeError:  # older copies have no interpolation argument
            kornia_pre = preprocessor_module.SigLip2ImagePreprocessor(image_size=(224, 224))
        ours_pre = SigLipImagePreprocessor(224, resample=resample).double()
        processor = SiglipImageProcessorPil(size={"height": 224, "width": 224}, resample=resample)
        kornia_cells, ours_cells, worst = [], [], 0.0
        for name, image in images.items():
            reference = processor([image], return_tensors="pt", input_data_format="channels_first")["pixel_values"]
            theirs = (kornia_pre(image.double()[None]) - reference).abs() / level
            mine = (ours_pre([image]) - reference).abs() / level
            kornia_cells.append(f"{name} {theirs.max().item():.1f} (mean {theirs.mean().item():.2f})")
            ours_cells.append(f"{name} {mine.max().item():.2f} (mean {mine.mean().item():.2f})")
            worst = max(worst, mine.max().item())
        rows.append(
            Row(
                f"fixed preprocessing ({mode}, 480x640 -> 224x224): max abs diff to transformers in uint8 levels",
                "; ".join(kornia_cells),
                "; ".join(ours_cells),
                "tests/test_preprocess.py::TestSigLipImagePreprocessor::test_matches_transformers",
                worst <= 1e-4,  # uint8 input takes Pillow's integer arithmetic: identical pixels
            )
        )
    return rows


def _print(rows: list[Row], markdown: bool, label: str) -> None:
    header = ("check", label, "kornia_siglip2", "test that pins ours")
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print(f"| {row.check} | {row.kornia} | {row.ours} | `{row.test}` |")
        return
    for row in rows:
        print(f"- {row.check}\n    {label}: {row.kornia}\n    ours: {row.ours}  [{row.test}]")


def main(argv: list[str] | None = None) -> int:
    """Print the comparison; exit status 1 when a kornia_siglip2 row is out of tolerance."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="a folder holding a copy of kornia/models/siglip2 (default: installed)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    import kornia

    label = f"kornia {kornia.__version__}" if args.source is None else f"kornia ({args.source})"
    rows = compare(args.source)
    _print(rows, args.markdown, label)
    return 0 if all(row.ours_ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
