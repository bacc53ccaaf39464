"""The ``PreTrainedModel`` surface of transformers 5, shared by the dual-tower and the vision-only model.

:class:`~kornia_siglip2.SigLip2` and :class:`~kornia_siglip2.SigLip2VisionModel` get ``dtype`` / ``device``,
``num_parameters``, activation (gradient) checkpointing as ``transformers.Trainer`` drives it, and
``save_pretrained`` with transformers' keywords.

It sits above the towers and :mod:`~kornia_siglip2.hub` (it imports no model module): a class gets the
surface by inheriting :class:`PreTrainedMixin` before ``nn.Module``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kornia_siglip2.errors import check
from kornia_siglip2.hub import save_pretrained
from kornia_siglip2.layers import Encoder

__all__ = ["PreTrainedMixin"]

# torch.utils.checkpoint keywords transformers' users pass; the encoders always checkpoint non-reentrantly
_CHECKPOINT_KWARGS = frozenset({"use_reentrant"})


class PreTrainedMixin:
    """transformers' ``PreTrainedModel`` attributes and methods for an ``nn.Module`` with a ``config``.

    Activation checkpointing recomputes each encoder block in the backward pass (non-reentrant
    ``torch.utils.checkpoint``); ``transformers.Trainer(args=TrainingArguments(gradient_checkpointing=True))``
    turns it on through :meth:`activation_checkpointing_enable`.
    """

    #: transformers' flag: ``Trainer`` and peft read it.
    supports_gradient_checkpointing = True

    # ------------------------------------------------------------------ attributes
    @property
    def device(self) -> torch.device:
        """Device of the parameters (transformers' ``PreTrainedModel.device``)."""
        return next(self.parameters()).device  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the parameters (transformers' ``PreTrainedModel.dtype``)."""
        return next(p for p in self.parameters() if p.is_floating_point()).dtype  # type: ignore[attr-defined]

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters, as transformers' ``PreTrainedModel.num_parameters``.

        Args:
            only_trainable: count only parameters with ``requires_grad``.
            exclude_embeddings: leave out the token and position embedding tables.
        """
        excluded = set()
        if exclude_embeddings:
            excluded = {id(module.weight) for module in self.modules() if isinstance(module, nn.Embedding)}  # type: ignore[attr-defined]
        return sum(
            parameter.numel()
            for parameter in self.parameters()  # type: ignore[attr-defined]
            if id(parameter) not in excluded and (parameter.requires_grad or not only_trainable)
        )

    # ------------------------------------------------------------------ activation checkpointing
    def _encoders(self) -> list[nn.Module]:
        return [module for module in self.modules() if isinstance(module, Encoder)]  # type: ignore[attr-defined]

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute every encoder block in the backward pass (transformers 5's ``activation_checkpointing_enable``).

        Args:
            activation_checkpointing_kwargs: transformers passes these to ``torch.utils.checkpoint``; only
                ``use_reentrant`` is accepted, and either value gives the same gradients here: the blocks are always
                checkpointed non-reentrantly (no input needs ``requires_grad``).
            every_n_layers: only ``1`` (every block).
            offload: only ``False``.

        Raises:
            ValueCheckError: another checkpoint keyword, ``every_n_layers != 1`` or ``offload=True`` (named).
        """
        extra = sorted(set(activation_checkpointing_kwargs or {}) - _CHECKPOINT_KWARGS)
        check(
            not extra,
            lambda: (
                f"activation_checkpointing_kwargs {extra} are not supported: the encoders checkpoint every block "
                "with torch.utils.checkpoint(use_reentrant=False); pass None or {'use_reentrant': False}."
            ),
        )
        check(every_n_layers == 1, lambda: f"every_n_layers must be 1 (every block), got {every_n_layers}.")
        check(not offload, "offload=True (activations in host memory) is not supported: pass offload=False.")
        for encoder in self._encoders():
            encoder.set_grad_checkpointing(True)

    def activation_checkpointing_disable(self) -> None:
        """Keep every block's activations again (transformers 5's ``activation_checkpointing_disable``)."""
        for encoder in self._encoders():
            encoder.set_grad_checkpointing(False)

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether any encoder recomputes its blocks in the backward pass."""
        return any(encoder.gradient_checkpointing for encoder in self._encoders())

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """The deprecated transformers name of :meth:`activation_checkpointing_enable` (warns as it)."""
        warnings.warn(
            "`gradient_checkpointing_enable` is deprecated in transformers 5 and removed in v6. Use "
            "`activation_checkpointing_enable` instead.",
            FutureWarning,
            stacklevel=2,
        )
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """The deprecated transformers name of :meth:`activation_checkpointing_disable` (warns as it)."""
        warnings.warn(
            "`gradient_checkpointing_disable` is deprecated in transformers 5 and removed in v6. Use "
            "`activation_checkpointing_disable` instead.",
            FutureWarning,
            stacklevel=2,
        )
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """The deprecated transformers name of :attr:`is_activation_checkpointing` (warns as it)."""
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated in transformers 5 and removed in v6. Use "
            "`is_activation_checkpointing` instead.",
            FutureWarning,
            stacklevel=2,
        )
        return self.is_activation_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every encoder block in the backward pass (timm's name; ``False`` turns it off)."""
        for encoder in self._encoders():
            encoder.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | Path,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str | None = None,
        variant: str | None = None,
        token: str | bool | None = None,
        safe_serialization: bool = True,
        save_peft_format: bool = True,
        save_original_format: bool = True,
        distributed_checkpoint: bool = False,
    ) -> None:
        """Write ``config.json`` (with the weights' ``dtype``) + safetensors in the layout transformers loads.

        transformers 5's keywords; the save is atomic and optionally sharded (see
        :func:`kornia_siglip2.hub.save_pretrained`).

        Args:
            save_directory: target folder (created if needed).
            is_main_process: ``False`` writes nothing (the other ranks of a distributed run).
            state_dict: the tensors to write instead of ``self.state_dict()`` (keys as ``state_dict()``, e.g. what
                ``transformers.Trainer`` passes).
            push_to_hub: only ``False``: upload the folder with ``huggingface_hub.upload_folder`` afterwards.
            max_shard_size: shard size (bytes or ``"5GB"``); ``None`` (default) writes one file. transformers'
                default (``"50GB"``) also gives one file for every SigLIP checkpoint.
            variant: only ``None`` (``model.<variant>.safetensors`` files are not written).
            token: hub token; only used by ``push_to_hub``, which is refused.
            safe_serialization: only ``True`` (safetensors; pickles are never written).
            save_peft_format: accepted (no adapters are attached to this model).
            save_original_format: accepted (the saved keys are transformers' own).
            distributed_checkpoint: only ``False``.

        Raises:
            ValueCheckError: ``push_to_hub=True``, a ``variant``, ``safe_serialization=False`` or
                ``distributed_checkpoint=True`` (each says what to do instead); see also
                :func:`kornia_siglip2.hub.save_pretrained`.
        """
        del token, save_peft_format, save_original_format
        check(
            not push_to_hub,
            "push_to_hub=True is not supported: save_pretrained(folder) then upload it with "
            "huggingface_hub.HfApi().upload_folder(folder_path=folder, repo_id=...).",
        )
        check(variant is None, lambda: f"variant={variant!r} is not supported: save without a variant.")
        check(
            safe_serialization,
            "safe_serialization=False is not supported: checkpoints are safetensors only (as transformers 5 writes).",
        )
        check(not distributed_checkpoint, "distributed_checkpoint=True is not supported: gather the weights first.")
        if not is_main_process:
            return
        save_pretrained(self, save_directory, max_shard_size=max_shard_size, state_dict=state_dict)  # type: ignore[arg-type]
