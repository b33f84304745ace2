"""Symbolic versions of the tensor ops the modeling code runs, with what autograd saves for each.

Each function allocates its output on the engine, records an autograd node with the saved tensors that torch's
derivative formulas keep (tools/autograd/derivatives.yaml), and applies CUDA's autocast policy (the weight-cast cache
for trainable fp32 leaves; norms, softmax and pow in fp32). Sizes are element counts; the engine turns them into
bytes rounded to 512-byte blocks.
"""

from __future__ import annotations

from ..errors import VlplanError
from .sdpa import EFFICIENT, FLASH, MATH, sdpa_backend
from .sim import DTYPE_BYTES, Engine, Node, Param, T


def promote(a: str, b: str) -> str:
    return a if DTYPE_BYTES[a] >= DTYPE_BYTES[b] else b


# Casts --------------------------------------------------------------------------------------------------------------


def cast(e: Engine, x: T, dtype: str, name: str = "") -> T:
    """`x.to(dtype)`: a copy when the dtype changes; ToCopyBackward saves nothing."""
    if x.dtype == dtype:
        return x
    out = e.new(x.numel, dtype, name=name or f"{x.name}:{dtype}")
    e.record(Node("to_copy", [x] if x.rg else [], [], []), out)
    return out


def weight_for_matmul(e: Engine, p: Param) -> T:
    """The weight a half-precision autocast matmul uses: a bf16 copy of an fp32 weight, cached for the whole forward
    when the weight is a trainable leaf (autocast_mode.cpp `cached_cast`), a fresh copy per use when frozen."""
    w = p.tensor
    if e.autocast is None or w.dtype != "fp32":
        return w
    if p.trainable:
        cached = e.cast_cache.get(id(p))
        if cached is None:
            cached = e.new(p.numel, e.autocast, name=f"{p.name}:cast")
            # ToCopyBackward: the half-precision weight gradient arrives as this node's incoming gradient (allocated
            # by the matmul's backward); it is converted to the parameter's dtype and accumulated, nothing more
            e.record(Node("to_copy", [], [], [p]), cached)
            e.cast_cache[id(p)] = cached
        return cached
    return e.new(p.numel, e.autocast, name=f"{p.name}:cast")


def input_for_matmul(e: Engine, x: T) -> T:
    return cast(e, x, e.autocast) if e.autocast else x


def patch_conv(e: Engine, pixels: T, weight: Param, bias: Param | None, out_numel: int, name: str,
               valid_padding: bool = False) -> T:
    """A patch-embedding convolution (nn.Conv2d / nn.Conv3d): under autocast (conv2d is on the lower-precision list) the input, weight and
    bias are cast, trainable fp32 weights through the cached cast. ConvolutionBackward has one formula for input,
    weight and bias, so it saves both the input and the weight whenever it exists (derivatives.yaml
    `convolution`). `valid_padding` (SigLIP's `padding="valid"`): `conv2d.padding` is not on the autocast list and
    its implementation adds the bias after the convolution, so the bias is cast only transiently and not cached."""
    conv_in = input_for_matmul(e, pixels)
    w = weight_for_matmul(e, weight)
    pairs = [(w, weight)]
    if bias is not None:
        pairs.append((bias.tensor if valid_padding else weight_for_matmul(e, bias), bias))
    out = e.new(out_numel, e.autocast or weight.dtype, name=name)
    inputs = [t for t, p in pairs if t is not p.tensor and t.node is not None]
    params = [p for t, p in pairs if p.trainable and t is p.tensor]
    e.record(Node(f"conv:{name}", inputs, [conv_in, w], params), out)
    if bias is not None and valid_padding and e.autocast and bias.dtype != e.autocast:
        transient = e.new(bias.numel, e.autocast, name=f"{name}.bias_cast")
        del transient
    return out


def conv2d(e: Engine, x: T, weight: Param, bias: Param | None, out_numel: int, name: str = "") -> T:
    """nn.Conv2d (SigLIP's `padding="valid"`, Mllama's, CLIP's) as the tracer's CPU autocast runs it
    (profiler/cuda_autocast.py). `conv2d.padding` has no autocast kernel of its own: it decomposes to `convolution`,
    whose autocast kernel casts input, weight and bias to the half dtype. Unlike `patch_conv`, the casts bypass the
    weight-cast cache, so the bias copy is transient and the weight copy lives as long as the backward keeps it:
    ConvolutionBackward saves the (cast) input and weight whenever one of input, weight or bias needs a gradient (one
    backward formula for all three)."""
    xin = input_for_matmul(e, x)
    casts = []
    for p in (weight, bias):
        if p is None or e.autocast is None or p.dtype == e.autocast:
            casts.append(p.tensor if p is not None else None)
            continue
        copy = e.new(p.numel, e.autocast, name=f"{p.name}:cast")
        e.record(Node("to_copy", [], [], [p] if p.trainable else []), copy)
        casts.append(copy)
    w, b = casts
    out = e.new(out_numel, e.autocast or promote(xin.dtype, w.dtype), name=name)
    pairs = [(weight, w)] + ([(bias, b)] if bias is not None else [])
    needed = xin.rg or any(p.trainable for p, _ in pairs)
    inputs = ([xin] if xin.rg else []) + [t for p, t in pairs if p.trainable and t is not p.tensor]
    params = [p for p, t in pairs if p.trainable and t is p.tensor]
    e.record(Node(f"conv2d:{name}", inputs, [xin, w] if needed else [], params), out)
    return out


