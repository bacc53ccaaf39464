"""kornia_siglip2.export: torch.export programs with dynamic sizes, and the ONNX files of `kornia-siglip2 export`
in onnxruntime, against eager PyTorch on batches of different compositions."""

import json

import numpy as np
import pytest
import torch
from conftest import SIGLIP_IMAGE_SIZE

from kornia_siglip2 import PackedImages, SigLip2
from kornia_siglip2.cli import main
from kornia_siglip2.export import FixedVisionExport, NaFlexVisionExport, TextExport, export_program

# a few image counts and grids per batch, grids above / below / equal to the tests' 4 x 4 table, one column too
COMPOSITIONS = [[(2, 3), (4, 4)], [(1, 2), (3, 3), (2, 5), (8, 1)], [(4, 4)] * 3, [(6, 2)], [(7, 9), (1, 1)]]
ORT_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}


def _packed(grids, seed=0):
    generator = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor([[1, h, w] for h, w in grids])
    return PackedImages(torch.rand(int(grid_thw.prod(-1).sum()), 48, generator=generator), grid_thw)


def _text_ids(batch, seed=0):
    return torch.randint(0, 99, (batch, 64), generator=torch.Generator().manual_seed(seed))


class TestTorchExport:
    """``torch.export.export`` of every tower with dynamic sizes: one program, eager's values at other sizes."""

    def test_naflex_vision(self, siglip2_checkpoint):
        tower = SigLip2.from_pretrained(siglip2_checkpoint).vision_model
        program = export_program(NaFlexVisionExport(tower, max_patches=64))
        for grids in COMPOSITIONS:
            packed = _packed(grids)
            tokens, pooled = program.module()(packed.patches, packed.grid_thw)
            expected = tower(packed)
            torch.testing.assert_close(pooled, expected.pooler_output, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(tokens, expected.last_hidden_state, atol=1e-5, rtol=1e-4)

    @pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
    def test_no_grad_export_holds_standard_operators_only(self, siglip2_checkpoint, precision):
        """Exported without gradients (where the CPU inference path takes oneDNN and the varlen operator
        eagerly and under torch.compile), the program still holds no operator of this package: it runs without it."""
        tower = SigLip2.from_pretrained(siglip2_checkpoint, dtype=precision).vision_model
        with torch.no_grad():
            program = export_program(NaFlexVisionExport(tower, max_patches=64))
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert not [target for target in targets if "kornia_siglip2" in target or "mkldnn" in target]
        packed = _packed(COMPOSITIONS[0]).to(precision)
        with torch.no_grad():
            pooled = program.module()(packed.patches, packed.grid_thw)[1]
            expected = tower(packed).pooler_output
        tolerance = dict(atol=1e-5, rtol=1e-4) if precision == torch.float32 else dict(atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(pooled, expected, **tolerance)

    def test_fixed_vision_and_text(self, siglip_checkpoint):
        model = SigLip2.from_pretrained(siglip_checkpoint)
        vision = export_program(FixedVisionExport(model.vision_model, SIGLIP_IMAGE_SIZE))
        text = export_program(TextExport(model.text_model, 64))
        for batch in (1, 3, 5):
            images = torch.rand(batch, 3, SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE)
            torch.testing.assert_close(
                vision.module()(images)[1], model.get_image_features(images).pooler_output, atol=1e-5, rtol=1e-4
            )
            ids = _text_ids(batch)
            torch.testing.assert_close(
                text.module()(ids), model.get_text_features(ids).pooler_output, atol=1e-5, rtol=1e-4
            )


@pytest.fixture(scope="module")
def naflex_export(siglip2_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxscript")
    out = tmp_path_factory.mktemp("naflex_onnx")
    status = main(["export", "--model", str(siglip2_checkpoint), "--out", str(out), "--max-patches", "64"])
    assert status == 0
    return out


@pytest.fixture(scope="module")
def fixed_export(siglip_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxscript")
    out = tmp_path_factory.mktemp("fixed_onnx")
    assert main(["export", "--model", str(siglip_checkpoint), "--out", str(out)]) == 0
    return out


class TestOnnxRuntime:
    """The CLI's files in onnxruntime (CPU), fed numpy arrays, against eager PyTorch."""

    def test_naflex_vision_one_file_any_composition(self, naflex_export, siglip2_checkpoint):
        ort = pytest.importorskip("onnxruntime")
        description = json.loads((naflex_export / "export.json").read_text())
        entry = description["files"]["vision.onnx"]
        assert set(entry["inputs"]) == {"patches", "grid_thw"} and entry["max_patches"] == 64
        session = ort.InferenceSession(str(naflex_export / "vision.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["patches", "grid_thw"]
        assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
        tower = SigLip2.from_pretrained(siglip2_checkpoint).vision_model
        for seed, grids in enumerate(COMPOSITIONS):
            packed = _packed(grids, seed)
            tokens, pooled = session.run(None, {"patches": packed.patches.numpy(), "grid_thw": packed.grid_thw.numpy()})
            with torch.no_grad():
                expected = tower(packed)
            np.testing.assert_allclose(pooled, expected.pooler_output.numpy(), **ORT_TOLERANCE)
            np.testing.assert_allclose(tokens, expected.last_hidden_state.numpy(), **ORT_TOLERANCE)

    def test_fixed_vision_and_text_dynamic_batch(self, fixed_export, siglip_checkpoint):
        ort = pytest.importorskip("onnxruntime")
        description = json.loads((fixed_export / "export.json").read_text())
        assert set(description["files"]) == {"vision.onnx", "text.onnx"}
        vision = ort.InferenceSession(str(fixed_export / "vision.onnx"), providers=["CPUExecutionProvider"])
        text = ort.InferenceSession(str(fixed_export / "text.onnx"), providers=["CPUExecutionProvider"])
        assert [o.name for o in text.get_outputs()] == ["pooler_output"]
        model = SigLip2.from_pretrained(siglip_checkpoint)
        for batch in (1, 4):
            images = torch.rand(batch, 3, SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE)
            ids = _text_ids(batch)
            with torch.no_grad():
                image_features = model.get_image_features(images)
                text_features = model.get_text_features(ids).pooler_output
            tokens, pooled = vision.run(None, {"pixel_values": images.numpy()})
            np.testing.assert_allclose(pooled, image_features.pooler_output.numpy(), **ORT_TOLERANCE)
            np.testing.assert_allclose(tokens, image_features.last_hidden_state.numpy(), **ORT_TOLERANCE)
            (text_pooled,) = text.run(None, {"input_ids": ids.numpy()})
            np.testing.assert_allclose(text_pooled, text_features.numpy(), **ORT_TOLERANCE)

    def test_attention_is_per_image(self, naflex_export):
        """No (N, N) attention anywhere: every attention-score tensor of the file is per padded block."""
        onnx = pytest.importorskip("onnx")
        model = onnx.shape_inference.infer_shapes(onnx.load(str(naflex_export / "vision.onnx")))
        softmax_inputs = {node.input[0] for node in model.graph.node if node.op_type == "Softmax"}
        shapes = {
            info.name: [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]
            for info in model.graph.value_info
        }
        assert softmax_inputs
        for name in softmax_inputs:
            if name in shapes:  # (n, H, L, L) with L the fixed max_patches, never num_patches
                assert "num_patches" not in [str(d) for d in shapes[name]], shapes[name]

    def test_cli_errors(self, tmp_path):
        assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 1
