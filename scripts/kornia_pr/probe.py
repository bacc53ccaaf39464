"""Probes run in a subprocess on one Kornia tree (``PYTHONPATH`` = the tree), by ``scripts/kornia_patch.py``.

``python probe.py api``: JSON of the public surface of ``kornia.models.siglip2``: for every module of the package,
its public names (``__all__`` and the classes and functions it defines without a leading underscore), and for each
class and function its signature (parameter name, kind, default), the public methods of classes with theirs, and
the fields of dataclasses.

``python probe.py runtime``: imports every ``kornia.models.*`` module, runs a tiny SigLip2 forward with the loss,
and checks that ``import kornia`` imported none of safetensors, huggingface_hub, transformers, PIL.

``python probe.py fullgraph``: ``torch.compile(fullgraph=True)`` of the vision model without and with a patch mask.

``python probe.py issue3481``: kornia#3481's reproduction (log-scale 100): finite logits and loss.

``python probe.py siglip CHECKPOINT INPUTS OUT``: Kornia's outputs for kornia_siglip2's equivalence test.

Each prints a JSON report and exits 1 if a check fails.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import sys
from typing import Any

__all__ = ["FORBIDDEN_AT_IMPORT", "api", "fullgraph", "issue3481", "runtime", "siglip"]

FORBIDDEN_AT_IMPORT = ("safetensors", "huggingface_hub", "transformers", "PIL")


def _signature(obj: Any) -> list[list[str]] | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [
        [name, str(p.kind), "<none>" if p.default is inspect.Parameter.empty else repr(p.default)]
        for name, p in signature.parameters.items()
    ]


def _describe(obj: Any) -> dict[str, Any]:
    if inspect.isclass(obj):
        methods = {}
        for name, member in vars(obj).items():
            if name.startswith("_") and name not in ("__init__", "__call__"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                methods[name] = _signature(member.__func__)
            elif inspect.isfunction(member):
                methods[name] = _signature(member)
        fields = {}
        if dataclasses.is_dataclass(obj):
            for field in dataclasses.fields(obj):
                default = field.default if field.default is not dataclasses.MISSING else "<factory or none>"
                fields[field.name] = repr(default)
        return {"kind": "class", "signature": _signature(obj), "methods": methods, "fields": fields}
    if callable(obj):
        return {"kind": "function", "signature": _signature(obj)}
    return {"kind": type(obj).__name__}


def api() -> dict[str, Any]:
    """The public surface of ``kornia.models.siglip2``, module by module."""
    package = importlib.import_module("kornia.models.siglip2")
    names = ["kornia.models.siglip2"] + [
        f"kornia.models.siglip2.{info.name}" for info in pkgutil.iter_modules(package.__path__)
    ]
    surface: dict[str, Any] = {}
    for module_name in names:
        module = importlib.import_module(module_name)
        # __all__ and every public class or function the module defines (SigLip2VisionMLP is not in __all__)
        defined = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module_name
        ]
        public = sorted(set(getattr(module, "__all__", [])) | set(defined))
        surface[module_name] = {name: _describe(getattr(module, name)) for name in public}
    return surface


def _tiny_model(seed: int = 0):
    import torch

    from kornia.models.siglip2 import SigLip2Config, SigLip2Model
    from kornia.models.siglip2.config import SigLip2TextConfig, SigLip2VisionConfig

    torch.manual_seed(seed)
    sizes = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
    vision = SigLip2VisionConfig(image_size=16, patch_size=4, **sizes)
    text = SigLip2TextConfig(vocab_size=64, max_position_embeddings=8, **sizes)
    return SigLip2Model(SigLip2Config(vision_config=vision, text_config=text, projection_dim=16)).eval()


def runtime() -> dict[str, Any]:
    """Import checks and a tiny forward with the loss; ``failures`` lists what did not hold."""
    report: dict[str, Any] = {"failures": []}
    import kornia

    report["kornia_file"] = kornia.__file__
    report["kornia_version"] = kornia.__version__
    leaked = sorted(name for name in FORBIDDEN_AT_IMPORT if name in sys.modules)
    report["imported_by_import_kornia"] = leaked
    if leaked:
        report["failures"].append(f"import kornia imported {leaked}")

    import kornia.models

    modules = []
    for info in pkgutil.walk_packages(kornia.models.__path__, "kornia.models."):
        try:
            importlib.import_module(info.name)
            modules.append(info.name)
        except Exception as error:  # any import failure is a finding
            report["failures"].append(f"import {info.name}: {type(error).__name__}: {error}")
    report["kornia_models_modules_imported"] = len(modules)

    import torch

    model = _tiny_model()
    with torch.no_grad():
        out = model(pixel_values=torch.rand(2, 3, 16, 16), input_ids=torch.randint(0, 64, (2, 5)), return_loss=True)
    report["siglip2_loss"] = float(out.loss)
    if not bool(torch.isfinite(out.loss)):
        report["failures"].append("SigLip2Model forward: non-finite loss")
    return report


def fullgraph() -> dict[str, Any]:
    """``torch.compile(fullgraph=True)`` of the vision model, without and with a ``(B, N)`` patch mask.

    The backend is ``aot_eager`` (graph capture and autograd tracing without code generation: a graph break or a
    host synchronisation such as ``.tolist()`` fails the capture, which is what this checks, in seconds). Each
    compiled output must equal the eager one, and the mask must change the pooled output.
    """
    import torch

    report: dict[str, Any] = {"failures": []}
    vision = _tiny_model().vision_model
    pixel_values = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    pooled = {}
    for name, kwargs in (("no mask", {}), ("mask (B, N)", {"attention_mask": mask})):
        torch._dynamo.reset()
        compiled = torch.compile(vision, fullgraph=True, backend="aot_eager")
        try:
            with torch.no_grad():
                actual = compiled(pixel_values, **kwargs)[0]
                expected = vision(pixel_values, **kwargs)[0]
        except Exception as error:  # a graph break under fullgraph=True raises
            report["failures"].append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            continue
        difference = float((actual - expected).abs().max())
        report[f"{name}: max |compiled - eager|"] = difference
        pooled[name] = expected
        if difference > 1e-5:
            report["failures"].append(f"{name}: compiled output differs from eager by {difference}")
    if len(pooled) == 2 and torch.equal(pooled["no mask"][1], pooled["mask (B, N)"][1]):
        report["failures"].append("the mask does not change the pooled output of the padded image")
    return report


def issue3481() -> dict[str, Any]:
    """kornia#3481: a log-scale of 100 gave ``inf`` logits and loss; they must be finite."""
    import torch

    report: dict[str, Any] = {"failures": []}
    model = _tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(100.0)
        out = model(pixel_values=torch.rand(2, 3, 16, 16), input_ids=torch.randint(0, 64, (2, 5)), return_loss=True)
    report["logit_scale"] = float(out.logit_scale)
    report["max |logit|"] = float(out.logits_per_image.abs().max())
    report["loss"] = float(out.loss)
    if not (bool(torch.isfinite(out.logits_per_image).all()) and bool(torch.isfinite(out.loss))):
        report["failures"].append(f"non-finite logits or loss at logit_scale = 100: {report}")
    return report