# Linear layers ------------------------------------------------------------------------------------------------------


def linear(e: Engine, x: T, weight: Param, out_features: int, bias: Param | None = None, name: str = "") -> T:
    """F.linear (addmm/mm): saves the input if the weight needs a gradient, the weight if the input does."""
    xin = input_for_matmul(e, x)
    w = weight_for_matmul(e, weight)
    b = weight_for_matmul(e, bias) if bias is not None else None  # autocast casts the bias like the weight
    tokens = x.numel // (weight.numel // out_features)
    out_dtype = e.autocast or promote(xin.dtype, w.dtype)
    out = e.new(tokens * out_features, out_dtype, name=name)
    saved, params = [], []
    if weight.trainable:
        saved.append(xin)
        if w is weight.tensor:  # no autocast copy: the gradient goes straight to the parameter
            params.append(weight)
    if xin.rg:
        saved.append(w)
    if bias is not None and bias.trainable and b is bias.tensor:
        params.append(bias)
    inputs = [xin] if xin.rg else []
    if w is not weight.tensor and weight.trainable and w.node is not None:
        inputs.append(w)  # the cached cast's node carries the weight gradient
    if b is not None and b is not bias.tensor and bias.trainable and b.node is not None:
        inputs.append(b)
    e.record(Node(f"linear:{name}", inputs, saved, params), out)
    return out


def lora_linear(e: Engine, x: T, base: Param, lora_a: Param, lora_b: Param, out_features: int, rank: int,
                bias: Param | None = None, name: str = "", dropout: bool = False) -> T:
    """peft `lora.Linear.forward` (peft tuners/lora/layer.py): base_layer(x) + lora_B(lora_A(dropout(x))) * scaling
    with x cast to the adapter dtype; `dropout` is nn.Dropout(lora_dropout) when lora_dropout > 0, else nn.Identity."""
    result = linear(e, x, base, out_features, bias, name=f"{name}.base")
    xa = cast(e, x, lora_a.dtype, name=f"{name}.lora_in")  # peft `_cast_input_dtype` to the adapter dtype
    dropped = dropout_op(e, xa) if dropout else xa
    a = linear(e, dropped, lora_a, rank, name=f"{name}.lora_A")
    del dropped  # `dropout(x)` is a temporary of the expression: lora_A saves it (or its autocast copy)
    b = linear(e, a, lora_b, out_features, name=f"{name}.lora_B")
    del a
    scaled = scale(e, b)
    del b
    result_dtype = result.dtype
    out = add(e, result, scaled, name=name)
    del result, scaled
    out = cast(e, out, result_dtype, name=name)  # `result = result.to(torch_result_dtype)`
    del xa  # peft rebinds `x` to the cast input: it lives until forward returns
    return out


