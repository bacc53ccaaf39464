"""Variable-length (block-diagonal) attention over packed sequences, and the one attention module.

:func:`varlen_attention` is the attention of every module of the package (both towers, the MAP head, the
LocCa decoder). Queries of sequence ``i`` attend to keys of sequence ``i`` only, bidirectionally or causally
per sequence (:class:`~kornia_siglip2.packing.VarlenLayout`). The result does not depend on the backend:

- ``"grouped"`` (default on CPU): sequences with the same (query, key) lengths and mask are gathered into one
  batched ``scaled_dot_product_attention`` call with no mask, so memory grows with :math:`\\sum_i L_i^2` and
  a batch of equal lengths is a single plain SDPA call.
- ``"dense"``: one SDPA call with a block-diagonal boolean mask built from ``cu_seqlens`` (memory grows
  with :math:`N^2`).
- ``"blocks"``: the tokens of each sequence scattered into a padded :math:`(n, L_{max})` batch, one SDPA call
  with a key mask, gathered back (memory :math:`n L_{max}^2`); reads only the tensors of the layout's
  :class:`~kornia_siglip2.packing.BlockLayout`, so ``"auto"`` picks it inside ``torch.compile`` /
  ``torch.export`` when the layout has one: one graph for every batch composition. For CPU inference under
  ``torch.compile`` (not export) ``"auto"`` calls ``"grouped"`` instead, as one opaque operator
  (``torch.ops.kornia_siglip2.cpu_varlen_attention``) that reads the boundaries from host memory when it
  runs: one graph for every composition too, without padding each sequence to the longest.
- ``"loop"``: one SDPA call per sequence.
- ``"flash"``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16), picked by ``"auto"`` there.
- ``"eager"``: an explicit softmax per sequence that also returns the attention weights (transformers'
  ``attn_implementation="eager"``; used for ``output_attentions=True``).

:class:`Attention` is the module: ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` Linear layers with
transformers' names (so Hugging Face state dicts and peft's usual ``target_modules`` apply as they are), or,
for the MAP head, ``torch.nn.MultiheadAttention``'s fused ``in_proj_weight`` / ``in_proj_bias`` (the names of
its Hugging Face weights, which peft's ``q_proj`` / ``v_proj`` targets do not touch, as in transformers);
self- or cross-attention; its backend fixed at construction or by
:meth:`~kornia_siglip2.SigLip2.set_attention_backend`.

Inference fast path on CPU: when no gradient is needed, :func:`fused_linear` runs the projections through
oneDNN's ``mkldnn._linear_pointwise`` (the kernel inductor uses for frozen CPU linears), with the activation or
the residual add fused into the matmul; :class:`Attention` projects q, k and v with one such matmul each, on
the parameters themselves (no concatenated copy of the kernels is kept), or with one matmul of the MAP head's
fused ``in_proj_weight``. Under ``torch.compile`` the call is one opaque operator
(``torch.ops.kornia_siglip2.onednn_linear``: inductor lowers oneDNN linears only for weights frozen into the
graph; otherwise a float32 linear becomes aten's ``addmm``, at half oneDNN's rate on the AMD EPYC measured
in docs/benchmarks.md), so compiled inference keeps these kernels. Training, ``torch.export``, other
devices, non-x86 CPUs, wrapped projections (peft's LoRA layers, forward hooks) and dtypes oneDNN cannot run on
the CPU at hand (bfloat16 without AVX-512, float16 without AVX-512 FP16) take the plain
``torch.nn.functional`` path; :data:`FUSED_CPU_KERNELS` switches the fast path off.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

from kornia_siglip2.errors import check
from kornia_siglip2.packing import BlockLayout, VarlenLayout, check_cu_seqlens

__all__ = [
    "ATTENTION_BACKENDS",
    "FUSED_CPU_KERNELS",
    "Attention",
    "fused_linear",
    "fused_linear_available",
    "set_attention_backend",
    "VarlenLayout",
    "varlen_attention",
    "varlen_attention_weights",
]

#: Names accepted by :func:`varlen_attention` and :class:`Attention`.
ATTENTION_BACKENDS = ("auto", "grouped", "dense", "loop", "flash", "eager", "blocks")

#: Use oneDNN's fused linear kernels for inference on CPU (see :func:`fused_linear`); set to ``False`` to
#: run every projection through ``torch.nn.functional.linear`` (e.g. to measure the difference).
FUSED_CPU_KERNELS = True

#: oneDNN post-ops of :func:`fused_linear`: ``activation`` -> ``(attr, algorithm)``
_POST_OPS = {"none": ("none", ""), "gelu_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none")}


def _matmul_attention_cpu() -> bool:
    """Whether :func:`_batched_attention` uses matmuls for bfloat16 here: AVX-512 BF16 without AMX (measured)."""
    try:
        return torch.cpu._is_avx512_bf16_supported() and not torch.cpu._is_amx_tile_supported()
    except (AttributeError, RuntimeError):
        return False


#: bfloat16 CPU inference attention as two matmuls (see ``_batched_attention``); read once at import
_MATMUL_ATTENTION_CPU = _matmul_attention_cpu()
#: largest scores of one sequence (traced: of the whole batch) for the matmul attention; SDPA's fused kernel
#: above (it overtakes the matmuls near 4096 tokens, where one image's scores take 400 MB)
_MATMUL_ATTENTION_MAX_BYTES = 64 << 20
#: scores computed at a time by the eager matmul attention (whole sequences; at least one)
_MATMUL_ATTENTION_CHUNK_BYTES = 8 << 20


def _probe_onednn(dtype: torch.dtype) -> bool:
    """Whether ``mkldnn._linear_pointwise`` exists in this build and runs ``dtype`` on this CPU."""
    # measured on x86-64 only (oneDNN's JIT kernels: AVX2, AVX-512, AMX); elsewhere the plain path
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    try:
        if not (x86 and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        if dtype == torch.bfloat16:  # AVX-512 BF16 / AMX, or oneDNN's emulation where it has one
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        return dtype == torch.float32
    except (AttributeError, RuntimeError):
        return False


#: dtype -> whether oneDNN's fused linear runs it here; probed once at import (traced code reads the table only)
_ONEDNN = {dtype: _probe_onednn(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}


def _onednn_supports(dtype: torch.dtype) -> bool:
    """Whether ``mkldnn._linear_pointwise`` runs ``dtype`` on this CPU (probed at import)."""
    return _ONEDNN.get(dtype, False)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an operation on ``tensors`` (the inference fast paths need it not to)."""
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def fused_linear_available(*tensors: torch.Tensor) -> bool:
    """Whether :func:`fused_linear` takes its oneDNN path for these tensors (input first, then the weights).

    True on CPU, outside ``torch.export`` (whose graphs must run without this package), when no gradient is
    needed, when all floating tensors share a dtype that oneDNN supports on this CPU, and
    :data:`FUSED_CPU_KERNELS` is set.

    Example:
        >>> x, w = torch.rand(4, 8), torch.rand(16, 8, requires_grad=True)
        >>> fused_linear_available(x, w)  # w needs a gradient
        False
    """
    if not FUSED_CPU_KERNELS or torch.compiler.is_exporting():
        return False
    first = tensors[0]
    if first.device.type != "cpu" or first.ndim != 2:
        return False
    if _needs_grad(*tensors):
        return False
    if any(t.device.type != "cpu" or t.dtype != first.dtype for t in tensors):
        return False
    return _onednn_supports(first.dtype)