def siglip(checkpoint: str, inputs: str, out: str) -> dict[str, Any]:
    """Kornia's side of kornia_siglip2's equivalence test (``tests/test_kornia_patch.py``).

    Loads the transformers ``SiglipModel`` checkpoint folder ``checkpoint`` (``config.json`` + ``model.safetensors``,
    text and vision of one width) into ``kornia.models.siglip2.SigLip2Model`` as ``SigLip2Builder.from_pretrained_hf``
    does after its download, runs the ``torch.save``-d ``inputs`` (``pixel_values``, ``input_ids``, ``images`` in
    ``[0, 255]``) through the model with the loss and through ``SigLip2ImagePreprocessor``, and saves the outputs to
    ``out``.
    """
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from kornia.models.siglip2 import SigLip2Config, SigLip2ImagePreprocessor, SigLip2Model
    from kornia.models.siglip2.config import SigLip2TextConfig, SigLip2VisionConfig

    folder = Path(checkpoint)
    config = json.loads((folder / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act")
    vision = {key: config["vision_config"][key] for key in keys}
    text = {key: config["text_config"][key] for key in keys}
    vision_config = SigLip2VisionConfig(
        image_size=config["vision_config"]["image_size"],
        patch_size=config["vision_config"]["patch_size"],
        layer_norm_eps=config["vision_config"]["layer_norm_eps"],
        **vision,
    )
    text_config = SigLip2TextConfig(
        vocab_size=config["text_config"]["vocab_size"],
        max_position_embeddings=config["text_config"]["max_position_embeddings"],
        layer_norm_eps=config["text_config"]["layer_norm_eps"],
        **text,
    )
    model = SigLip2Model(
        SigLip2Config(vision_config=vision_config, text_config=text_config, projection_dim=vision["hidden_size"])
    )
    state = load_file(str(folder / "model.safetensors"))
    state["vision_model.embeddings.position_embedding"] = state.pop("vision_model.embeddings.position_embedding.weight")
    state = {key: value for key, value in state.items() if not key.endswith("position_ids")}
    model.load_state_dict(state, strict=True)
    model = model.eval().double()
    data = torch.load(inputs)
    with torch.no_grad():
        result = model(pixel_values=data["pixel_values"], input_ids=data["input_ids"], return_loss=True)
        size = tuple(data["pixel_values"].shape[-2:])
        preprocessed = {
            mode: SigLip2ImagePreprocessor(image_size=size, interpolation=mode).double()(data["images"])
            for mode in ("bilinear", "bicubic")
        }
    outputs = {
        "logits_per_image": result.logits_per_image,
        "image_embeds": result.image_embeds,
        "text_embeds": result.text_embeds,
        "logit_scale": result.logit_scale,
        "loss": result.loss,
        **{f"preprocessed_{mode}": value for mode, value in preprocessed.items()},
    }
    torch.save(outputs, out)
    return {"failures": [], "saved": sorted(outputs)}


COMMANDS = {"runtime": runtime, "fullgraph": fullgraph, "issue3481": issue3481}

if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "api":
        print(json.dumps(api(), indent=1, sort_keys=True))
    elif command == "siglip":
        print(json.dumps(siglip(*sys.argv[2:5])))
    elif command in COMMANDS:
        result = COMMANDS[command]()
        print(json.dumps(result, indent=1, sort_keys=True))
        sys.exit(1 if result["failures"] else 0)
    else:
        sys.exit("usage: probe.py api|" + "|".join(COMMANDS))