def dora_linear(e: Engine, x: T, base: Param, lora_a: Param, lora_b: Param, magnitude: Param, out_features: int,
                rank: int, bias: Param | None = None, name: str = "", dropout: bool = False) -> T:
    """peft DoRA (`DoraLinearVariant.forward` -> `DoraLinearLayer.forward`, peft tuners/lora/dora.py):

    lora_weight = lora_B(lora_A(eye(in))).T            (the identity and its cast are saved by lora_A)
    weight = base weight .to(x.dtype); norm = ||weight + scaling * lora_weight.detach()||_row  (out x in temps)
    result = base(x) + ((m / norm - 1) * base(x) + (m / norm) * lora_B(lora_A(x)) * scaling)
    with x already cast to the adapter dtype (fp32) by `lora.Linear.forward`. With lora_dropout > 0 the variant
    rebinds x = dropout(x) and passes no base result, so DoRA computes its own `F.linear(x, weight)` on the dropped
    input, whose autocast copies of input and weight are saved by the matmul (`DoraLinearVariant.forward`).
    """
    in_features = lora_a.numel // rank
    result = linear(e, x, base, out_features, bias, name=f"{name}.base")
    xa = cast(e, x, lora_a.dtype, name=f"{name}.lora_in")
    xd = dropout_op(e, xa) if dropout else xa  # the variant's `x = dropout(x)`, a local until it returns
    # get_lora_weight: eye(in) in the adapter dtype through lora_A and lora_B
    eye = e.new(in_features * in_features, lora_a.dtype, name=f"{name}.eye")
    ea = linear(e, eye, lora_a, rank, name=f"{name}.eye_A")
    lw = linear(e, ea, lora_b, out_features, name=f"{name}.eye_B")
    del ea, eye  # `x_eye` is get_lora_weight's local: it lives until lora_B has run
    lora_weight = cast(e, lw, xa.dtype, name=f"{name}.lora_weight")
    del lw
    weight = e.new(base.numel, xa.dtype, name=f"{name}.weight_cast") if base.dtype != xa.dtype else base.tensor
    scaled = e.new(base.numel, xa.dtype, name=f"{name}.scaled_lora_weight")
    total = e.new(base.numel, xa.dtype, name=f"{name}.weight_plus_lora")
    del scaled
    norm32 = e.new(out_features, "fp32", name=f"{name}.weight_norm")  # linalg.norm (fp32 under CUDA autocast)
    del total
    norm = cast(e, norm32, xa.dtype, name=f"{name}.weight_norm_cast")
    del norm32
    mag_scale = e.new(out_features, magnitude.dtype, name=f"{name}.mag_norm_scale")
    e.record(Node("div", [], [norm], [magnitude]), mag_scale)
    del norm
    a = linear(e, xd, lora_a, rank, name=f"{name}.lora_A")
    lora_result = linear(e, a, lora_b, out_features, name=f"{name}.lora_B")
    del a
    base_result = result
    if dropout:
        # `base_result = F.linear(x, transpose(weight, fan_in_fan_out))`: the frozen weight copy needs no gradient,
        # so the matmul saves only the (autocast copy of the) weight, for the dropped input's gradient
        xin = input_for_matmul(e, xd)
        w = cast(e, weight, e.autocast, name=f"{name}.weight_cast_mm") if e.autocast else weight
        base_result = e.new(xd.numel // in_features * out_features, e.autocast or xd.dtype, name=f"{name}.dora_base_in")
        e.record(Node(f"linear:{name}.dora_base", [xin] if xin.rg else [], [w] if xin.rg else [], []), base_result)
        del xin, w
    elif bias is not None:
        base_result = add(e, result, e.new(out_features, result.dtype, name="bias"), name=f"{name}.minus_bias")
    minus_one = scale(e, mag_scale, name=f"{name}.mag_minus_one")
    term1 = mul(e, minus_one, base_result, name=f"{name}.dora_base")
    del minus_one, base_result
    term2 = mul(e, mag_scale, lora_result, name=f"{name}.dora_lora")
    del lora_result, mag_scale
    term2s = scale(e, term2, name=f"{name}.dora_lora_scaled")
    del term2
    dora = add(e, term1, term2s, name=f"{name}.dora")
    del term1, term2s, lora_weight, weight
    result_dtype = result.dtype
    out = add(e, result, dora, name=name)
    del result, dora
    out = cast(e, out, result_dtype, name=name)
    del xa, xd
    return out


OFT_CAYLEY_NEUMANN_TERMS = 5  # peft OFTConfig.num_cayley_neumann_terms default; LLaMA-Factory does not set it


def oft_linear(e: Engine, x: T, base: Param, oft_r: Param, in_features: int, out_features: int, block_size: int,
               bias: Param | None = None, name: str = "") -> T:
    """peft OFT `oft.Linear.forward` (peft 0.21 tuners/oft/layer.py): x cast to the adapter dtype, rotated block by
    block by `OFTRotationModule.forward`, cast back and fed to the frozen base layer:

    Q = skew(oft_R)                      zeros(r, b, b); index_put_ of the upper triangle; `matrix - matrix.T`
    R = I + 2Q + 2Q^2 + 2Q^3 + Q^4       `_cayley_batch` with use_cayley_neumann (5 terms): bmm chain, in-place adds
    x' = einsum("...rk,rkc->...rc", x.reshape(..., r, b), R)    -> a permuted view of a bmm result, then
    x'.reshape(x.shape).to(fp32)         a contiguous copy of it, then its fp32 cast
    result = base_layer(x'.to(fp32).to(x.dtype))

    Under CUDA autocast bmm and einsum are on the lower-precision list: every bmm casts its fp32 operands (Q is no
    leaf, so each use is a fresh copy) and saves the copies; the einsum saves bf16 copies of x and R. The frozen
    base layer saves only its weight. Its backward (traced): the einsum's fp32 input gradient is produced
    non-contiguous and copied once more by the reshape's backward (the `workspace` of the cast node)."""
    blocks = in_features // block_size
    square = blocks * block_size * block_size
    dtype = oft_r.dtype
    xa = cast(e, x, dtype, name=f"{name}.oft_in")  # peft `_cast_input_dtype` to the adapter dtype
    # `_pytorch_skew_symmetric`: zeros, then index_put_ of the parameter's values (IndexPutBackward gives its grad)
    matrix = e.new(square, dtype, name=f"{name}.oft_skew_zeros")
    e.record(Node("index_put_", [], [], [oft_r]), matrix)
    skew = e.new(square, dtype, name=f"{name}.oft_skew")
    node = Node("sub", [matrix, matrix], [], [])  # SubBackward: grad passed to self, `-grad` (a copy) to other
    node.grad_dtype[0] = "passthrough"
    e.record(node, skew)
    del matrix, node  # (without grad mode the unrecorded node would hold the zeros)
    eye = e.new(block_size * block_size, dtype, name=f"{name}.oft_eye")
    rotation = e.new(square, dtype, name=f"{name}.oft_rotation")  # `torch.eye(b).repeat(r, 1, 1)`
    del eye

    def add_(term: T) -> None:
        """`R.add_(term[, alpha])`: the in-place node passes R's gradient through and gives the term its own
        (a scaled copy, computed in R's dtype then cast to the term's)."""
        inputs = ([rotation] if rotation.rg else []) + [term]
        node = Node("add_", inputs, [], [], workspace=square * DTYPE_BYTES[dtype] if term.dtype != dtype else 0)
        if rotation.rg:
            node.grad_dtype[0] = "passthrough"
        e.record(node, rotation)

    def bmm(a: T, b: T, label: str) -> T:
        a_in, b_in = input_for_matmul(e, a), input_for_matmul(e, b)
        out = e.new(square, e.autocast or promote(a_in.dtype, b_in.dtype), name=f"{name}.{label}")
        e.record(Node("bmm", [a_in, b_in], [b_in, a_in], []), out)
        return out

    terms = OFT_CAYLEY_NEUMANN_TERMS
    if terms > 1:
        add_(skew)
        if terms > 2:
            power = bmm(skew, skew, "oft_q2")
            add_(power)
            for step in range(3, terms - 1):
                power = bmm(power, skew, f"oft_q{step}")
                add_(power)
            power = bmm(power, skew, f"oft_q{terms - 1}")
            add_(power)
            del power
    del skew
    # the einsum: autocast copies of the input and of R (both saved by its bmm), a bmm result and its contiguous copy
    x_in = e.new(xa.numel, e.autocast or dtype, name=f"{name}.oft_einsum_in") if e.autocast else xa
    if x_in is not xa:
        e.record(Node("to_copy", [xa] if xa.rg else [], [], [], workspace=xa.nbytes if xa.rg else 0), x_in)
    r_in = input_for_matmul(e, rotation)
    product = e.new(xa.numel, x_in.dtype, name=f"{name}.oft_einsum")
    e.record(Node("einsum", [t for t in (x_in, r_in) if t.rg], ([x_in] if r_in.rg else []) + ([r_in] if x_in.rg
                                                                                               else []), []), product)
    del r_in, x_in
    # einsum returns a permuted view of its bmm result (`x_rotated_reshaped`, a local until forward returns);
    # `.reshape(*folded_shape)` copies it
    rotated = _copy(e, product, product.numel, f"{name}.oft_rotated")
    if rotated.node is not None:
        rotated.node.grad_dtype[0] = "passthrough"
    rotated32 = cast(e, rotated, dtype, name=f"{name}.oft_rotated_out")  # `.to(required_dtype)`
    # OFTRotationModule.forward returns (its locals `orth_rotate`, `x_rotated_reshaped` and the copy die); `x` of
    # oft.Linear.forward rebinds to the result, which frees the adapter-dtype input
    del rotated, product, rotation, xa
    xin = cast(e, rotated32, x.dtype, name=f"{name}.oft_base_in")  # `x.to(previous_dtype)`
    result = linear(e, xin, base, out_features, bias, name=name)
    del xin, rotated32
    return result


def quant_linear(e: Engine, x: T, weight: Param, in_features: int, out_features: int, bits: int,
                 name: str = "") -> T:
    """bitsandbytes `MatMul4Bit` / `MatMul8bitLt` on a frozen quantized weight (bitsandbytes/autograd/_functions.py).

    4-bit: the weight is dequantized to the compute dtype for the matmul (a transient of in*out elements) and
    nothing is saved; backward dequantizes it again. 8-bit: the input is cast to fp16 and quantized to int8, the
    int32 matmul result (tokens*out*4 bytes) is dequantized; the input is saved for backward, which dequantizes the
    weight to the input dtype.
    """
    tokens = x.numel // in_features
    dtype = e.autocast or x.dtype
    if bits == 4:
        dequantized = e.new(in_features * out_features, dtype, name=f"{name}.dequantized")
        out = e.new(tokens * out_features, dtype, name=name)
        del dequantized
        node = Node(f"matmul4bit:{name}", [x] if x.rg else [], [], [],
                    workspace=in_features * out_features * DTYPE_BYTES[dtype])
    else:
        half = e.new(x.numel, "fp16", name=f"{name}.fp16") if x.dtype != "fp16" else x
        quantized = e.new(x.numel, "uint8", name=f"{name}.int8")
        scale_a = e.new(tokens, "fp32", name=f"{name}.SCA")
        out32 = e.new(tokens * out_features, "int32", name=f"{name}.int32")
        del quantized, scale_a
        out16 = e.new(tokens * out_features, "fp16", name=f"{name}.fp16_out")
        del out32
        out = cast(e, out16, x.dtype, name=name) if x.dtype != "fp16" else out16
        del out16, half
        node = Node(f"matmul8bit:{name}", [x] if x.rg else [], [x] if x.rg else [], [],
                    workspace=in_features * out_features * DTYPE_BYTES[x.dtype])
    e.record(node, out)
    return out


def qlora_linear(e: Engine, x: T, base: Param, lora_a: Param, lora_b: Param, in_features: int,
                 out_features: int, rank: int, bits: int, name: str = "", dropout: bool = False) -> T:
    """peft `lora.bnb.Linear4bit.forward` / `Linear8bitLt.forward`: result = base_layer(x) (cloned for 4-bit);
    under autocast the adapters see x as is (`requires_conversion = not torch.is_autocast_enabled()`), otherwise x
    is cast to the adapter dtype and the output cast back."""
    result = quant_linear(e, x, base, in_features, out_features, bits, name=f"{name}.base")
    if bits == 4:
        cloned = _copy(e, result, result.numel, f"{name}.clone")
        del result
        result = cloned
    convert = e.autocast is None
    xa = cast(e, x, lora_a.dtype, name=f"{name}.lora_in") if convert else x
    dropped = dropout_op(e, xa) if dropout else xa  # `lora_B(lora_A(dropout(x)))`, as in lora.Linear
    a = linear(e, dropped, lora_a, rank, name=f"{name}.lora_A")
    del dropped
    b = linear(e, a, lora_b, out_features, name=f"{name}.lora_B")
    del a
    scaled = scale(e, b)
    del b
    if convert:
        scaled = cast(e, scaled, result.dtype, name=f"{name}.lora_out")
    out = add(e, result, scaled, name=name)
    del result, scaled, xa
    return out


def masked_scatter(e: Engine, x: T, mask: T, source: T, name: str = "") -> T:
    """x.masked_scatter(mask, source) on CUDA (aten/src/ATen/native/cuda/IndexKernel.cu `masked_scatter__cuda`):
    the output (a clone of x), then while the kernel runs an int64 prefix sum over the mask expanded to x's shape
    and a contiguous copy of that expanded bool mask: 9 bytes per element of x. Saves the mask for backward."""
    out = e.new(x.numel, x.dtype, name=name or "masked_scatter")
    prefix_sum = e.new(x.numel, "int64", name=f"{out.name}.maskPrefixSum")
    mask_cont = e.new(x.numel, "bool", name=f"{out.name}.mask_contiguous")
    del prefix_sum, mask_cont
    inputs = [t for t in (x, source) if t.rg]
    e.record(Node("masked_scatter", inputs, [mask] if inputs else [], []), out)
    return out


def dropout_op(e: Engine, x: T) -> T:
    """F.dropout(0 < p < 1) in training on CUDA: `at::dropout` takes the fused `native_dropout` kernel
    (aten/src/ATen/native/Dropout.cpp `is_fused_kernel_acceptable`), which returns the output and a bool mask; its
    backward (NativeDropoutBackward) saves only the mask."""
    mask = e.new(x.numel, "bool", name=f"{x.name}:dropout_mask")
    out = e.new(x.numel, x.dtype, name=f"{x.name}:dropout")
    e.record(Node("dropout", [x] if x.rg else [], [mask], []), out)
    return out


# Elementwise --------------------------------------------------------------------------------------------------------


def add(e: Engine, a: T, b: T, name: str = "") -> T:
    """a + b: saves nothing. Gradients pass through (cast to each input's dtype by the engine)."""
    out = e.new(max(a.numel, b.numel), promote(a.dtype, b.dtype), name=name)
    inputs = [t for t in (a, b) if t.rg]
    node = Node("add", inputs, [], [])
    for index, t in enumerate(inputs):
        if t.dtype == out.dtype and t.numel == out.numel:
            node.grad_dtype[index] = "passthrough"
    e.record(node, out)
    return out


def scale(e: Engine, x: T, name: str = "") -> T:
    """x * python_scalar: saves nothing."""
    out = e.new(x.numel, x.dtype, name=name or f"{x.name}*s")
    e.record(Node("mul_scalar", [x] if x.rg else [], [], []), out)
    return out


def mul(e: Engine, a: T, b: T, name: str = "") -> T:
    """a * b (tensors, b may broadcast): saves b for a's gradient and a for b's."""
    out = e.new(max(a.numel, b.numel), promote(a.dtype, b.dtype), name=name)
    saved = ([b] if a.rg else []) + ([a] if b.rg else [])
    e.record(Node("mul", [t for t in (a, b) if t.rg], saved, []), out)
    return out


def mul_param(e: Engine, p: Param, x: T, name: str = "") -> T:
    """weight * x (norm weights): saves x if the weight trains, the weight if x needs a gradient."""
    out = e.new(x.numel, promote(p.dtype, x.dtype), name=name)
    saved = [x] if p.trainable else []
    e.record(Node("mul_weight", [x] if x.rg else [], saved, [p] if p.trainable else []), out)
    return out


def unary(e: Engine, kind: str, x: T, name: str = "") -> T:
    """silu / gelu / quick_gelu / gelu_tanh: saves the input (`silu_backward(grad, self)`, `gelu_backward`).
    QuickGELU is `x * sigmoid(1.702 x)`: sigmoid saves its result, mul saves both."""
    if kind == "quick_gelu":
        s = e.new(x.numel, x.dtype, name=f"{name}.sigmoid_in")
        sig = e.new(x.numel, x.dtype, name=f"{name}.sigmoid")
        e.record(Node("mul_scalar", [x] if x.rg else [], [], []), s)
        e.record(Node("sigmoid", [s] if s.rg else [], [sig], []), sig)
        del s
        return mul(e, x, sig, name=name)
    out = e.new(x.numel, x.dtype, name=name)
    e.record(Node(kind, [x] if x.rg else [], [x], []), out)
    return out


# Norms --------------------------------------------------------------------------------------------------------------


def rms_norm(e: Engine, x: T, weight: Param, tokens: int, name: str = "") -> T:
    """transformers `*RMSNorm.forward` (e.g. Qwen2RMSNorm): x.to(fp32); x * rsqrt(x.pow(2).mean(-1) + eps);
    weight * x.to(input_dtype). Swapped for Liger's (planner/memory/liger.py) where its patch rebinds the class."""
    if "rms_norm" in e.liger:
        from . import liger

        return liger.rms_norm(e, x, weight, tokens, name=name)
    x32 = cast(e, x, "fp32", name=f"{name}.fp32")
    sq = e.new(x32.numel, "fp32", name=f"{name}.pow")  # pow saves its input
    e.record(Node("pow", [x32] if x32.rg else [], [x32], []), sq)
    var = e.new(tokens, "fp32", name=f"{name}.mean")
    e.record(Node("mean", [sq] if sq.rg else [], [], []), var)
    del sq
    var_eps = e.new(tokens, "fp32", name=f"{name}.add_eps")
    e.record(Node("add", [var] if var.rg else [], [], []), var_eps)
    r = e.new(tokens, "fp32", name=f"{name}.rsqrt")
    e.record(Node("rsqrt", [var_eps] if var_eps.rg else [], [r], []), r)  # rsqrt saves its result
    del var_eps
    normed = mul(e, x32, r, name=f"{name}.normed")
    del x32, r
    back = cast(e, normed, x.dtype, name=f"{name}.normed_cast")
    out = mul_param(e, weight, back, name=name)
    del back, normed, var  # `variance` and the fp32 `hidden_states` are locals until forward returns
    return out


def gemma_rms_norm(e: Engine, x: T, weight: Param, rows: int, name: str = "") -> T:
    """Gemma2RMSNorm.forward / Gemma3RMSNorm.forward (models/gemma2/modeling_gemma2.py,
    models/gemma3/modeling_gemma3.py, the same code): `output = self._norm(x.float())` (x * rsqrt(x.pow(2).mean(-1) +
    eps), all fp32), then `output * (1.0 + self.weight.float())` in fp32 and `.type_as(x)`. Unlike `rms_norm`, the
    variance is a temporary of `_norm` and the weight multiplies before the cast back. Swapped for Liger's
    `LigerRMSNormForGemma3` / Gemma 2's (offset 1, gemma casting, not in place; planner/memory/liger.py) where its
    patch rebinds the class."""
    if "rms_norm" in e.liger:
        from . import liger

        return liger.rms_norm(e, x, weight, rows, name=name, in_place=False)
    x32 = cast(e, x, "fp32", name=f"{name}.fp32")
    sq = e.new(x32.numel, "fp32", name=f"{name}.pow")
    e.record(Node("pow", [x32] if x32.rg else [], [x32], []), sq)
    var = e.new(rows, "fp32", name=f"{name}.mean")
    e.record(Node("mean", [sq] if sq.rg else [], [], []), var)
    del sq
    var_eps = e.new(rows, "fp32", name=f"{name}.add_eps")
    e.record(Node("add", [var] if var.rg else [], [], []), var_eps)
    del var
    r = e.new(rows, "fp32", name=f"{name}.rsqrt")
    e.record(Node("rsqrt", [var_eps] if var_eps.rg else [], [r], []), r)
    del var_eps
    normed = mul(e, x32, r, name=f"{name}.normed")
    del x32, r  # `_norm`'s argument dies when it returns
    # `1.0 + self.weight.float()`: .float() copies a half-precision weight (no copy for an fp32 one); the gradient
    # reaches a trainable weight through that copy or straight from the add
    if weight.dtype != "fp32":
        w32 = e.new(weight.numel, "fp32", name=f"{name}.weight_fp32")
        e.record(Node("to_copy", [], [], [weight] if weight.trainable else []), w32)
        one_plus = e.new(weight.numel, "fp32", name=f"{name}.one_plus_weight")
        e.record(Node("add_scalar", [w32] if w32.rg else [], [], []), one_plus)
        del w32
    else:
        one_plus = e.new(weight.numel, "fp32", name=f"{name}.one_plus_weight")
        e.record(Node("add_scalar", [], [], [weight] if weight.trainable else []), one_plus)
    out = mul(e, normed, one_plus, name=f"{name}.scaled")
    del normed, one_plus
    return cast(e, out, x.dtype, name=name)


def layer_norm(e: Engine, x: T, weight: Param, bias: Param, tokens: int, name: str = "") -> T:
    """nn.LayerNorm: under CUDA autocast layer_norm runs in fp32 (input cast to fp32, fp32 output); it saves its
    input, mean and rstd ((tokens, 1) fp32 each) and the weight. Swapped for Liger's (planner/memory/liger.py) where
    its patch rebinds the class."""
    if "layer_norm" in e.liger:
        from . import liger

        return liger.layer_norm(e, x, weight, bias, tokens, name=name)
    xin = cast(e, x, "fp32", name=f"{name}.fp32") if e.autocast else x
    # autocast casts the weight and bias as well: a fresh fp32 copy of half-precision (frozen) ones, which
    # native_layer_norm saves with the input when the input needs a gradient
    w = cast(e, weight.tensor, "fp32", name=f"{name}.weight_fp32") if e.autocast else weight.tensor
    b = cast(e, bias.tensor, "fp32", name=f"{name}.bias_fp32") if e.autocast else bias.tensor
    mean = e.new(tokens, "fp32", name=f"{name}.mean")
    rstd = e.new(tokens, "fp32", name=f"{name}.rstd")
    out = e.new(x.numel, xin.dtype if e.autocast is None else "fp32", name=name)
    params = [p for p in (weight, bias) if p.trainable]
    casts = [t for t, p in ((w, weight), (b, bias)) if t is not p.tensor]
    saved = [xin, mean, rstd] + casts if (xin.rg or params) else []
    e.record(Node("layer_norm", [xin] if xin.rg else [], saved, params), out)
    del mean, rstd, xin, w, b, casts
    return out


# Attention ----------------------------------------------------------------------------------------------------------


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _sdpa_kernel(e: Engine, q: T, heads: int, tokens: int, calls: int, masked: bool) -> tuple[str, int]:
    """The backend torch picks for this call on the simulated GPU (sdpa.py, the table the tracer also reads) and the
    head dim."""
    head_dim = q.numel // (calls * heads * tokens)
    backend = sdpa_backend(e.gpu_name, q.dtype, head_dim, masked)
    if backend == MATH:
        raise VlplanError(f"torch's SDPA would run its math kernel for {q.dtype} attention with head dim {head_dim} "
                          f"on {e.gpu_name or 'this GPU'} (no fused kernel takes it: planner/memory/sdpa.py), which "
                          "vlplan does not model; use --attn eager, or a precision the GPU's kernels take")
    return backend, head_dim


def _lse_numel(backend: str, heads: int, tokens: int, seq: int) -> int:
    """The fp32 logsumexp the kernel saves: (batch, heads, seq) for cuDNN (a trailing 1) and FlashAttention-2
    (flash_api.cpp `softmax_lse`); memory-efficient attention pads seq to kAlignLSE = 32
    (attention.cu `_efficient_attention_forward`: `ceil_div(M, kAlignLSE) * kAlignLSE`)."""
    if backend == EFFICIENT:
        return heads * (tokens // seq) * _round_up(seq, 32)
    return heads * tokens


def _backward_workspace(backend: str, q: T, k: T, heads: int, tokens: int, seq: int, head_dim: int) -> int:
    """Bytes the attention backward allocates besides dq, dk, dv, alive until they are all made:
    - cuDNN (and memory-efficient attention, whose CUTLASS workspace depends on the kernel's tile shapes: modelled
      with cuDNN's layout, a stated approximation): a fp32 dQ accumulator and a fp32 softmax row sum,
      b*h*s*d*4 + b*h*s*4 bytes.
    - FlashAttention-2 (flash_api.cpp `mha_bwd`): `softmax_d` fp32 (batch, heads, seq rounded to 128) and `dq_accum`
      fp32 (batch, seq rounded to 128, heads, head dim rounded to 32, or 64 above 128); with grouped-query
      attention dk and dv per query head, (batch, seq_k, heads, head dim) each in the input dtype, before the sum
      over each group."""
    if backend != FLASH:
        return q.numel * 4 + heads * tokens * 4
    batch = tokens // seq
    seq_rounded = _round_up(seq, 128)
    dim_rounded = _round_up(head_dim, 32 if head_dim <= 128 else 64)
    workspace = batch * heads * seq_rounded * 4 + batch * seq_rounded * heads * dim_rounded * 4
    kv_heads = k.numel // (tokens * head_dim)
    if kv_heads != heads:
        workspace += 2 * batch * seq * heads * head_dim * DTYPE_BYTES[k.dtype]
    return workspace


def fused_attention(e: Engine, q: T, k: T, v: T, heads: int, tokens: int, name: str = "", calls: int = 1,
                    seq: int | None = None) -> T:
    """torch CUDA SDPA fused kernel without a mask, the one the GPU runs (sdpa.py: cuDNN on Hopper,
    FlashAttention-2 on other sm80+ GPUs, memory-efficient attention before sm80): saves q, k, v, the output and an
    fp32 logsumexp (`_lse_numel`); its backward allocates the kernel's workspace (`_backward_workspace`). `seq` is
    the length of each sequence of the `tokens` (default: one sequence), for the kernels' rounding.

    `calls` > 1: that many back-to-back calls on equal slices of q, k, v that need no gradient (a frozen vision
    tower's images or windows). Each call's output is kept and its logsumexp dropped at once, so the memory is the
    outputs as `calls` blocks plus one transient logsumexp: exactly the sequence of separate calls at its maximum."""
    inputs = [t for t in (q, k, v) if t.rg]
    if inputs and calls > 1:
        raise ValueError("grouped attention calls are for inputs without gradient")
    seq = tokens if seq is None else seq
    backend, head_dim = _sdpa_kernel(e, q, heads, tokens, calls, masked=False)
    out = e.new(q.numel, q.dtype, name=name, blocks=calls)
    lse = e.new(_lse_numel(backend, heads, tokens, seq), "fp32", name=f"{name}.lse")
    # without inputs that need a gradient no node is recorded, so no backward and no workspace (grouped calls)
    node = Node("sdpa", inputs, [q, k, v, out, lse] if inputs else [], [],
                workspace=_backward_workspace(backend, q, k, heads, tokens, seq, head_dim) if inputs else 0)
    e.record(node, out)
    del lse
    return out


def masked_fused_attention(e: Engine, q: T, k: T, v: T, mask: T, heads: int, tokens: int, name: str = "",
                           seq: int | None = None) -> T:
    """torch CUDA SDPA with an additive float mask (Mllama's aspect-ratio and cross-attention masks, Pixtral's block
    mask): FlashAttention takes no mask, so cuDNN attention runs on Hopper (first in the priority order, accepting
    masks: sdp_utils.cpp `can_use_cudnn_attention`) and memory-efficient attention elsewhere (sdpa.py; the tracer's
    profiler/emulate.py `_masked_sdpa`). q, k and v come in the kernel's dtype; under autocast a mask of another
    dtype is cast to the query's (a copy per call). Its backward needs the bias (derivatives.yaml
    `_scaled_dot_product_cudnn_attention` / `_scaled_dot_product_efficient_attention` pass `attn_bias`), so the
    kernel saves q, k, v, the output, an fp32 logsumexp and the bias; the backward allocates the workspace of
    `_backward_workspace`."""
    seq = tokens if seq is None else seq
    backend, head_dim = _sdpa_kernel(e, q, heads, tokens, 1, masked=True)
    bias = cast(e, mask, q.dtype, name=f"{name}.bias") if e.autocast else mask
    out = e.new(q.numel, q.dtype, name=name)
    lse = e.new(_lse_numel(backend, heads, tokens, seq), "fp32", name=f"{name}.lse")
    inputs = [t for t in (q, k, v) if t.rg]
    node = Node("sdpa_masked", inputs, [q, k, v, out, lse, bias] if inputs else [], [],
                workspace=_backward_workspace(backend, q, k, heads, tokens, seq, head_dim))
    e.record(node, out)
    del lse, bias
    return out


def eager_attention(e: Engine, q: T, k: T, v: T, heads: int, kv_heads: int, q_len: int, k_len: int, batch: int,
                    causal_mask: T | None, name: str = "") -> T:
    """transformers `eager_attention_forward`: repeat_kv, q @ k^T * scaling (+ mask), softmax in fp32, cast back,
    @ v, then transpose(1, 2).contiguous()."""
    groups = heads // kv_heads
    if groups > 1:
        k = _copy(e, k, k.numel * groups, f"{name}.k_rep")
        v = _copy(e, v, v.numel * groups, f"{name}.v_rep")
    scores_numel = batch * heads * q_len * k_len
    scores = e.new(scores_numel, q.dtype, name=f"{name}.scores")
    e.record(Node("matmul", [t for t in (q, k) if t.rg], [q, k] if (q.rg or k.rg) else [], []), scores)
    scaled = scale(e, scores, name=f"{name}.scaled")
    del scores
    if causal_mask is not None:
        masked = add(e, scaled, causal_mask, name=f"{name}.masked")
        del scaled
        scaled = masked
    # softmax(dtype=float32) casts its input first (a transient fp32 copy), then saves its result
    scaled32 = cast(e, scaled, "fp32", name=f"{name}.scores_fp32")
    probs = e.new(scores_numel, "fp32", name=f"{name}.softmax")
    e.record(Node("softmax", [scaled32] if scaled32.rg else [], [probs], []), probs)
    del scaled, scaled32
    probs_cast = cast(e, probs, q.dtype, name=f"{name}.probs")
    del probs
    out = e.new(q.numel, q.dtype, name=f"{name}.pv")
    e.record(Node("matmul", [t for t in (probs_cast, v) if t.rg], [probs_cast, v] if (probs_cast.rg or v.rg) else [],
                  []), out)
    del probs_cast
    contiguous = e.new(out.numel, out.dtype, name=name)
    e.record(Node("contiguous", [out] if out.rg else [], [], []), contiguous)
    return contiguous


def _copy(e: Engine, x: T, numel: int, name: str) -> T:
    out = e.new(numel, x.dtype, name=name)
    e.record(Node("copy", [x] if x.rg else [], [], []), out)
    return out


def rope(e: Engine, x: T, cos: T, sin: T, name: str = "") -> T:
    """apply_rotary_pos_emb: x * cos + rotate_half(x) * sin. cos/sin need no gradient, so the muls save only them
    (shared buffers); rotate_half's cat and the products are temporaries."""
    a = mul(e, x, cos, name=f"{name}.xcos")
    neg = _copy(e, x, x.numel // 2, f"{name}.neg")  # rotate_half: torch.cat((-x2, x1), dim=-1)
    rot = _copy(e, neg, x.numel, f"{name}.rotate_half")
    del neg
    b = mul(e, rot, sin, name=f"{name}.rotsin")
    del rot
    out = add(e, a, b, name=name)
    del a, b
    return out