def fused_linear(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + act(hidden_states @ weight.T + bias)`` with the activation or the add inside the matmul.

    On CPU without gradients (:func:`fused_linear_available`) this is one oneDNN call
    (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor uses for frozen CPU linears); elsewhere
    the same value from ``torch.nn.functional``. The fused result differs from the unfused one by rounding
    only: the activation / add reads the float32 accumulator instead of the rounded product.

    Args:
        hidden_states: :math:`(N, D_{in})` input.
        weight: :math:`(D_{out}, D_{in})` kernel.
        bias: :math:`(D_{out},)` or ``None``.
        activation: ``"none"``, ``"gelu_tanh"`` (``F.gelu(approximate="tanh")``) or ``"gelu"``.
        residual: :math:`(N, D_{out})` added to the result (with ``activation="none"`` only).

    Returns:
        :math:`(N, D_{out})`.

    Example:
        >>> x, w, b, r = torch.rand(4, 8), torch.rand(16, 8), torch.rand(16), torch.rand(4, 16)
        >>> reference = r + F.linear(x, w, b)
        >>> torch.allclose(fused_linear(x, w, b, residual=r), reference, atol=1e-5)
        True
        >>> torch.allclose(fused_linear(x, w, b, "gelu_tanh"), F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-5)
        True
    """
    check(activation in _POST_OPS, lambda: f"Unknown activation {activation!r}; expected one of {tuple(_POST_OPS)}.")
    check(residual is None or activation == "none", "fused_linear adds a residual only without an activation.")
    tensors = [hidden_states, weight] + [t for t in (bias, residual) if t is not None]
    fits = residual is None or residual.shape == (hidden_states.shape[0], weight.shape[0])
    if fits and fused_linear_available(*tensors) and all(t.is_contiguous() for t in tensors):
        attr, algorithm = _POST_OPS[activation]
        if torch.compiler.is_compiling():  # one opaque op: inductor lowers oneDNN calls on frozen weights only
            return _onednn_linear(hidden_states, weight, bias, attr, algorithm, residual)
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(hidden_states, residual, weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(hidden_states, weight, bias, attr, [], algorithm)
    output = F.linear(hidden_states, weight, bias)
    if activation == "gelu_tanh":
        output = F.gelu(output, approximate="tanh")
    elif activation == "gelu":
        output = F.gelu(output)
    return output if residual is None else residual + output


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    layout: VarlenLayout | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention restricted to blocks of a packed sequence.

    Args:
        query: :math:`(N_q, H, D_h)` packed queries.
        key: :math:`(N_k, H, D_h)` packed keys.
        value: :math:`(N_k, H, D_v)` packed values.
        cu_seqlens: int :math:`(n + 1,)` query boundaries (keys too unless ``cu_seqlens_k`` is given).
            Not needed when ``layout`` is given.
        max_seqlen: longest sequence; accepted for flash-attention compatibility (derived when absent).
        cu_seqlens_k: int :math:`(n + 1,)` key boundaries for cross-attention.
        layout: a prebuilt :class:`~kornia_siglip2.packing.VarlenLayout` (per-sequence causal masks and key
            selection included); saves the host read of ``cu_seqlens`` when it serves many calls.
        scale: softmax scale; defaults to :math:`D_h^{-1/2}`.
        backend: one of :data:`ATTENTION_BACKENDS`. ``"auto"`` picks ``"flash"`` for fp16/bf16 CUDA tensors
            when torch provides varlen kernels; inside ``torch.compile`` / ``torch.export``, ``"blocks"`` when the
            layout carries a :class:`~kornia_siglip2.packing.BlockLayout`; ``"grouped"`` otherwise.

    Returns:
        :math:`(N_q, H, D_v)` attention output, row ``r`` mixing only the values of its own sequence.

    Raises:
        ValueCheckError: shapes disagree with each other or with the boundaries, the boundaries are
            malformed, or the backend is unknown or unavailable (a ``ValueError``).
        TypeCheckError: the boundaries are not an integer tensor (a ``TypeError``).

    Example:
        >>> q, k, v = torch.randn(3, 10, 2, 8).unbind(0)
        >>> cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32)
        >>> out = varlen_attention(q, k, v, cu_seqlens)
        >>> out.shape
        torch.Size([10, 2, 8])
        >>> alone = varlen_attention(q[:4], k[:4], v[:4], torch.tensor([0, 4]))
        >>> torch.allclose(out[:4], alone, atol=1e-6)
        True
    """
    return _attend(query, key, value, cu_seqlens, cu_seqlens_k, layout, scale, backend, weights=False)[0]


def varlen_attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: VarlenLayout,
    scale: float | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The ``"eager"`` backend: attention output and the softmax weights of every sequence.

    Args:
        query: :math:`(N_q, H, D_h)` packed queries.
        key: :math:`(N_k, H, D_h)` packed keys.
        value: :math:`(N_k, H, D_v)` packed values.
        layout: the sequences.
        scale: softmax scale; defaults to :math:`D_h^{-1/2}`.

    Returns:
        the :math:`(N_q, H, D_v)` output and one :math:`(H, L_{q,i}, L_{k,i})` weight tensor per sequence.
    """
    return _attend(query, key, value, None, None, layout, scale, "eager", weights=True)  # type: ignore[return-value]


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    layout: VarlenLayout | None,
    scale: float | None,
    backend: str,
    weights: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    check(
        backend in ATTENTION_BACKENDS,
        lambda: f"Unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}.",
    )
    check(
        query.ndim == 3 and key.ndim == 3 and value.ndim == 3,
        lambda: (
            f"query, key and value must be (tokens, heads, head_dim), got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}."
        ),
    )
    check(
        key.shape[:2] == value.shape[:2] and query.shape[1] == key.shape[1] and query.shape[2] == key.shape[2],
        lambda: (
            f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} do not share "
            "heads / head_dim / token counts."
        ),
    )
    auto_with_blocks = layout is not None and not weights and backend == "auto" and layout.blocks is not None
    if auto_with_blocks and _opaque_cpu_attention(layout, query, key, value):
        return _cpu_varlen_attention(query, key, value, layout.cu_seqlens_q, layout.cu_seqlens_k, scale), None
    if layout is not None and not weights and (backend == "blocks" or (backend == "auto" and _tracing(layout, query))):
        check(
            layout.blocks is not None,
            "backend='blocks' needs a layout with a BlockLayout (ImageLayout.from_grid_thw builds one).",
        )
        return _block_attention(query, key, value, layout.blocks, scale), None
    check(backend != "blocks", "backend='blocks' needs a layout with a BlockLayout, not cu_seqlens.")
    if layout is None:
        check(cu_seqlens is not None, "varlen_attention needs cu_seqlens or a layout.")
        if not torch.compiler.is_compiling():
            check_cu_seqlens(cu_seqlens, "cu_seqlens", query.shape[0])
            if cu_seqlens_k is not None:
                check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", key.shape[0])
                check(
                    cu_seqlens_k.shape == cu_seqlens.shape,
                    lambda: (
                        f"cu_seqlens_k has {cu_seqlens_k.shape[0] - 1} sequences but cu_seqlens has "
                        f"{cu_seqlens.shape[0] - 1}; each query sequence needs its key sequence."
                    ),
                )
        if backend == "dense":  # the compile path: no host read of the boundaries
            if not torch.compiler.is_compiling():
                _check_dense_memory(query, key)
            return _dense_isolated(query, key, value, cu_seqlens, cu_seqlens_k, None, scale), None
        layout = VarlenLayout.from_cu_seqlens(cu_seqlens, cu_seqlens_k)
    if not torch.compiler.is_compiling():
        num_keys = key.shape[0] if layout.key_index is None else layout.key_index.shape[0]
        check(
            layout.num_tokens_q == query.shape[0] and layout.num_tokens_k == num_keys,
            lambda: (
                f"the layout describes {layout.num_tokens_q} query / {layout.num_tokens_k} key tokens but "
                f"query has {query.shape[0]} and key {num_keys} rows."
            ),
        )
    if layout.key_index is not None:
        key = key.index_select(0, layout.key_index)
        value = value.index_select(0, layout.key_index)
    if layout.causal_flags is not None:  # per-sequence masks held on the device: only the dense mask reads them
        backend = "dense"
    if backend == "auto":
        # a layout traced with a symbolic batch (no per-sequence lengths) runs as one batched SDPA call
        flash = _flash_available(query) and bool(layout.seqlens_q) and len(set(layout.causal)) <= 1
        backend = "flash" if flash else "grouped"
    check(
        backend not in ("eager", "loop", "flash") or len(layout.seqlens_q) > 0,
        lambda: (
            f"backend={backend!r} (or output_attentions=True) needs per-sequence lengths, which a layout traced "
            "with a symbolic batch size does not have: compile with dynamic=False, or use backend='grouped'."
        ),
    )
    if backend == "eager":
        if not torch.compiler.is_compiling():
            _check_eager_memory(query, layout, weights)
        return _eager_attention(query, key, value, layout, scale, weights)
    if backend == "dense":
        if not torch.compiler.is_compiling():
            _check_dense_memory(query, key)
        return _dense_isolated(query, key, value, layout.cu_seqlens_q, layout.cu_seqlens_k, layout, scale), None
    if backend == "loop":
        return _loop_attention(query, key, value, layout, scale), None
    if backend == "flash":
        return _flash_attention(query, key, value, layout, scale), None
    return _grouped_attention(query, key, value, layout, scale), None


@torch.library.custom_op("kornia_siglip2::onednn_linear", mutates_args=())
def _onednn_linear(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    attr: str,
    algorithm: str,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`fused_linear`'s oneDNN call as one operator that a compiled graph calls as it is.

    Inductor lowers ``mkldnn._linear_pointwise`` only for weights frozen into the graph (and has no fake
    kernel for its ``.binary`` form); as a custom operator the call runs unchanged between the fused
    LayerNorm / reshape kernels that inductor generates around it.
    """
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(hidden_states, residual, weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(hidden_states, weight, bias, attr, [], algorithm)


@_onednn_linear.register_fake
def _onednn_linear_shape(hidden_states, weight, bias, attr, algorithm, residual):
    return hidden_states.new_empty(hidden_states.shape[0], weight.shape[0])


@torch.library.custom_op("kornia_siglip2::cpu_varlen_attention", mutates_args=())
def _cpu_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    """The ``"grouped"`` backend as one operator of a compiled graph (CPU inference).

    The boundaries are read inside the operator, from host memory (no device sync on the CPU), so the
    graph itself names no per-batch number: one graph serves every batch composition, and each batch gets
    one attention call per group of equal lengths (no padding to the longest sequence, unlike ``"blocks"``).
    """
    layout = VarlenLayout.from_seqlens(torch.diff(cu_seqlens_q).tolist(), torch.diff(cu_seqlens_k).tolist())
    return _grouped_attention(query, key, value, layout, scale)


@_cpu_varlen_attention.register_fake
def _cpu_varlen_attention_shape(query, key, value, cu_seqlens_q, cu_seqlens_k, scale):
    return query.new_empty(query.shape[0], query.shape[1], value.shape[2])


def _opaque_cpu_attention(layout: VarlenLayout, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Inside ``torch.compile`` (not export) on CPU without gradients: :func:`_cpu_varlen_attention` runs."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    # a layout with blocks (images) is never causal; its per-sequence tuples are not read (a guard on their
    # length would recompile per image count)
    if layout.key_index is not None or layout.causal_flags is not None:
        return False
    if any(tensor.device.type != "cpu" for tensor in (query, key, value, layout.cu_seqlens_q)):
        return False
    return not _needs_grad(query, key, value)


def _tracing(layout: VarlenLayout, query: torch.Tensor) -> bool:
    """Inside ``torch.compile`` / ``torch.export`` with a tensor-only layout at hand: the ``"blocks"`` backend.

    Not where the flash varlen kernels run (CUDA half precision with per-sequence lengths known).
    """
    if layout.blocks is None or not torch.compiler.is_compiling():
        return False
    return not (_flash_available(query) and bool(layout.seqlens_q))


def _block_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: BlockLayout, scale: float | None
) -> torch.Tensor:
    """Scatter each sequence into a padded block, one masked SDPA call, gather back (no host read)."""
    num_blocks, key_length = blocks.key_mask.shape
    query_length = key_length if blocks.query_length is None else blocks.query_length

    def to_blocks(tokens: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
        padded = tokens.new_zeros(num_blocks * length, *tokens.shape[1:]).index_put((index,), tokens)
        return padded.view(num_blocks, length, *tokens.shape[1:]).transpose(1, 2)  # [n, H, L, Dh]

    out = F.scaled_dot_product_attention(
        to_blocks(query, blocks.query_index, query_length),
        to_blocks(key, blocks.key_index, key_length),
        to_blocks(value, blocks.key_index, key_length),
        attn_mask=blocks.key_mask[:, None, None, :],
        scale=scale,
    )
    out = out.transpose(1, 2).reshape(num_blocks * query_length, *out.shape[1:2], out.shape[-1])
    return out.index_select(0, blocks.query_index)


def _grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: VarlenLayout, scale: float | None
) -> torch.Tensor:
    if len(layout.groups) == 1 and layout.gather_q is None:  # equal lengths: one call, no split (any batch size)
        count, len_q, len_k, causal = layout.groups[0]
        heads = query.shape[1]
        # [count * L, H, Dh] -> [count, H, L, Dh]
        q = query.view(count, len_q, heads, -1).transpose(1, 2)
        k = key.view(count, len_k, heads, -1).transpose(1, 2)
        v = value.view(count, len_k, heads, -1).transpose(1, 2)
        out = _batched_attention(q, k, v, scale, causal)
        return out.transpose(1, 2).reshape(count * len_q, heads, -1)
    if layout.gather_q is not None:
        query = query.index_select(0, layout.gather_q)
        key = key.index_select(0, layout.gather_k)
        value = value.index_select(0, layout.gather_k)
    heads = query.shape[1]
    sizes_q = [count * len_q for count, len_q, _, _ in layout.groups]
    sizes_k = [count * len_k for count, _, len_k, _ in layout.groups]
    outputs = []
    for (count, len_q, len_k, causal), q, k, v in zip(
        layout.groups, query.split(sizes_q), key.split(sizes_k), value.split(sizes_k), strict=True
    ):
        # [count * L, H, Dh] -> [count, H, L, Dh]
        q = q.view(count, len_q, heads, -1).transpose(1, 2)
        k = k.view(count, len_k, heads, -1).transpose(1, 2)
        v = v.view(count, len_k, heads, -1).transpose(1, 2)
        out = _batched_attention(q, k, v, scale, causal)
        outputs.append(out.transpose(1, 2).reshape(count * len_q, heads, -1))
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    if layout.scatter_q is not None:
        output = output.index_select(0, layout.scatter_q)
    return output


def _batched_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, causal: bool
) -> torch.Tensor:
    """Attention of :math:`(B, H, L, D_h)` batches: SDPA, or two matmuls where they are faster (inference only).

    On a CPU with AVX-512 BF16 and no AMX, SDPA's fused bfloat16 kernel runs at a fraction of the matmul
    rate: ``baddbmm`` + softmax + ``bmm`` took 18 ms where SDPA took 36 for 32 x 196 tokens, 9 ms against 23
    for one 1024-token image (EPYC, 12 heads of 64, 2026-12-08), with transformers' ``"eager"`` rounding
    (probabilities in bfloat16). Taken without gradients or autocast, outside ``torch.export``, while one
    sequence's scores (traced: the whole batch's) stay under :data:`_MATMUL_ATTENTION_MAX_BYTES`; eagerly a few
    sequences at a time, so that the scores stay in cache and memory stays bounded. SDPA's fused kernel, whose
    memory is linear in :math:`L`, runs otherwise.
    """
    batch, heads, len_q, head_dim = query.shape
    len_k = key.shape[2]
    sequence_bytes = heads * len_q * len_k * query.element_size()
    tracing = torch.compiler.is_compiling()
    if (
        causal
        or not _MATMUL_ATTENTION_CPU
        or query.device.type != "cpu"
        or query.dtype != torch.bfloat16
        or torch.is_autocast_enabled("cpu")  # autocast would run the softmax in float32 (and refuse the out=)
        or torch.compiler.is_exporting()  # exported graphs keep SDPA, with no guard on the batch size
        or sequence_bytes * (batch if tracing else 1) > _MATMUL_ATTENTION_MAX_BYTES
        or _needs_grad(query, key, value)
    ):
        return F.scaled_dot_product_attention(query, key, value, scale=scale, is_causal=causal)
    scale = head_dim**-0.5 if scale is None else scale
    q, k, v = (t.reshape(batch * heads, t.shape[2], t.shape[3]) for t in (query, key, value))
    if tracing:  # one call for the whole batch: the graph holds for any batch size
        return _sdpa_layout(_softmax_attention(q, k, v, scale), batch)
    output = q.new_empty(batch * heads, len_q, v.shape[-1])
    step = heads * max(1, _MATMUL_ATTENTION_CHUNK_BYTES // sequence_bytes)
    for start in range(0, batch * heads, step):
        rows = slice(start, start + step)
        _softmax_attention(q[rows], k[rows], v[rows], scale, out=output[rows])
    return _sdpa_layout(output, batch)


def _softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``softmax(scale q k^T) v`` of :math:`(B, L, D)` batches: ``baddbmm`` (scale in the matmul), softmax, ``bmm``."""
    scores = torch.baddbmm(q.new_empty(q.shape[0], q.shape[1], k.shape[1]), q, k.transpose(1, 2), beta=0.0, alpha=scale)
    return torch.bmm(scores.softmax(-1), v, out=out)


def _sdpa_layout(output: torch.Tensor, batch: int) -> torch.Tensor:
    """:math:`(B H, L, D)` -> :math:`(B, H, L, D)` stored as :math:`(B, L, H, D)`, as SDPA returns it on the CPU.

    The callers' merge of the heads is then a view, and the attended tokens have the strides of the SDPA path
    (a compiled block guards on them).
    """
    heads_first = output.view(batch, -1, *output.shape[1:])
    return heads_first.transpose(1, 2).contiguous().transpose(1, 2)


def _loop_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: VarlenLayout, scale: float | None
) -> torch.Tensor:
    outputs = []
    for q, k, v, causal in _per_sequence(query, key, value, layout):
        # [L, H, Dh] -> [1, H, L, Dh]: a 4-D call takes SDPA's fused kernels (memory linear in L); a 3-D one falls
        # back to the math path, which materialises the H x L x L scores (17 GB for one 32,768-token image)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale, is_causal=causal
        )
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs)


def _per_sequence(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: VarlenLayout):
    """``(q, k, v, causal)`` of every sequence of ``layout``, as views."""
    return zip(
        query.split(list(layout.seqlens_q)),
        key.split(list(layout.seqlens_k)),
        value.split(list(layout.seqlens_k)),
        layout.causal,
        strict=True,
    )


def _eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: VarlenLayout,
    scale: float | None,
    weights: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    outputs, all_weights = [], []
    for q, k, v, causal in _per_sequence(query, key, value, layout):
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [H, Lq, Lk]
        if causal:
            allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        probabilities = scores.softmax(-1)
        outputs.append(torch.einsum("hqk,khd->qhd", probabilities, v))
        all_weights.append(probabilities)
    return torch.cat(outputs), (tuple(all_weights) if weights else None)


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (CUDA: the driver's count; CPU: available physical pages), ``None`` if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError, RuntimeError):
        return None
    return None


def _check_dense_memory(query: torch.Tensor, key: torch.Tensor) -> None:
    """Fail fast when the dense backend's :math:`H \times N_q \times N_k` scores cannot fit in free memory."""
    needed = query.shape[1] * query.shape[0] * key.shape[0] * (query.element_size() + 1)  # scores + bool mask
    free = _free_memory(query.device)
    check(
        free is None or needed <= free,
        lambda: (
            f"backend='dense' needs about {needed / 2**30:.1f} GiB for the {query.shape[1]} x {query.shape[0]} x "
            f"{key.shape[0]} attention scores of this batch, more than the {free / 2**30:.1f} GiB free on "
            f"{query.device}: use backend='grouped' (memory linear in the tokens) or split the batch."
        ),
    )


def _check_eager_memory(query: torch.Tensor, layout: VarlenLayout, weights: bool) -> None:
    """Fail fast when the ``"eager"`` backend's explicit per-sequence scores cannot fit in free memory.

    It holds :math:`H \\times L_q \\times L_k` scores and probabilities of one sequence at a time, and every
    sequence's probabilities when the weights are returned. Host arithmetic on the layout's lengths (no device read).
    """
    blocks = [len_q * len_k for len_q, len_k in zip(layout.seqlens_q, layout.seqlens_k, strict=True)] or [0]
    per_element = query.shape[1] * query.element_size()
    needed = per_element * (2 * max(blocks) + (sum(blocks) if weights else 0))
    free = _free_memory(query.device)
    check(
        free is None or needed <= free,
        lambda: (
            f"backend='eager' needs about {needed / 2**30:.1f} GiB for the explicit attention scores of this batch "
            f"(longest sequence {max(layout.seqlens_q, default=0)} tokens, {query.shape[1]} heads), more than the "
            f"{free / 2**30:.1f} GiB free on {query.device}: use backend='grouped' or 'loop' (memory linear in the "
            "tokens; output_attentions=True needs 'eager'), or shorter sequences."
        ),
    )


def _dense_isolated(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    layout: VarlenLayout | None,
    scale: float | None,
) -> torch.Tensor:
    """The dense backend with sequences isolated from each other's NaN / inf keys and values.

    One masked :math:`N_q \times N_k` product mixes every sequence's keys into every row before the mask
    applies (``0 * nan = nan``): a single NaN image made the whole batch NaN. Non-finite keys / values are
    zeroed for the product, and the outputs of the sequences that held them are set to NaN afterwards (every
    row of the sequence: the head of a bad key, the channel of a bad value; causal rows before the bad token
    too), so a poisoned sequence stays NaN and no other changes. No host read (the compile path).
    """
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    bad_key = ~torch.isfinite(key).all(-1)  # [N_k, H]: a bad key spoils its head's rows
    bad_value = ~torch.isfinite(value)  # [N_k, H, D_v]: a bad value spoils its channel
    zero = torch.zeros((), dtype=key.dtype, device=key.device)
    finite_key = torch.where(bad_key[..., None], zero, key)
    finite_value = torch.where(bad_value | bad_key[..., None], zero, value)
    out = _dense_attention(query, finite_key, finite_value, cu_seqlens_q, cu_seqlens_k, layout, scale)
    positions_q = torch.arange(query.shape[0], device=query.device)
    positions_k = torch.arange(key.shape[0], device=key.device)
    doc_q = torch.searchsorted(cu_seqlens_q[1:].contiguous(), positions_q, right=True)
    doc_k = torch.searchsorted(cu_seqlens_k[1:].contiguous(), positions_k, right=True)
    bad = (bad_value | bad_key[..., None]).to(torch.int32)
    per_sequence = bad.new_zeros((cu_seqlens_k.shape[0], *bad.shape[1:])).index_add(0, doc_k, bad) > 0
    poisoned = per_sequence[doc_q.clamp(max=per_sequence.shape[0] - 1)]  # [N_q, H, D_v]
    return torch.where(poisoned, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)


def _dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    layout: VarlenLayout | None,
    scale: float | None,
) -> torch.Tensor:
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    positions_q = torch.arange(query.shape[0], device=query.device)
    positions_k = torch.arange(key.shape[0], device=key.device)
    # document id of every token: index of the block its position falls into
    doc_q = torch.searchsorted(cu_seqlens_q[1:].contiguous(), positions_q, right=True)
    doc_k = torch.searchsorted(cu_seqlens_k[1:].contiguous(), positions_k, right=True)
    mask = doc_q[:, None] == doc_k[None, :]  # [N_q, N_k]
    if layout is not None and (layout.causal_flags is not None or any(layout.causal)):
        flags = layout.causal_flags if layout.causal_flags is not None else torch.tensor(layout.causal)
        causal = flags.to(query.device, torch.bool)[doc_q]  # [N_q]
        offset_q = positions_q - cu_seqlens_q.to(positions_q.dtype)[doc_q]
        offset_k = positions_k - cu_seqlens_k.to(positions_k.dtype)[doc_k]
        mask = mask & (~causal[:, None] | (offset_k[None, :] <= offset_q[:, None]))
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None],
        key.transpose(0, 1)[None],
        value.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
    )
    return out[0].transpose(0, 1)


