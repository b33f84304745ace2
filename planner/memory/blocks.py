"""The modeling code of each family, re-executed on symbolic tensors (see sim.py).

Each function below mirrors one transformers class's `forward` line by line (named in its docstring), so the
activations it leaves saved for backward and the temporaries it frees are those of the real code. Variable lifetimes
matter: a symbolic tensor is freed when its last Python reference dies, as in the modeling code.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..modules import LANGUAGE
from ..setup import Train, TrainSetup
from . import ops
from .sim import Engine, Param, T
from .stacks import upcasts_trainable


@dataclass
class LinearParams:
    weight: Param
    out_features: int
    bias: Param | None = None
    lora_a: Param | None = None
    lora_b: Param | None = None
    rank: int = 0
    in_features: int = 0
    quant_bits: int | None = None  # QLoRA: the frozen base weight is a bitsandbytes 4/8-bit weight
    magnitude: Param | None = None  # DoRA magnitude vector (out_features)
    dropout: bool = False  # peft lora_dropout > 0: nn.Dropout on the adapter path's input (else nn.Identity)
    oft_r: Param | None = None  # OFT: the (blocks, block_size * (block_size - 1) / 2) skew-symmetric parameters
    oft_block_size: int = 0

    @property
    def tensors(self) -> list[Param]:
        """The layer's parameters a module walk finds (decides, e.g., whether a layer holds trainable ones): weight,
        bias and the LoRA or OFT adapter matrices."""
        return [q for q in (self.weight, self.bias, self.lora_a, self.lora_b, self.oft_r) if q is not None]


class Params:
    """Creates the model's parameters on the engine with the dtypes training gives them (LLaMA-Factory adapter.py:
    frozen weights in the compute dtype, trainable ones upcast to fp32 unless pure bf16)."""

    def __init__(self, e: Engine, setup: TrainSetup) -> None:
        self.e, self.setup = e, setup
        self.compute = {"bf16": "bf16", "pure-bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[setup.precision]
        self.trainable_dtype = "bf16" if setup.precision == "pure-bf16" else "fp32"
        if not upcasts_trainable(setup):  # a plain HF Trainer: trainable parameters stay as loaded
            self.trainable_dtype = self.compute
        self.adapter_dtype = "fp32"
        self.quant_state: list[Param] = []
        if setup.zero:
            # DeepSpeed (bf16/fp16 config) casts the whole module, adapters included, to the half dtype and keeps
            # the fp32 master copy in its optimizer (runtime/engine.py `_configure_distributed_model`)
            self.trainable_dtype = self.adapter_dtype = self.compute
    def _dtype(self, trainable: bool) -> str:
        return self.trainable_dtype if trainable else self.compute

    def full(self, component: str, layer_trainable: bool = True) -> bool:
        return self.setup.trains[component] is Train.FULL and layer_trainable

    def vector(self, component: str, name: str, numel: int, layer_trainable: bool = True,
               shape: tuple[int, ...] | None = None) -> Param:
        trainable = self.full(component, layer_trainable)
        return self.e.param(name, numel, self._dtype(trainable), trainable, component, shape=shape)

    def linear(self, component: str, name: str, in_features: int, out_features: int, bias: bool,
               layer_trainable: bool = True) -> LinearParams:
        trainable = self.full(component, layer_trainable)
        bits = self.setup.quant_bits if (self.setup.method == "qlora" and component == LANGUAGE) else None
        if bits:
            w = self._quantized(component, name, in_features, out_features, bits)
        else:
            w = self.e.param(f"{name}.weight", in_features * out_features, self._dtype(trainable), trainable,
                             component, shape=(out_features, in_features))
        b = self.e.param(f"{name}.bias", out_features, self._dtype(trainable), trainable, component) if bias else None
        lp = LinearParams(w, out_features, b, in_features=in_features, quant_bits=bits)
        if self.setup.trains[component] is Train.LORA and self.lora_targets(name) and self.setup.method == "oft":
            # peft OFTLayer.update_layer: one OFTRotationModule per linear, weight (r, b(b-1)/2) zero-initialised,
            # created in fp32 like LoRA's (get_peft_model autocast_adapter_dtype=True)
            blocks, size = self.setup.oft.blocks(in_features)
            lp.oft_r = self.e.param(f"{name}.oft_R", blocks * (size * (size - 1) // 2), self.adapter_dtype, True,
                                    component, kind="adapters", shape=(blocks, size * (size - 1) // 2))
            lp.oft_block_size = size
            # the module's non-persistent `rows` and `cols` buffers: the two rows of one int64
            # `torch.triu_indices(b, b, 1)`, so one storage of 2 x b(b-1)/2
            self.e.param(f"{name}.oft_R.triu_indices", size * (size - 1), "int64", False, component, kind="adapters")
        elif self.setup.trains[component] is Train.LORA and self.lora_targets(name):
            # peft creates adapters in fp32 (get_peft_model autocast_adapter_dtype=True), pure bf16 included
            rank = self.setup.lora.rank
            dtype = self.adapter_dtype
            lp.lora_a = self.e.param(f"{name}.lora_A", rank * in_features, dtype, True, component, kind="adapters",
                                     shape=(rank, in_features))
            lp.lora_b = self.e.param(f"{name}.lora_B", out_features * rank, dtype, True, component, kind="adapters",
                                     shape=(out_features, rank))
            lp.rank = rank
            # DPO / KTO: the trainer sets every nn.Dropout's p to 0 (trl disable_dropout_in_model), F.dropout with p 0
            # returns its input (ATen Dropout.cpp `_dropout_impl`): as no dropout
            lp.dropout = self.setup.lora.dropout > 0 and not self.setup.preference
            if self.setup.lora.dora:
                lp.magnitude = self.e.param(f"{name}.lora_magnitude_vector", out_features, dtype, True, component,
                                            kind="adapters")
        return lp

    def _quantized(self, component: str, name: str, in_features: int, out_features: int, bits: int) -> Param:
        """A bitsandbytes quantized weight (LLaMA-Factory: NF4 with double quantization, or int8).

        4-bit (bitsandbytes functional.quantize_4bit, Params4bit): packed uint8 of numel/2 bytes; absmax per 64
        weights, itself quantized to uint8 with an fp32 absmax per 256 blocks (double quantization); a 16-entry fp32
        NF4 code and a 256-entry fp32 code for the nested absmax. 8-bit (Int8Params): int8 weight plus an fp32 scale
        per output row (SCB).
        """
        numel = in_features * out_features
        e = self.e
        if bits == 4:
            w = e.param(f"{name}.weight", numel // 2, "uint8", False, component)
            blocks = -(-numel // 64)
            self.quant_state.append(e.param(f"{name}.absmax", blocks, "uint8", False, component))
            self.quant_state.append(e.param(f"{name}.nested_absmax", -(-blocks // 256), "fp32", False, component))
            self.quant_state.append(e.param(f"{name}.code", 16, "fp32", False, component))
            self.quant_state.append(e.param(f"{name}.nested_code", 256, "fp32", False, component))
        else:
            w = e.param(f"{name}.weight", numel, "uint8", False, component)
            self.quant_state.append(e.param(f"{name}.SCB", out_features, "fp32", False, component))
        return w

    def lora_targets(self, name: str) -> bool:
        targets = self.setup.lora.targets
        return "all" in targets or name.rsplit(".", 1)[-1] in targets


def apply_linear(e: Engine, x: T, lp: LinearParams, name: str = "") -> T:
    if e.adapters_disabled and lp.lora_a is not None:
        # peft `disable_adapter()` (DPO's reference forward): LoRA / DoRA layers return `self.base_layer(x)`
        # (tuners/lora/layer.py `Linear.forward`, tuners/lora/bnb.py `Linear4bit.forward`: `if self.disable_adapters`)
        if lp.quant_bits:
            return ops.quant_linear(e, x, lp.weight, lp.in_features, lp.out_features, lp.quant_bits, name=name)
        return ops.linear(e, x, lp.weight, lp.out_features, lp.bias, name=name)
    if lp.quant_bits:
        if lp.lora_a is None:
            return ops.quant_linear(e, x, lp.weight, lp.in_features, lp.out_features, lp.quant_bits, name=name)
        return ops.qlora_linear(e, x, lp.weight, lp.lora_a, lp.lora_b, lp.in_features, lp.out_features, lp.rank,
                                lp.quant_bits, name=name, dropout=lp.dropout)
    if lp.oft_r is not None:
        return ops.oft_linear(e, x, lp.weight, lp.oft_r, lp.in_features, lp.out_features, lp.oft_block_size, lp.bias,
                              name=name)
    if lp.magnitude is not None:
        return ops.dora_linear(e, x, lp.weight, lp.lora_a, lp.lora_b, lp.magnitude, lp.out_features, lp.rank, lp.bias,
                               name=name, dropout=lp.dropout)
    if lp.lora_a is not None:
        return ops.lora_linear(e, x, lp.weight, lp.lora_a, lp.lora_b, lp.out_features, lp.rank, lp.bias, name=name,
                               dropout=lp.dropout)
    return ops.linear(e, x, lp.weight, lp.out_features, lp.bias, name=name)


def gated_mlp(e: Engine, h: T, gate: LinearParams, up: LinearParams, down: LinearParams, act: str = "silu") -> T:
    """`down_proj(act_fn(gate_proj(x)) * up_proj(x))`: LlamaMLP, MistralMLP, Qwen2MLP, Qwen3VLTextMLP, PixtralMLP and
    MllamaTextMLP (SiLU), Gemma2MLP and Gemma3MLP (gelu-tanh). The gate dies once activated; the product is a local
    until down_proj returns. Liger's LigerSwiGLUMLP (SiLU) runs one fused Function on the two projections
    (planner/memory/liger.py `gated_product`)."""
    kind = {"silu": "swiglu", "gelu_tanh": "geglu"}.get(act)
    if kind in e.liger:  # LigerSwiGLUMLP / LigerGEGLUMLP: one fused Function on the two projections
        from . import liger

        g = apply_linear(e, h, gate, "gate_proj")
        u = apply_linear(e, h, up, "up_proj")
        prod = liger.gated_product(e, g, u, kind, name="act*up")
        del g, u
        return apply_linear(e, prod, down, "down_proj")
    g = apply_linear(e, h, gate, "gate_proj")
    a = ops.unary(e, act, g, name="act")
    del g
    u = apply_linear(e, h, up, "up_proj")
    prod = ops.mul(e, a, u, name="act*up")
    del a, u
    return apply_linear(e, prod, down, "down_proj")


# Language model -----------------------------------------------------------------------------------------------------


class TextDecoderLayer:
    """The decoder layer every modelled language model shares, its options set per family (class attributes):

        input_layernorm -> self_attn (q/k/v_proj, [q_norm/k_norm], RoPE, attention, o_proj) -> [post_attention_layernorm]
        -> residual -> pre-MLP norm -> mlp -> [post_feedforward_layernorm] -> residual

    The defaults are Qwen2DecoderLayer / LlamaDecoderLayer / MistralDecoderLayer (transformers 5.23
    models/{qwen2,llama,mistral}/modeling_*.py; also the Qwen2-VL/2.5-VL text layers). The options, each mirroring
    where a family's modeling code differs (the order of operations and of frees is the code's, so the activations
    left saved for backward and the temporaries freed are those of the real forward):

    - `norm`: "rms" (LlamaRMSNorm: weight * normed in the input dtype) or "gemma" (Gemma RMSNorm: (1 + weight),
      computed in fp32).
    - `qk_norm`: None; "projection" (Qwen3: `q_norm(q_proj(x))`, `k_norm(k_proj(x))`, then v_proj); "attention"
      (Gemma 3: q/k/v_proj, then q_norm, k_norm). RMSNorm over head_dim.
    - `rope_frees`: "each" (the un-rotated q dies once q is rotated, then k) or "both" (both die after
      `apply_rotary_pos_emb` returns both).
    - `sandwich`: Gemma 2/3's post_attention_layernorm on the attention output and post_feedforward_layernorm on the
      MLP output, before each residual add; the pre-MLP norm is then `pre_feedforward_layernorm`.
    - `attn_prefix` / `mlp_prefix`: the module path of the projections ("self_attn." / "mlp." where the family's
      parameter names say so; LoRA matches only the last name component).
    - `norms_first`: the four sandwich norms are created before the projections (Gemma), else the layer's order.
    - `act`: the gated MLP's activation (SiLU; gelu-tanh for Gemma); `make_mlp` for another MLP (Qwen3 MoE).
    - `sliding window`: a property of the attention the context hands in (the layer's mask), not of the layer.
    - attention weights: a context whose attention returns `(out, weights)` (`attention_weights = True`) keeps the
      weights alive until the layer returns (`hidden_states, _ = self.self_attn(...)`).
    - `inputs_die_before_o_proj`: the rotated q/k and v are dropped before o_proj allocates (the trace-validated
      Llama/Qwen2 layer; it matters only where the kernel saved none of them, i.e. frozen layers), else they live
      until the attention forward returns.
    - `o_proj_bias`: o_proj has a bias when q/k/v have one (Gemma: `attention_bias` for all four), else never (Qwen2).
    Cross-attention layers (Mllama) are their own class (families/mllama/memory.py).
    """

    norm = "rms"
    qk_norm: str | None = None
    rope_frees = "each"
    sandwich = False
    attn_prefix = ""
    mlp_prefix = ""
    norms_first = False
    act = "silu"
    attention_weights = False
    inputs_die_before_o_proj = True
    o_proj_bias = False

    def __init__(self, p: Params, index: int, trainable: bool = True) -> None:
        t = p.setup.model.text
        self.t = t
        prefix = f"language.layers.{index}"
        h, q_out, kv_out = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        names = ("input_layernorm", "post_attention_layernorm") + (
            ("pre_feedforward_layernorm", "post_feedforward_layernorm") if self.sandwich else ())
        self.norms = {}
        if self.norms_first:
            self.norms = {name: p.vector(LANGUAGE, f"{prefix}.{name}", h, trainable) for name in names}
        else:
            self.norms["input_layernorm"] = p.vector(LANGUAGE, f"{prefix}.input_layernorm", h, trainable)
        a = f"{prefix}.{self.attn_prefix}"
        self.q = p.linear(LANGUAGE, f"{a}q_proj", h, q_out, t.qkv_bias, trainable)
        self.k = p.linear(LANGUAGE, f"{a}k_proj", h, kv_out, t.qkv_bias, trainable)
        self.v = p.linear(LANGUAGE, f"{a}v_proj", h, kv_out, t.qkv_bias, trainable)
        self.o = p.linear(LANGUAGE, f"{a}o_proj", q_out, h, self.o_proj_bias and t.qkv_bias, trainable)
        self.qk_norms = ()
        if self.qk_norm:
            self.qk_norms = (p.vector(LANGUAGE, f"{a}q_norm", t.head_dim, trainable),
                             p.vector(LANGUAGE, f"{a}k_norm", t.head_dim, trainable))
        if not self.norms_first:
            for name in names[1:]:
                self.norms[name] = p.vector(LANGUAGE, f"{prefix}.{name}", h, trainable)
        self.mlp = self.make_mlp(p, prefix, trainable)
        self.params = [*self.norms.values(), *self.qk_norms] + [
            q for lp in (self.q, self.k, self.v, self.o) for q in lp.tensors] + self.mlp.params

    def make_mlp(self, p: Params, prefix: str, trainable: bool) -> "GatedMlp":
        return GatedMlp(p, f"{prefix}.{self.mlp_prefix}", trainable, self.act)

    @property
    def has_trainable(self) -> bool:
        return any(q.trainable for q in self.params)

    def _norm(self, e: Engine, x: T, weight: Param, rows: int, name: str) -> T:
        if self.norm == "gemma":
            return ops.gemma_rms_norm(e, x, weight, rows, name=name)
        return ops.rms_norm(e, x, weight, rows, name=name)

    def __call__(self, e: Engine, x: T, ctx) -> T:
        tokens = ctx.tokens
        residual = x
        # `hidden_states = self.input_layernorm(hidden_states)`: the normed input lives until self_attn returns
        h = self._norm(e, x, self.norms["input_layernorm"], tokens, "input_layernorm")
        o, weights = self.self_attention(e, h, ctx)
        del h
        if self.sandwich:
            n = self._norm(e, o, self.norms["post_attention_layernorm"], tokens, "post_attention_layernorm")
            del o
            o = n
            del n
        x = ops.add(e, residual, o, name="attn_residual")
        del residual, o
        residual = x
        pre = "pre_feedforward_layernorm" if self.sandwich else "post_attention_layernorm"
        h = self._norm(e, x, self.norms[pre], tokens, pre)
        del x
        m = self.mlp(e, h, tokens)
        del h  # the MLP's argument lives until it returns
        if self.sandwich:
            n = self._norm(e, m, self.norms["post_feedforward_layernorm"], tokens, "post_feedforward_layernorm")
            del m
            m = n
            del n
        out = ops.add(e, residual, m, name="mlp_residual")
        del residual, m, weights  # the attention weights live until the layer returns
        return out

    def self_attention(self, e: Engine, h: T, ctx) -> tuple[T, T | None]:
        """The attention module's forward: (o_proj output, attention weights or None)."""
        t, tokens = self.t, ctx.tokens
        if self.qk_norm == "projection":
            qp = apply_linear(e, h, self.q, "q_proj")
            q = ops.rms_norm(e, qp, self.qk_norms[0], tokens * t.num_heads, name="q_norm")
            del qp
            kp = apply_linear(e, h, self.k, "k_proj")
            k = ops.rms_norm(e, kp, self.qk_norms[1], tokens * t.num_kv_heads, name="k_norm")
            del kp
            v = apply_linear(e, h, self.v, "v_proj")
        else:
            q = apply_linear(e, h, self.q, "q_proj")
            k = apply_linear(e, h, self.k, "k_proj")
            v = apply_linear(e, h, self.v, "v_proj")
            if self.qk_norm == "attention" and "rms_norm" in e.liger:  # on the transposed projections
                from . import liger

                in_place = self.norm != "gemma"
                q_normed = liger.rms_norm(e, q, self.qk_norms[0], tokens * t.num_heads, "q_norm", in_place, True)
                del q
                k_normed = liger.rms_norm(e, k, self.qk_norms[1], tokens * t.num_kv_heads, "k_norm", in_place, True)
                del k
                q, k = q_normed, k_normed
                del q_normed, k_normed
            elif self.qk_norm == "attention":
                q_normed = self._norm(e, q, self.qk_norms[0], tokens * t.num_heads, "q_norm")
                del q
                k_normed = self._norm(e, k, self.qk_norms[1], tokens * t.num_kv_heads, "k_norm")
                del k
                q, k = q_normed, k_normed
                del q_normed, k_normed
        if "rope" in e.liger:  # liger_rotary_pos_emb: rotates both in place (a copy after q/k_norm)
            from . import liger

            copy = self.qk_norm == "attention"
            q_rot = liger.rope(e, q, copy, name="q_rope")
            k_rot = liger.rope(e, k, copy, name="k_rope")
            del q, k
        elif self.rope_frees == "each":
            q_rot = ops.rope(e, q, ctx.cos, ctx.sin, name="q_rope")
            del q
            k_rot = ops.rope(e, k, ctx.cos, ctx.sin, name="k_rope")
            del k
        else:
            q_rot = ops.rope(e, q, ctx.cos, ctx.sin, name="q_rope")
            k_rot = ops.rope(e, k, ctx.cos, ctx.sin, name="k_rope")
            del q, k  # `query_states, key_states = apply_rotary_pos_emb(...)` returns both before the rebinding
        attn, weights = self.attention_core(e, q_rot, k_rot, v, ctx)
        if self.inputs_die_before_o_proj:
            del q_rot, k_rot, v
            o = apply_linear(e, attn, self.o, "o_proj")
            del attn
        else:
            o = apply_linear(e, attn, self.o, "o_proj")
            del attn, q_rot, k_rot, v  # locals of the attention forward until it returns
        return o, weights

    def attention_core(self, e: Engine, q: T, k: T, v: T, ctx) -> tuple[T, T | None]:
        """The context's attention (sdpa / eager / flash, with the layer's mask): (output, weights or None)."""
        out = ctx.attention(e, q, k, v, self.t.num_heads, self.t.num_kv_heads, "self_attn")
        return out if self.attention_weights else (out, None)


class GatedMlp:
    """`down_proj(act_fn(gate_proj(x)) * up_proj(x))` with the layer's gate/up/down projections (see gated_mlp)."""

    def __init__(self, p: Params, prefix: str, trainable: bool, act: str = "silu") -> None:
        t = p.setup.model.text
        h, i = t.hidden_size, t.intermediate_size
        self.act = act
        self.gate = p.linear(LANGUAGE, f"{prefix}gate_proj", h, i, False, trainable)
        self.up = p.linear(LANGUAGE, f"{prefix}up_proj", h, i, False, trainable)
        self.down = p.linear(LANGUAGE, f"{prefix}down_proj", i, h, False, trainable)
        self.params = [q for lp in (self.gate, self.up, self.down) for q in lp.tensors]

    def __call__(self, e: Engine, h: T, tokens: int) -> T:
        return gated_mlp(e, h, self.gate, self.up, self.down, self.act)


class LlamaLayer(TextDecoderLayer):
    """Qwen2DecoderLayer / LlamaDecoderLayer / MistralDecoderLayer (and the Qwen2-VL/2.5-VL text layers): the
    shared layer's defaults."""


@dataclass
class Context:
    """Per-sequence state shared by the layers of one stack (token count, RoPE tables, attention kind)."""

    tokens: int
    cos: T | None = None
    sin: T | None = None
    attention: object = None
