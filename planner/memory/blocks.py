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
        if self.setup.trains[component] is Train.LORA and self.lora_targets(name):
            # peft creates adapters in fp32 (get_peft_model autocast_adapter_dtype=True), pure bf16 included
            rank = self.setup.lora.rank
            dtype = self.adapter_dtype
            lp.lora_a = self.e.param(f"{name}.lora_A", rank * in_features, dtype, True, component, kind="adapters",
                                     shape=(rank, in_features))
            lp.lora_b = self.e.param(f"{name}.lora_B", out_features * rank, dtype, True, component, kind="adapters",
                                     shape=(out_features, rank))
            lp.rank = rank
            lp.dropout = self.setup.lora.dropout > 0
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
    if lp.quant_bits:
        if lp.lora_a is None:
            return ops.quant_linear(e, x, lp.weight, lp.in_features, lp.out_features, lp.quant_bits, name=name)
        return ops.qlora_linear(e, x, lp.weight, lp.lora_a, lp.lora_b, lp.in_features, lp.out_features, lp.rank,
                                lp.quant_bits, name=name, dropout=lp.dropout)
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
    until down_proj returns."""
    g = apply_linear(e, h, gate, "gate_proj")
    a = ops.unary(e, act, g, name="act")
    del g
    u = apply_linear(e, h, up, "up_proj")
    prod = ops.mul(e, a, u, name="act*up")
    del a, u
    return apply_linear(e, prod, down, "down_proj")


# Language model -----------------------------------------------------------------------------------------------------


class LlamaLayer:
    """Qwen2DecoderLayer / LlamaDecoderLayer / MistralDecoderLayer (and the Qwen2-VL/2.5-VL text layers):
    input_layernorm -> self_attn (q/k/v_proj, RoPE, attention, o_proj) -> residual -> post_attention_layernorm ->
    mlp down_proj(act(gate_proj(x)) * up_proj(x)) -> residual."""

    def __init__(self, p: Params, index: int, trainable: bool = True) -> None:
        t = p.setup.model.text
        self.t = t
        prefix = f"language.layers.{index}"
        q_out, kv_out = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        self.norm1 = p.vector(LANGUAGE, f"{prefix}.input_layernorm", t.hidden_size, trainable)
        self.q = p.linear(LANGUAGE, f"{prefix}.q_proj", t.hidden_size, q_out, t.qkv_bias, trainable)
        self.k = p.linear(LANGUAGE, f"{prefix}.k_proj", t.hidden_size, kv_out, t.qkv_bias, trainable)
        self.v = p.linear(LANGUAGE, f"{prefix}.v_proj", t.hidden_size, kv_out, t.qkv_bias, trainable)
        self.o = p.linear(LANGUAGE, f"{prefix}.o_proj", q_out, t.hidden_size, False, trainable)
        self.norm2 = p.vector(LANGUAGE, f"{prefix}.post_attention_layernorm", t.hidden_size, trainable)
        self.gate = p.linear(LANGUAGE, f"{prefix}.gate_proj", t.hidden_size, t.intermediate_size, False, trainable)
        self.up = p.linear(LANGUAGE, f"{prefix}.up_proj", t.hidden_size, t.intermediate_size, False, trainable)
        self.down = p.linear(LANGUAGE, f"{prefix}.down_proj", t.intermediate_size, t.hidden_size, False, trainable)
        self.params = [x for x in (self.norm1, self.norm2) ] + [
            q for lp in (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
            for q in (lp.weight, lp.bias, lp.lora_a, lp.lora_b) if q is not None]

    @property
    def has_trainable(self) -> bool:
        return any(q.trainable for q in self.params)

    def __call__(self, e: Engine, x: T, ctx: "Context") -> T:
        t = self.t
        tokens = ctx.tokens
        residual = x
        # `hidden_states = self.input_layernorm(hidden_states)`: the normed input lives until self_attn returns
        h = ops.rms_norm(e, x, self.norm1, tokens, name="input_layernorm")
        q = apply_linear(e, h, self.q, "q_proj")
        k = apply_linear(e, h, self.k, "k_proj")
        v = apply_linear(e, h, self.v, "v_proj")
        q_rot = ops.rope(e, q, ctx.cos, ctx.sin, name="q_rope")
        del q
        k_rot = ops.rope(e, k, ctx.cos, ctx.sin, name="k_rope")
        del k
        attn = ctx.attention(e, q_rot, k_rot, v, t.num_heads, t.num_kv_heads, "self_attn")
        del q_rot, k_rot, v
        o = apply_linear(e, attn, self.o, "o_proj")
        del attn, h
        x = ops.add(e, residual, o, name="attn_residual")
        del residual, o
        residual = x
        h = ops.rms_norm(e, x, self.norm2, tokens, name="post_attention_layernorm")
        del x
        down = gated_mlp(e, h, self.gate, self.up, self.down)
        del h  # the mlp's argument lives until mlp returns
        out = ops.add(e, residual, down, name="mlp_residual")
        return out


@dataclass
class Context:
    """Per-sequence state shared by the layers of one stack (token count, RoPE tables, attention kind)."""

    tokens: int
    cos: T | None = None
    sin: T | None = None
    attention: object = None