def _flash_available(query: torch.Tensor) -> bool:
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: VarlenLayout, scale: float | None
) -> torch.Tensor:
    # CUDA only: tests/test_attention.py::TestFlashBackend runs on a GPU machine and skips on CPU (as in our CI)
    check(
        _flash_available(query),
        lambda: (
            f"The flash attention backend needs float16 / bfloat16 CUDA tensors and torch's varlen kernels "
            f"(torch.nn.attention.varlen); got {query.dtype} on {query.device.type}. Use backend='auto' or 'grouped'."
        ),
    )
    check(
        len(set(layout.causal)) <= 1,
        "The flash attention backend takes one causal flag for all sequences; use backend='grouped'.",
    )
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(
        query,
        key,
        value,
        layout.cu_seqlens_q.to(query.device),
        layout.cu_seqlens_k.to(query.device),
        layout.max_seqlen_q,
        layout.max_seqlen_k,
        scale=scale,
        is_causal=bool(layout.causal and layout.causal[0]),
    )


class Attention(nn.Module):
    """Multi-head attention over packed tokens: self-attention, or cross-attention to another sequence.

    Args:
        width: query (and output) width :math:`D`.
        num_heads: heads :math:`H` (``D`` divisible by ``H``).
        key_width: width of the tokens keys and values are computed from; defaults to ``width``
            (cross-attention to vision tokens of another width, as the LocCa decoder does).
        backend: one of :data:`ATTENTION_BACKENDS`, see :func:`varlen_attention`.
        fused_in_proj: hold the q/k/v projections as ``torch.nn.MultiheadAttention``'s ``in_proj_weight``
            :math:`(3D, D)` and ``in_proj_bias`` (the MAP head's layout in Hugging Face checkpoints) instead of
            three Linear layers; needs ``key_width == width``.

    Example:
        >>> attention = Attention(8, num_heads=2)
        >>> layout = VarlenLayout.from_seqlens([3, 2])
        >>> tokens, weights = attention(torch.rand(5, 8), layout)
        >>> tokens.shape, weights is None
        (torch.Size([5, 8]), True)
        >>> pool = Attention(8, num_heads=2)  # one query per sequence attending to its tokens
        >>> pool(torch.rand(2, 8), VarlenLayout.from_seqlens([1, 1], [3, 2]), torch.rand(5, 8))[0].shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        key_width: int | None = None,
        backend: str = "auto",
        fused_in_proj: bool = False,
    ) -> None:
        super().__init__()
        check(
            num_heads > 0 and width % num_heads == 0,
            lambda: f"width {width} must be divisible by num_heads {num_heads}.",
        )
        check(
            backend in ATTENTION_BACKENDS,
            lambda: f"Unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}.",
        )
        key_width = width if key_width is None else key_width
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.backend = backend
        self.fused_in_proj = fused_in_proj
        if fused_in_proj:
            check(key_width == width, lambda: f"fused_in_proj needs key_width == width, got {key_width} != {width}.")
            self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            self.q_proj = nn.Linear(width, width)
            self.k_proj = nn.Linear(key_width, width)
            self.v_proj = nn.Linear(key_width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: VarlenLayout,
        key_states: torch.Tensor | None = None,
        output_attentions: bool = False,
        *,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Attend within each sequence of ``layout``.

        Args:
            hidden_states: packed query tokens :math:`(N_q, D)`.
            layout: which queries attend to which keys.
            key_states: packed tokens :math:`(N_k, D_k)` for cross-attention; ``hidden_states`` by default.
            output_attentions: also return the attention weights (computed with the ``"eager"`` backend).
            residual: :math:`(N_q, D)` tokens added to the output (a pre-LN block's skip connection; fused
                into the output projection on the CPU fast path).

        Returns:
            :math:`(N_q, D)` tokens (plus ``residual``) and, on request, one :math:`(H, L_q, L_k)` weight
            tensor per sequence.
        """
        query, key, value = self.project_heads(hidden_states, key_states)
        attended, weights = self.attend(query, key, value, layout, output_attentions)
        return self.project_output(attended, residual), weights

    def project_heads(
        self, hidden_states: torch.Tensor, key_states: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q/k/v projections split into heads: :math:`(N_q, H, D_h)`, :math:`(N_k, H, D_h)` twice.

        Per token, with no layout: the part before attention that :func:`~kornia_siglip2.layers.compile_blocks`
        compiles once for every batch.
        """
        key_states = hidden_states if key_states is None else key_states
        query, key, value = self._project(hidden_states, key_states)
        # [N, D] -> [N, H, Dh]
        return tuple(tensor.unflatten(-1, (self.num_heads, self.head_dim)) for tensor in (query, key, value))

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: VarlenLayout,
        output_attentions: bool = False,
        merge_heads: bool = True,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Attention within each sequence of ``layout`` with this module's backend: :math:`(N_q, D)` and weights.

        ``merge_heads=False`` returns the attended tokens as :math:`(N_q, H, D_h)`.
        """
        backend = "eager" if output_attentions else self.backend
        attended, weights = _attend(query, key, value, None, None, layout, None, backend, output_attentions)
        return (attended.flatten(1) if merge_heads else attended), weights

    def project_output(self, attended: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The output projection of attended tokens, :math:`(N_q, D)` or :math:`(N_q, H, D_h)`, plus ``residual``."""
        attended = attended.flatten(1)
        if _plain_linear(self.out_proj) and fused_linear_available(attended, self.out_proj.weight):
            return fused_linear(attended, self.out_proj.weight, self.out_proj.bias, residual=residual)
        output = self.out_proj(attended)
        return output if residual is None else residual + output

    def _project(
        self, hidden_states: torch.Tensor, key_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.fused_in_proj:
            projections = (self.q_proj, self.k_proj, self.v_proj)
            plain = key_states is hidden_states and all(_plain_linear(p) for p in projections)
            parameters = [t for p in projections for t in (p.weight, p.bias) if t is not None]
            if plain and fused_linear_available(hidden_states, *parameters):
                # three oneDNN matmuls on the parameters themselves: as fast as one on a concatenated (3D, D)
                # kernel (measured within +-8 %, AMD EPYC), without keeping a copy of the q, k and v weights
                return tuple(fused_linear(hidden_states, p.weight, p.bias) for p in projections)
            return self.q_proj(hidden_states), self.k_proj(key_states), self.v_proj(key_states)
        width = self.out_proj.in_features
        fusable = fused_linear_available(hidden_states, self.in_proj_weight, self.in_proj_bias)
        if key_states is hidden_states and fusable:
            return fused_linear(hidden_states, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
        query = fused_linear(hidden_states, self.in_proj_weight[:width], self.in_proj_bias[:width])
        if key_states is hidden_states:
            key, value = F.linear(key_states, self.in_proj_weight[width:], self.in_proj_bias[width:]).chunk(2, -1)
        else:
            key = fused_linear(key_states, self.in_proj_weight[width : 2 * width], self.in_proj_bias[width : 2 * width])
            value = fused_linear(key_states, self.in_proj_weight[2 * width :], self.in_proj_bias[2 * width :])
        return query, key, value


def _plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is exactly ``nn.Linear`` with no hooks, so that its matmul may be fused or regrouped."""
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Use ``backend`` (one of :data:`ATTENTION_BACKENDS`) in every :class:`Attention` inside ``module``.

    Args:
        module: a model, a tower or any module holding :class:`Attention` layers.
        backend: the backend name.

    Raises:
        ValueCheckError: unknown backend.

    Example:
        >>> block = nn.ModuleList([Attention(8, num_heads=2), Attention(8, num_heads=2)])
        >>> set_attention_backend(block, "dense")
        >>> [layer.backend for layer in block]
        ['dense', 'dense']
    """
    check(
        backend in ATTENTION_BACKENDS,
        lambda: f"Unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}.",
    )
    for child in module.modules():
        if isinstance(child, Attention):
            child.backend = backend
