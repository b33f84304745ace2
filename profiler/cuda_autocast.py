"""CUDA's autocast policy on the CPU: what `torch.autocast("cuda", bf16)` does, for `torch.autocast("cpu", bf16)`.

torch registers different autocast op lists for CUDA and CPU (aten/src/ATen/autocast_mode.cpp; the CUDA lists are the
`AT_FORALL_*` macros of autocast_mode.h). The differences that change training memory: on CUDA, layer_norm /
rms_norm / group_norm return fp32 and save an fp32 copy of their input; softmax / log_softmax / sum / cumsum without a
dtype return fp32; exp / log / pow / rsqrt run in fp32. On the CPU all of these stay in bf16.

`cuda_autocast_policy()` registers Python kernels on the `AutocastCPU` dispatch key that apply the CUDA lists, and
turns CPU-only entries into fall-throughs, so a CPU (or fake) trace under `torch.autocast("cpu")` casts exactly as a
GPU run would. Ops whose CPU policy already equals CUDA's (linear, matmul, mm, bmm, addmm, conv, sdpa) keep their C++
kernels, which own the weight-cast cache (one bf16 copy per fp32 trainable weight per forward).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

_AUTOCAST_CPU = torch._C.DispatchKey.AutocastCPU
_EXCLUDE = torch._C.DispatchKeySet(_AUTOCAST_CPU)

# autocast_mode.h (torch 2.13): AT_FORALL_LOWER_PRECISION_FP
LOWER_PRECISION = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "scaled_dot_product_attention",
)
# AT_FORALL_FP32
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
    "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
)
# AT_FORALL_FP32_SET_OPT_DTYPE: fp32 output unless a dtype is passed
FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)
# AT_FORALL_PROMOTE
PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
           "tensordot", "scatter_add")


def _op(name: str):
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == "cpu"


def _map(value, fn):
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return fn(value)


def _caster(dtype):
    return lambda t: t.to(dtype) if _eligible(t) and t.dtype != dtype else t


def _cast_kernel(op, dtype_of):
    def kernel(*args, **kwargs):
        dtype = dtype_of(args, kwargs)
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            cast = _caster(dtype)
            return op(*_map(list(args), cast), **{k: _map(v, cast) for k, v in kwargs.items()})
    return kernel


def _set_opt_dtype_kernel(op):
    index = [i for i, arg in enumerate(op._schema.arguments) if arg.name == "dtype"][0]

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            if _eligible(args[0]):
                args = list(args)
                if len(args) > index:
                    if args[index] is None:
                        args[index] = torch.float32
                elif kwargs.get("dtype") is None:
                    kwargs["dtype"] = torch.float32
            return op(*args, **kwargs)
    return kernel


def _promote_dtype(args, kwargs):
    dtype = torch.get_autocast_dtype("cpu")
    for value in list(args) + list(kwargs.values()):
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if _eligible(t):
                dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, key)


def _install() -> torch.library.Library:
    lib = torch.library.Library("aten", "IMPL")

    def register(name, fn, with_keyset=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib.impl(name, fn, "AutocastCPU", with_keyset=with_keyset)

    lower = lambda args, kwargs: torch.get_autocast_dtype("cpu")  # noqa: E731
    for name in LOWER_PRECISION:
        if not _has_kernel("aten::" + name, "AutocastCPU"):
            register(name, _cast_kernel(_op(name), lower))
    for name in FP32:
        register(name, _cast_kernel(_op(name), lambda args, kwargs: torch.float32))
    for name in FP32_SET_OPT_DTYPE:
        register(name, _set_opt_dtype_kernel(_op(name)))
    for name in PROMOTE:
        register(name, _cast_kernel(_op(name), _promote_dtype))
    # Entries only the CPU policy has (e.g. cross_entropy_loss, stack, cat) fall through, as on CUDA
    after = torch._C._dispatch_keyset_full_after(_AUTOCAST_CPU)
    cuda_listed = {"aten::" + n for n in (*LOWER_PRECISION, *FP32, *FP32_SET_OPT_DTYPE, *PROMOTE)}
    for qualified in torch._C._dispatch_get_all_op_names():
        if (qualified.startswith("aten::") and qualified not in cuda_listed
                and _has_kernel(qualified, "AutocastCPU") and not _has_kernel(qualified, "AutocastCUDA")):
            op = _op(qualified[len("aten::"):])
            register(qualified[len("aten::"):],
                     lambda keyset, *args, _op=op, **kwargs: _op.redispatch(keyset & after, *args, **kwargs),
                     with_keyset=True)
    return lib


@contextlib.contextmanager
def cuda_autocast_policy(dtype: torch.dtype | None):
    """Within this context, `torch.autocast("cpu", dtype)` follows CUDA's op lists; `torch.is_autocast_enabled()`
    (no argument: the CUDA flag, which peft's quantized LoRA layers test) reports the autocast state too."""
    if dtype is None:
        yield
        return
    lib = _install()
    was_enabled, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", was_enabled)
        torch.set_autocast_dtype("cuda", was_dtype)
        lib._destroy()


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None):
    """`torch.autocast` for the traced forward, with the CUDA flag mirrored (see `cuda_autocast_policy`)."""
    if dtype is None:
        yield
        return
    was = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        with torch.autocast("cpu", dtype=dtype):
            yield
    finally:
        torch.set_autocast_enabled("cuda", was)
