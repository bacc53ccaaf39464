"""Export the towers as graphs: ``torch.export`` programs and ONNX files that run without PyTorch.

Each tower is wrapped in a module whose inputs are plain tensors and whose forward contains everything,
including what eager mode computes on the host:

- NaFlex vision (:class:`NaFlexVisionExport`): ``patches`` float :math:`(N, p^2 C)` and ``grid_thw`` int64
  :math:`(n, 3)` only. The layout (which block every patch belongs to, its place in its grid) is computed
  inside the graph from ``grid_thw`` (:meth:`~kornia_siglip2.packing.ImageLayout.from_tensors`); attention runs
  per image on padded :math:`(n, L_{max})` blocks with a key mask (memory :math:`n L_{max}^2`, never the square
  of the total patch count), with :math:`L_{max}` = ``max_patches`` fixed at export; position embeddings are
  resized per grid with weight matrices (no antialiased ``interpolate``, which ONNX does not reproduce).
  Any number of images, any grids with ``h * w <= max_patches``, one frame per grid row (``t = 1``).
- fixed-resolution vision (:class:`FixedVisionExport`): ``pixel_values`` :math:`(B, C, H, W)`, dynamic ``B``.
- text (:class:`TextExport`): ``input_ids`` int64 :math:`(B, L)`, dynamic ``B``, ``L`` fixed at export.

Outputs are named ``pooler_output`` (and ``last_hidden_state`` for the vision towers: packed :math:`(N, D)` for
NaFlex, :math:`(B, h w, D)` for fixed resolution).

Example:
    >>> from kornia_siglip2 import VisionConfig
    >>> from kornia_siglip2.vision import VisionTransformer
    >>> config = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    ...                       patch_size=4, num_patches=16, position_embedding="naflex")
    >>> program = export_program(NaFlexVisionExport(VisionTransformer(config).eval(), max_patches=16))
    >>> patches, grid_thw = torch.rand(10, 48), torch.tensor([[1, 2, 3], [1, 2, 2]])
    >>> [tuple(out.shape) for out in program.module()(patches, grid_thw)]
    [(10, 32), (2, 32)]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kornia_siglip2.errors import check
from kornia_siglip2.packing import ImageLayout

__all__ = [
    "FixedVisionExport",
    "NaFlexVisionExport",
    "TextExport",
    "export_onnx",
    "export_program",
    "export_towers",
]


class NaFlexVisionExport(nn.Module):
    """A NaFlex vision tower as a function of ``(patches, grid_thw)`` alone, layout computed in the graph.

    Args:
        tower: a :class:`~kornia_siglip2.vision.VisionTransformer` with NaFlex position embeddings.
        max_patches: largest ``h * w`` of an image (the padded block length :math:`L_{max}`).
    """

    input_names = ("patches", "grid_thw")
    output_names = ("last_hidden_state", "pooler_output")

    def __init__(self, tower: nn.Module, max_patches: int) -> None:
        super().__init__()
        check(tower.config.is_naflex, "NaFlexVisionExport needs a NaFlex tower (position_embedding='naflex').")
        check(max_patches > 0, lambda: f"max_patches must be positive, got {max_patches}.")
        self.tower = tower
        self.max_patches = int(max_patches)

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two images of different grids (a trace sees more than one image, so ``n`` stays symbolic)."""
        config = self.tower.config
        side = max(2, min(4, int(self.max_patches**0.5)))
        grid_thw = torch.tensor([[1, side, side], [1, side - 1, side]])
        width = config.num_channels * config.patch_size**2
        dtype = self.tower.embeddings.patch_embedding.weight.dtype
        return torch.rand(int(grid_thw.prod(-1).sum()), width, dtype=dtype), grid_thw

    def dynamic_shapes(self) -> dict[str, Any]:
        """The symbolic sizes: the number of patches and the number of images."""
        return {
            "patches": {0: torch.export.Dim("num_patches", min=2)},
            "grid_thw": {0: torch.export.Dim("num_images", min=2)},
        }

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``last_hidden_state`` :math:`(N, D)` and ``pooler_output`` :math:`(n, D)`."""
        layout = ImageLayout.from_tensors(grid_thw, patches.shape[0], grid_thw.shape[0], self.max_patches)
        output = self.tower._forward_packed(patches, layout, False, False, None, None)
        return output.last_hidden_state, output.pooler_output


class FixedVisionExport(nn.Module):
    """A fixed-resolution vision tower as a function of ``pixel_values`` :math:`(B, C, H, W)`.

    Args:
        tower: a :class:`~kornia_siglip2.vision.VisionTransformer`.
        image_size: the side :math:`H = W` the graph is traced at (the batch size stays free).
    """

    input_names = ("pixel_values",)
    output_names = ("last_hidden_state", "pooler_output")

    def __init__(self, tower: nn.Module, image_size: int) -> None:
        super().__init__()
        self.tower = tower
        self.image_size = int(image_size)

    def example_inputs(self) -> tuple[torch.Tensor]:
        """Two images at ``image_size``."""
        dtype = self.tower.embeddings.patch_embedding.weight.dtype
        return (torch.rand(2, self.tower.config.num_channels, self.image_size, self.image_size, dtype=dtype),)

    def dynamic_shapes(self) -> dict[str, Any]:
        """The symbolic size: the batch."""
        return {"pixel_values": {0: torch.export.Dim("batch", min=2)}}

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``last_hidden_state`` :math:`(B, h w, D)` and ``pooler_output`` :math:`(B, D)`."""
        output = self.tower(pixel_values)
        return output.last_hidden_state, output.pooler_output


