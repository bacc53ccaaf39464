"""Probes run in a subprocess on one Kornia package (the installed 0.9.0, or a rendered copy on ``PYTHONPATH``).

``python probe.py api``: JSON of the public surface of ``kornia.models.siglip2``: for every module of the package,
its public names (``__all__`` and the classes and functions it defines without a leading underscore), and for each
class and function its signature (parameter name, kind, default), the public methods of classes with theirs, and
the fields of dataclasses.

``python probe.py runtime``: imports every ``kornia.models.*`` module, runs a tiny PaliGemma forward and a tiny
SigLip2 forward, and checks that ``import kornia`` imported none of safetensors, huggingface_hub, transformers, PIL.
Prints a JSON report; exits 1 if a check fails.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
import sys
from typing import Any

__all__ = ["FORBIDDEN_AT_IMPORT", "api", "runtime"]

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


def runtime() -> dict[str, Any]:
    """Import checks and tiny forwards; ``failures`` lists what did not hold."""
    report: dict[str, Any] = {"failures": []}
    import kornia

    report["kornia_file"] = kornia.__file__
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

    from kornia.models.paligemma import PaliGemma, PaliGemmaConfig
    from kornia.models.siglip2 import SigLip2Config, SigLip2Model
    from kornia.models.siglip2.config import SigLip2TextConfig, SigLip2VisionConfig

    torch.manual_seed(0)
    vision = SigLip2VisionConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        image_token_index=60,
    )
    with torch.no_grad():
        logits = PaliGemma(config).eval()(torch.randint(0, 60, (2, 5)), torch.rand(2, 3, 16, 16))
    report["paligemma_logits_shape"] = list(logits.shape)
    if tuple(logits.shape) != (2, 4 + 5, 64) or not bool(torch.isfinite(logits).all()):
        report["failures"].append(f"PaliGemma forward: shape {tuple(logits.shape)} or non-finite logits")

    text = SigLip2TextConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    text.intermediate_size = 32
    model = SigLip2Model(SigLip2Config(vision_config=vision, text_config=text, projection_dim=16)).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.rand(2, 3, 16, 16), input_ids=torch.randint(0, 64, (2, 5)), return_loss=True)
    report["siglip2_loss_finite"] = bool(torch.isfinite(out.loss))
    if not report["siglip2_loss_finite"]:
        report["failures"].append("SigLip2Model forward: non-finite loss")
    return report


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "api":
        print(json.dumps(api(), indent=1, sort_keys=True))
    elif command == "runtime":
        result = runtime()
        print(json.dumps(result, indent=1, sort_keys=True))
        sys.exit(1 if result["failures"] else 0)
    else:
        sys.exit("usage: probe.py api|runtime")