class TextExport(nn.Module):
    """The text tower as a function of ``input_ids`` :math:`(B, L)`.

    Args:
        tower: a :class:`~kornia_siglip2.text.TextTransformer`.
        length: the sequence length :math:`L` the graph is traced at (the batch size stays free).
    """

    input_names = ("input_ids",)
    output_names = ("pooler_output",)

    def __init__(self, tower: nn.Module, length: int) -> None:
        super().__init__()
        self.tower = tower
        self.length = int(length)

    def example_inputs(self) -> tuple[torch.Tensor]:
        """Two random texts of ``length`` ids."""
        return (torch.randint(0, self.tower.config.vocab_size, (2, self.length)),)

    def dynamic_shapes(self) -> dict[str, Any]:
        """The symbolic size: the batch."""
        return {"input_ids": {0: torch.export.Dim("batch", min=2)}}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``pooler_output`` :math:`(B, P)`."""
        return self.tower(input_ids).pooler_output


ExportWrapper = NaFlexVisionExport | FixedVisionExport | TextExport


def export_program(wrapper: ExportWrapper) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a wrapper with its dynamic dimensions (see the module docstring)."""
    return torch.export.export(wrapper.eval(), wrapper.example_inputs(), dynamic_shapes=wrapper.dynamic_shapes())


def export_onnx(wrapper: ExportWrapper, path: str | Path, opset: int = 18) -> Path:
    """Write ``wrapper`` as one ONNX file (weights inside) with named inputs / outputs and dynamic dimensions.

    Needs the ``onnx`` and ``onnxscript`` packages (the ``dev`` extra).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(wrapper)
    onnx_program = torch.onnx.export(
        program,
        input_names=list(wrapper.input_names),
        output_names=list(wrapper.output_names),
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    onnx_program.save(str(path))
    return path


def export_towers(
    model: nn.Module,
    out: str | Path,
    towers: Sequence[str] = ("vision", "text"),
    opset: int = 18,
    max_patches: int | None = None,
) -> dict[str, Any]:
    """Export the towers of a :class:`~kornia_siglip2.SigLip2` to ``out/`` and describe them in ``export.json``.

    Args:
        model: the model, in the dtype the files should compute in.
        out: output folder.
        towers: ``"vision"`` and / or ``"text"``.
        opset: ONNX opset.
        max_patches: NaFlex only: largest ``h * w`` per image (default: the position table's size).

    Returns:
        the description written to ``export.json``: per file its tower, inputs, outputs and limits.
    """
    check(
        set(towers) <= {"vision", "text"} and len(towers) > 0,
        lambda: f"towers must be 'vision' and / or 'text', got {list(towers)}.",
    )
    out = Path(out)
    model = model.eval()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    files: dict[str, Any] = {}
    if "vision" in towers:
        vision = model.vision_model
        config = vision.config
        if config.is_naflex:
            limit = config.num_patches if max_patches is None else max_patches
            wrapper: ExportWrapper = NaFlexVisionExport(vision, limit)
            inputs = {
                "patches": {"dtype": dtype, "shape": ["num_patches", config.num_channels * config.patch_size**2]},
                "grid_thw": {"dtype": "int64", "shape": ["num_images", 3]},
            }
            outputs = {
                "last_hidden_state": {"shape": ["num_patches", config.hidden_size]},
                "pooler_output": {"shape": ["num_images", config.hidden_size]},
            }
            notes = {"max_patches": limit, "patch_size": config.patch_size, "frames_per_grid": 1}
        else:
            wrapper = FixedVisionExport(vision, config.image_size)
            grid = config.image_size // config.patch_size
            inputs = {"pixel_values": {"dtype": dtype, "shape": ["batch", 3, config.image_size, config.image_size]}}
            outputs = {
                "last_hidden_state": {"shape": ["batch", grid * grid, config.hidden_size]},
                "pooler_output": {"shape": ["batch", config.hidden_size]},
            }
            notes = {"image_size": config.image_size, "patch_size": config.patch_size}
        export_onnx(wrapper, out / "vision.onnx", opset)
        files["vision.onnx"] = {"tower": "vision", "inputs": inputs, "outputs": outputs, **notes}
    if "text" in towers:
        text = model.text_model
        length = text.config.max_position_embeddings
        export_onnx(TextExport(text, length), out / "text.onnx", opset)
        files["text.onnx"] = {
            "tower": "text",
            "inputs": {"input_ids": {"dtype": "int64", "shape": ["batch", length]}},
            "outputs": {"pooler_output": {"shape": ["batch", text.config.projection_size]}},
            "sequence_length": length,
        }
    description = {
        "model": getattr(model, "name_or_path", ""),
        "dtype": dtype,
        "opset": opset,
        "files": files,
        "logit_scale": float(model.logit_scale.detach().float().exp()),
        "logit_bias": float(model.logit_bias.detach().float()),
    }
    (out / "export.json").write_text(json.dumps(description, indent=2) + "\n")
    return description
