"""TrainSetup: everything that decides the memory of a training step, resolved and validated once.

One `TrainSetup` flows through every stage (estimate, plan, trace, profile, run, tables). It is built by
`make_setup` from CLI flags, a LLaMA-Factory YAML or a plan, which applies the method presets and LLaMA-Factory's
defaults; `TrainSetup.__post_init__` rejects contradictory or impossible combinations with a message that says
what to change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Literal, get_args

from .errors import VlplanError
from .hardware import GPU, MAX_GPU_MEMORY_GIB, find_gpu
from .modules import LANGUAGE, PROJECTOR, VISION, model_inventory
from .spec import ModelSpec
from .tokens import LF_IMAGE_MAX_PIXELS, LF_IMAGE_MIN_PIXELS, ImageTokens, image_tokens
from .video import Video, VideoTokens, check_video_family, video_tokens

# LLaMA-Factory video defaults (src/llamafactory/hparams/model_args.py, ProcessorArguments; video_maxlen was 64 up to
# v0.9.1)
LF_VIDEO_MAX_PIXELS = 256 * 256
LF_VIDEO_MIN_PIXELS = 16 * 16
LF_VIDEO_FPS = 2.0
LF_VIDEO_MAXLEN = 128


class Train(str, Enum):
    """How one component trains."""

    FULL = "full"
    LORA = "lora"
    FROZEN = "frozen"


# The choices of TrainSetup's string fields: a type checker reads the Literal, `__post_init__` refuses anything else
# with one line naming the flag and the choices.
Method = Literal["full", "freeze", "lora", "qlora", "oft"]
Precision = Literal["bf16", "fp16", "fp32", "pure-bf16"]
# adamw: torch AdamW(fused=True) = HF optim "adamw_torch_fused", the Trainer default with torch >= 2.8
Optimizer = Literal["adamw", "adamw-foreach", "adamw-8bit", "paged-adamw-8bit", "sgd", "adafactor"]
Attention = Literal["sdpa", "fa2", "eager"]
Offload = Literal["none", "optimizer", "all"]
# How the model states are sharded over the GPUs: DeepSpeed ZeRO (`zero` 0-3) or PyTorch FSDP2 (`fully_shard`,
# launched by accelerate) with one of the FSDP strategies (planner/memory/fsdp.py)
Sharding = Literal["zero", "fsdp"]
FsdpStrategy = Literal["full_shard", "shard_grad_op", "hybrid_shard", "no_shard"]
# The training stack that prepares the model (the order of checkpointing and adapters, which layers are checkpointed,
# which inputs are made to require grad): `vlplan` is `vlplan run`'s own, `llamafactory` is LLaMA-Factory's loader
# (patch_model -> init_adapter), `hf-trainer` a plain transformers Trainer with gradient_checkpointing=True.
Stack = Literal["vlplan", "llamafactory", "hf-trainer"]
# The training stage: supervised fine-tuning, or LLaMA-Factory's preference stage `dpo` (CustomDPOTrainer,
# llamafactory/train/dpo/trainer.py) with its `pref_loss`: "sigmoid" (DPO, a reference model's forward), "orpo" and
# "simpo" (no reference model: FinetuningArguments.use_ref_model = stage == "dpo" and pref_loss not in orpo/simpo),
# or `kto` (CustomKTOTrainer, llamafactory/train/kto/trainer.py: one desirable or undesirable completion per sample,
# the KL rows of mismatched completions, always a reference model; it does not read pref_loss).
# LF's other preference losses (hinge, ipo, kto_pair) and the `rm` and `ppo` stages are not modelled.
Stage = Literal["sft", "dpo", "kto"]
PrefLoss = Literal["sigmoid", "orpo", "simpo"]
# The families whose KTO step is held to a trace (tests/test_accuracy_preference.py): their batches carry no key
# that CustomKTOTrainer.forward drops
KTO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava")
METHODS: tuple[str, ...] = get_args(Method)
PRECISIONS: tuple[str, ...] = get_args(Precision)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
OFFLOADS: tuple[str, ...] = get_args(Offload)
STACKS: tuple[str, ...] = get_args(Stack)
STAGES: tuple[str, ...] = get_args(Stage)
PREF_LOSSES: tuple[str, ...] = get_args(PrefLoss)
SHARDINGS: tuple[str, ...] = get_args(Sharding)
FSDP_STRATEGIES: tuple[str, ...] = get_args(FsdpStrategy)
# Our optimizer names -> transformers TrainingArguments.optim (the runner's Trainer, the profiler's optimizer, the
# exported LLaMA-Factory YAML and TrainingArguments)
HF_OPTIM: dict[str, str] = {"adamw": "adamw_torch_fused", "adamw-foreach": "adamw_torch",
                            "adamw-8bit": "adamw_bnb_8bit", "paged-adamw-8bit": "paged_adamw_8bit", "sgd": "sgd",
                            "adafactor": "adafactor"}

# Upper bounds on sizes. They are there so that a typo (a few extra zeros) is refused at once with the bound named,
# instead of an estimate that runs for minutes or runs out of memory (`--batch-size 1000000` took 58 s, `--images
# 1000000000` ended in MemoryError). Each is far above any real fine-tune. The estimate's time grows with the images
# per micro-batch (the vision encoder is simulated per image), not with seq_len or batch_size alone; at the bounds it
# stays under 2 s (measured on 2 busy CPU cores: qwen2.5-vl-7b at seq 2**24 with 16384 768x768 images per
# micro-batch 1.1-1.5 s, batch 2**20 without images 0.07 s; llava, mllama, internvl3, gemma-3 at most 0.12 s).
MAX_SEQ_LEN = 2**24  # 16,777,216 tokens: 16x the longest context of today's long-context releases (1M tokens)
MAX_BATCH_SIZE = 2**20  # micro-batch per GPU (plan's largest global batch, MAX_GLOBAL_BATCH_SIZE)
MAX_IMAGES_PER_SAMPLE = 4096
MAX_IMAGES_PER_MICRO_BATCH = 16384  # batch_size x images per sample
MAX_VIDEOS_PER_SAMPLE = 256
MAX_IMAGE_SIDE = 2**20  # px; PIL refuses images above ~179 M pixels by default (Image.MAX_IMAGE_PIXELS * 2)
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE**2  # --image-max-pixels / --image-min-pixels (a square at the cap is in bounds)
MAX_GRADIENT_ACCUMULATION_STEPS = 2**20
MAX_GPUS_PER_NODE = 1024  # a node is a box or an NVLink domain (NVL72: 72 GPUs)
MAX_NODES = 2**16


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16  # LLaMA-Factory: lora_alpha defaults to 2 * rank
    targets: tuple[str, ...] = ("all",)
    dora: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise VlplanError(f"--lora-rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            # peft scales the adapter's output by alpha / rank (LoraLayer.update_layer: scaling = lora_alpha / r):
            # 0 switches the adapter off, a negative alpha only flips the sign of B's learned update
            raise VlplanError(f"--lora-alpha must be positive (peft scales the adapter by alpha / rank), got "
                              f"{self.alpha}")
        if not self.targets:
            raise VlplanError("--lora-target is empty; use all or a comma-separated list such as q_proj,v_proj")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise VlplanError(f"--lora-dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class OftSettings:
    """Orthogonal fine-tuning (LLaMA-Factory `finetuning_type: oft`, OFTArguments; peft OFTConfig). Exactly one of
    `rank` (blocks per adapted linear) and `block_size` is non-zero, as peft's OFTConfig requires (r x oft_block_size
    == in_features). LLaMA-Factory passes only these two and `module_dropout`; coft, block_share and the Cayley-Neumann
    series (5 terms) keep peft's defaults. The adapted linears are LLaMA-Factory's `lora_target` (adapter.py
    `_setup_lora_tuning` builds OFTConfig's target_modules from it; `oft_target` is parsed but not read)."""

    rank: int = 0  # LLaMA-Factory oft_rank
    block_size: int = 32  # LLaMA-Factory oft_block_size
    # LLaMA-Factory module_dropout: peft builds MultiplicativeDropoutLayer but oft.Linear.forward never calls it
    # (peft 0.21 tuners/oft/layer.py), so it changes no memory
    module_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 0 or self.block_size < 0:
            raise VlplanError(f"--oft-rank and --oft-block-size must be 0 or positive, got {self.rank} and "
                              f"{self.block_size}")
        if (self.rank == 0) == (self.block_size == 0):
            raise VlplanError(f"OFT takes either --oft-rank or --oft-block-size, the other 0 (peft OFTConfig: r x "
                              f"oft_block_size == in_features), got {self.rank} and {self.block_size}")
        if not (isinstance(self.module_dropout, (int, float)) and 0.0 <= self.module_dropout < 1.0):
            raise VlplanError(f"--module-dropout must be in [0, 1), got {self.module_dropout}")

    def blocks(self, in_features: int) -> tuple[int, int]:
        """(blocks, block size) peft gives a linear with `in_features` inputs (`OFTLayer.update_layer`, with
        `adjust_oft_parameters` moving a size that does not divide in_features to the nearest divisor)."""
        if self.rank == 0:
            size = self.block_size
            if in_features % size or size > in_features:
                size = _adjust_oft(in_features, size)
            return in_features // size, size
        rank = self.rank
        if in_features % rank or rank > in_features:
            rank = _adjust_oft(in_features, rank)
        return rank, in_features // rank


def _adjust_oft(in_features: int, value: int) -> int:
    """peft `OFTLayer.adjust_oft_parameters`: the divisor of in_features nearest `value` (the lower one on a tie)."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


@dataclass(frozen=True)
class TrainSetup:
    model: ModelSpec
    method: Method = "lora"
    vision: Train = Train.FROZEN
    projector: Train = Train.FROZEN
    language: Train = Train.LORA
    lora: LoraSettings = field(default_factory=LoraSettings)
    oft: OftSettings = field(default_factory=OftSettings)  # method "oft"
    # method "freeze": the last N language-model layers train in full (LLaMA-Factory freeze_trainable_layers)
    freeze_trainable_layers: int = 2
    precision: Precision = "bf16"
    quant_bits: int | None = None
    optimizer: Optimizer = "adamw"
    seq_len: int = 2048
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # Image sizes (W, H) in each sample; every sample of the batch has the same images and seq_len tokens
    images: tuple[tuple[int, int], ...] = ((768, 768),)
    image_max_pixels: int | None = LF_IMAGE_MAX_PIXELS
    image_min_pixels: int | None = LF_IMAGE_MIN_PIXELS
    # Videos in each sample (after the images, as LLaMA-Factory's plugins lay them out); planner/video.py
    videos: tuple[Video, ...] = ()
    attn: Attention = "sdpa"
    gradient_checkpointing: bool = True
    # The vision tower's layers checkpointed or not on their own (ms-swift vit_gradient_checkpointing); None: as
    # `gradient_checkpointing`, which then stands for the language model alone
    vision_gradient_checkpointing: bool | None = None
    # Checkpointed layers' inputs kept in host RAM (LLaMA-Factory use_unsloth_gc, checkpointing.py
    # `get_unsloth_gradient_checkpointing_func`) instead of on the GPU
    offload_checkpoints: bool = False
    gpu: GPU = field(default_factory=lambda: find_gpu("h100-80g"))
    num_gpus: int = 1  # per node
    num_nodes: int = 1
    zero: int = 0
    offload: Offload = "none"
    max_grad_norm: float = 1.0
    # DeepSpeed buffers (None: the HF integration's "auto" values, hidden_size**2 elements)
    ds_reduce_bucket_size: int | None = None
    ds_overlap_comm: bool = False
    sharding: Sharding = "zero"  # "fsdp": PyTorch FSDP2 through accelerate instead of DeepSpeed (zero stays 0)
    fsdp: FsdpStrategy = "full_shard"  # the FSDP strategy (read only with sharding "fsdp")
    stack: Stack = "vlplan"
    # Preference training (planner/memory/preference.py): each sample is a chosen and a rejected sequence, both in
    # one forward of 2 x batch_size rows; `pref_ftx` adds the chosen sequences' SFT loss (LF pref_ftx); `pref_beta`
    # (LF pref_beta) is recorded for the launch configs, the memory does not depend on it
    stage: Stage = "sft"
    pref_loss: PrefLoss = "sigmoid"
    pref_ftx: float = 0.0
    pref_beta: float = 0.1
    # KTO's weights of the desirable and undesirable losses (LF kto_chosen_weight, kto_rejected_weight): Python
    # scalars of TRL's `kto_loss`, recorded for the launch configs
    kto_chosen_weight: float = 1.0
    kto_rejected_weight: float = 1.0
    # PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: the caching allocator grows one segment per pool in pages
    # instead of cudaMalloc'ing segments (planner/memory/allocator.py); it changes reserved memory, not live tensors.
    # LLaMA-Factory's launcher sets it for torchrun runs (planner/resolve.py expandable_segments_default)
    expandable_segments: bool = False
    # LLaMA-Factory packing: samples packed into rows of seq_len tokens (planner/packing.py); neat_packing adds the
    # block-diagonal (batch, 1, seq, seq) attention mask for sdpa and eager
    packing: bool = False
    neat_packing: bool = False
    # Recorded for the launch configs (LLaMA-Factory keys); the memory model does not read them yet
    liger_kernel: bool = False  # LLaMA-Factory enable_liger_kernel (fused linear cross-entropy, fused norms)
    video_max_pixels: int = LF_VIDEO_MAX_PIXELS
    video_min_pixels: int = LF_VIDEO_MIN_PIXELS
    video_fps: float = LF_VIDEO_FPS
    video_maxlen: int = LF_VIDEO_MAXLEN

    def __post_init__(self) -> None:
        self._validate_choices()
        self._validate_combinations()
        self._validate_sequence()

    # Validation -----------------------------------------------------------------------------------------------
    def _validate_choices(self) -> None:
        for value, choices, flag in ((self.method, METHODS, "--method"), (self.precision, PRECISIONS, "--precision"),
                                     (self.optimizer, OPTIMIZERS, "--optimizer"), (self.attn, ATTENTIONS, "--attn"),
                                     (self.offload, OFFLOADS, "--offload"), (self.stack, STACKS, "--stack"),
                                     (self.sharding, SHARDINGS, "--sharding"), (self.fsdp, FSDP_STRATEGIES, "--fsdp"),
                                     (self.stage, STAGES, "--stage"), (self.pref_loss, PREF_LOSSES, "--pref-loss")):
            if value not in choices:
                raise VlplanError(f"{flag} {value!r} is not one of {', '.join(choices)}")
        for value, flag, bound in ((self.seq_len, "--seq-len", MAX_SEQ_LEN),
                                   (self.batch_size, "--batch-size", MAX_BATCH_SIZE),
                                   (self.gradient_accumulation_steps, "--gradient-accumulation-steps",
                                    MAX_GRADIENT_ACCUMULATION_STEPS),
                                   (self.num_gpus, "--num-gpus", MAX_GPUS_PER_NODE),
                                   (self.num_nodes, "--num-nodes", MAX_NODES)):
            if value <= 0:
                raise VlplanError(f"{flag} must be positive, got {value}")
            _check_bound(value, flag, bound)
        memory_gib = self.gpu.memory_mib / 1024
        if not (math.isfinite(memory_gib) and 0 < memory_gib <= MAX_GPU_MEMORY_GIB):
            raise VlplanError(f"GPU memory must be a positive number of GiB up to {MAX_GPU_MEMORY_GIB}, got "
                              f"{memory_gib:g} GiB ({self.gpu.name})")
        if self.zero not in (0, 1, 2, 3):
            raise VlplanError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.quant_bits not in (None, 4, 8):
            raise VlplanError(f"--quant-bits must be 4 or 8, got {self.quant_bits}")
        if self.freeze_trainable_layers <= 0:
            raise VlplanError(f"--freeze-trainable-layers must be positive, got {self.freeze_trainable_layers}")
        _check_bound(len(self.images), "--images (images per sample)", MAX_IMAGES_PER_SAMPLE)
        _check_bound(len(self.images) * self.batch_size, "--images x --batch-size (images per micro-batch)",
                     MAX_IMAGES_PER_MICRO_BATCH)
        for w, h in self.images:
            if w <= 0 or h <= 0:
                raise VlplanError(f"image size must be positive, got {w}x{h}")
            _check_bound(max(w, h), f"image side ({w}x{h})", MAX_IMAGE_SIDE)
        check_pixel_limits(self.image_max_pixels, self.image_min_pixels)
        if self.videos:
            _check_bound(len(self.videos), "--videos (videos per sample)", MAX_VIDEOS_PER_SAMPLE)
            check_video_family(self.model)
        for value, flag in ((self.video_max_pixels, "video_max_pixels"), (self.video_min_pixels, "video_min_pixels"),
                            (self.video_fps, "video_fps"), (self.video_maxlen, "video_maxlen")):
            if not value > 0 or not math.isfinite(value):
                raise VlplanError(f"{flag} must be positive, got {value}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise VlplanError(f"max_grad_norm must be 0 (no clipping) or positive, got {self.max_grad_norm}")

    def _validate_combinations(self) -> None:
        trains = (self.vision, self.projector, self.language)
        if all(t is Train.FROZEN for t in trains):
            raise VlplanError("nothing trains: every component is frozen; drop --freeze-llm or add --train-vision/"
                              "--train-projector")
        if self.method in ("lora", "qlora", "oft") and self.language is Train.FULL:
            raise VlplanError(f"--method {self.method} trains the language model with adapters, not in full; use "
                              "--method full")
        if self.method in ("full", "freeze") and Train.LORA in trains:
            raise VlplanError(f"--method {self.method} has no LoRA adapters; use --method lora for adapters")
        if self.method == "freeze" and self.language is Train.FROZEN:
            raise VlplanError("--method freeze trains the last language-model layers; it cannot be combined with "
                              "--freeze-llm")
        if self.quant_bits is not None and self.method != "qlora":
            raise VlplanError("--quant-bits quantizes the frozen base weights for QLoRA; use --method qlora")
        if self.method == "qlora" and self.quant_bits is None:
            raise VlplanError("--method qlora needs --quant-bits 4 or 8")
        if self.method == "qlora" and self.quant_bits != 4 and (self.zero == 3 or self.sharding == "fsdp"):
            # LLaMA-Factory (model_utils/quantization.py): "Only 4-bit quantized model can use fsdp+qlora"; 4-bit
            # weights are stored in the compute dtype (bnb_4bit_quant_storage) so ZeRO-3 and FSDP can shard them
            raise VlplanError(f"QLoRA with {'FSDP' if self.sharding == 'fsdp' else 'ZeRO-3'} needs --quant-bits 4 "
                              "(bitsandbytes 4-bit weights stored in the compute dtype; LLaMA-Factory refuses 8-bit)"
                              "; use --quant-bits 4 or --zero 2")
        self._validate_fsdp()
        if self.lora.dora and self.method not in ("lora", "qlora"):
            raise VlplanError("--dora is a LoRA variant; use it with --method lora or qlora")
        if self.oft != OftSettings() and self.method != "oft":
            raise VlplanError("--oft-rank, --oft-block-size and --module-dropout are OFT settings; use them with "
                              "--method oft")
        if self.method == "oft" and self.sharding == "fsdp":
            raise VlplanError("OFT under FSDP is not modelled yet; use --sharding zero (or --method lora)")
        if self.precision == "pure-bf16" and self.zero == 3:
            raise VlplanError("pure bf16 cannot be combined with ZeRO-3 (LLaMA-Factory refuses it); use --precision "
                              "bf16 or --zero 2")
        if self.precision in ("bf16", "pure-bf16") and not self.gpu.bf16:
            raise VlplanError(f"{self.gpu.name} has no bf16 support; use --precision fp16 or fp32")
        if self.attn == "fa2" and self.precision == "fp32":
            raise VlplanError("FlashAttention-2 runs in fp16/bf16 only; use --attn sdpa with --precision fp32")
        if self.attn == "fa2" and not self.gpu.bf16:
            # flash-attn 2 supports Ampere, Ada and Hopper (sm_80+) only (Dao-AILab/flash-attention README,
            # "Requirements"); bf16 arrived with Ampere, so the catalog's bf16 flag marks exactly the older chips
            # (V100 sm_70, T4 sm_75)
            raise VlplanError(f"FlashAttention-2 needs an Ampere or newer GPU; {self.gpu.name} is older: use --attn "
                              "sdpa")
        if self.method == "freeze" and self.freeze_trainable_layers > self.model.text.num_layers:
            raise VlplanError(f"--freeze-trainable-layers {self.freeze_trainable_layers} is above the "
                              f"{self.model.text.num_layers} language-model layers of {self.model.name}; use at most "
                              f"{self.model.text.num_layers} (or --method full)")
        if self.neat_packing and not self.packing:
            raise VlplanError("neat_packing packs samples: set packing too (LLaMA-Factory turns packing on with "
                              "neat_packing)")
        if self.neat_packing and self.attn == "fa2" and self.batch_size > 1:
            # LLaMA-Factory collator.py SFTDataCollatorWith4DAttentionMask: "bsz should be 1 for neat packing"
            raise VlplanError("neat_packing with FlashAttention-2 runs one packed row per micro-batch (LLaMA-Factory "
                              "asserts a batch size of 1); use --batch-size 1 (more samples fit in a longer row)")
        if self.neat_packing and self.attn == "sdpa" and self.precision == "fp32":
            raise VlplanError("neat_packing with sdpa in fp32 (a masked fp32 attention kernel) is not modelled; use "
                              "--precision bf16 or --attn eager")
        if self.offload != "none" and self.zero == 0 and self.sharding == "zero":
            raise VlplanError(f"--offload {self.offload} needs DeepSpeed ZeRO; add --zero 2 (optimizer) or --zero 3")
        if self.offload == "all" and self.zero != 3 and self.sharding == "zero":
            raise VlplanError("--offload all (parameters too) needs --zero 3; use --offload optimizer with ZeRO-1/2")
        if self.optimizer in ("adamw-8bit", "paged-adamw-8bit") and self.offload != "none":
            raise VlplanError("DeepSpeed optimizer offload runs its own CPU Adam; use --optimizer adamw with "
                              "--offload")
        if self.vision_gradient_checkpointing is not None and self.stack == "llamafactory":
            raise VlplanError("LLaMA-Factory checkpoints the vision tower and the language model together "
                              "(prepare_model_for_training); per-component checkpointing (ms-swift's "
                              "vit_gradient_checkpointing) needs --stack vlplan or hf-trainer")
        if self.offload_checkpoints and not self.any_checkpointing:
            raise VlplanError("--offload-checkpoints moves checkpointed layers' inputs to host RAM; it needs gradient "
                              "checkpointing on")
        if self.offload_checkpoints and self.stack != "llamafactory":
            raise VlplanError("--offload-checkpoints is LLaMA-Factory's use_unsloth_gc; use it with --stack "
                              "llamafactory")
        if self.method in ("lora", "qlora", "oft"):
            self._validate_lora_targets()
        if self.stage != "sft":
            self._validate_preference()

    def _validate_preference(self) -> None:
        """What of LLaMA-Factory's DPO and KTO stages is modelled (planner/memory/preference.py)."""
        stage = f"--stage {self.stage}"
        if self.stack != "llamafactory":
            trainer = "CustomDPOTrainer" if self.stage == "dpo" else "CustomKTOTrainer"
            raise VlplanError(f"{stage} is LLaMA-Factory's {trainer}; use it with --stack llamafactory")
        if self.packing:
            raise VlplanError(f"{stage} keeps each sample's sequences apart; LLaMA-Factory does not pack preference "
                              "data: drop packing")
        if self.sharding == "fsdp":
            raise VlplanError(f"{stage} under FSDP (the reference model prepared by fsdp2_prepare_model) is not "
                              "modelled; use --sharding zero")
        if self.zero == 3 and self.uses_reference_copy:
            raise VlplanError(f"{stage} with a full or freeze reference model under ZeRO-3 (its weights "
                              "partitioned by TRL's prepare_deepspeed) is not modelled; use --zero 2, --method lora"
                              + (", or --pref-loss orpo/simpo (no reference model)" if self.stage == "dpo" else ""))
        if self.lora.dropout > 0 and self.lora.dora:
            # the trainer zeroes every dropout (trl disable_dropout_in_model): modelled as none for LoRA, but peft's
            # DoRA takes another path for an nn.Dropout than for nn.Identity
            raise VlplanError(f"{stage} with DoRA and --lora-dropout > 0 (a zeroed nn.Dropout) is not modelled; set "
                              "--lora-dropout 0")
        if self.liger_kernel:
            raise VlplanError(f"{stage} with Liger kernels (LF enable_liger_kernel) is not modelled; drop it")
        if self.vision_gradient_checkpointing is not None or self.offload_checkpoints:
            raise VlplanError(f"{stage} with per-component or offloaded checkpointing is not modelled; drop it")
        if not (isinstance(self.pref_ftx, (int, float)) and self.pref_ftx >= 0):
            raise VlplanError(f"--pref-ftx must be 0 or more, got {self.pref_ftx}")
        if self.stage == "kto":
            self._validate_kto()

    def _validate_kto(self) -> None:
        """KTO as LLaMA-Factory 0.9.5 runs it: CustomKTOTrainer.forward hands the model input_ids, attention_mask,
        pixel_values and the image keys (image_grid_thw, image_sizes, ...) only."""
        if self.pref_loss != "sigmoid":
            raise VlplanError(f"--pref-loss {self.pref_loss} is a DPO loss; LLaMA-Factory's KTO trainer does not read "
                              "it: drop --pref-loss with --stage kto")
        for value, flag in ((self.kto_chosen_weight, "--kto-chosen-weight"),
                            (self.kto_rejected_weight, "--kto-rejected-weight")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise VlplanError(f"{flag} must be 0 or more, got {value}")
        if self.videos:
            raise VlplanError("--stage kto with videos: LLaMA-Factory's CustomKTOTrainer.forward does not pass "
                              "pixel_values_videos to the model (train/kto/trainer.py); drop the videos")
        if self.model.family not in KTO_FAMILIES:
            raise VlplanError(f"--stage kto is modelled and traced for {', '.join(KTO_FAMILIES)}; "
                              f"{self.model.family} is not (its KTO forward's inputs are not checked)")

    def _validate_fsdp(self) -> None:
        if self.sharding == "zero":
            if self.fsdp != "full_shard":
                raise VlplanError(f"--fsdp {self.fsdp} is an FSDP strategy; add --sharding fsdp (or drop --fsdp)")
            return
        if self.zero:
            raise VlplanError(f"--zero {self.zero} is DeepSpeed's sharding, --sharding fsdp is PyTorch's; use one of "
                              "them (--zero 0 with --sharding fsdp)")
        if self.offload == "optimizer":
            # FSDP2's CPUOffloadPolicy moves parameters, gradients and the optimizer step together (fully_shard)
            raise VlplanError("FSDP offloads parameters, gradients and optimizer states together (CPUOffloadPolicy); "
                              "use --offload all, or --sharding zero for optimizer-only offload")
        if self.fsdp == "hybrid_shard" and self.num_nodes < 2:
            raise VlplanError("--fsdp hybrid_shard shards within a node and replicates across nodes; it needs "
                              "--num-nodes 2 or more (use full_shard on one node)")
        if self.ds_reduce_bucket_size is not None or self.ds_overlap_comm:
            raise VlplanError("DeepSpeed's reduce bucket settings do not apply to FSDP; drop them or use --sharding "
                              "zero")

    def _validate_lora_targets(self) -> None:
        linears = []
        inventories = model_inventory(self.model)
        for component, train in ((VISION, self.vision), (LANGUAGE, self.language)):
            if train is Train.LORA:
                linears += inventories[component].linears
        if "all" in self.lora.targets:
            targeted = [linear for linear in linears if linear.lora_all]
        else:
            available = {linear.name for linear in linears}
            unknown = [t for t in self.lora.targets if t not in available]
            if unknown:
                raise VlplanError(f"--lora-target {','.join(unknown)} matches no linear layer of the LoRA-trained "
                                  f"components of {self.model.name}; choose from all, {', '.join(sorted(available))}")
            targeted = [linear for linear in linears if linear.name in self.lora.targets]
        # B @ A has rank at most min(in, out): a higher LoRA rank adds parameters and memory but no capacity. peft
        # accepts it; refused only when it is above full rank for every targeted layer (never useful anywhere)
        full_rank = max((min(linear.in_features, linear.out_features) for linear in targeted), default=0)
        if targeted and self.lora.rank > full_rank:
            raise VlplanError(f"--lora-rank {self.lora.rank} is above full rank for every targeted layer of "
                              f"{self.model.name} (the largest min(in, out) is {full_rank}; a rank-r update B @ A "
                              f"cannot exceed it); use --lora-rank {full_rank} or less")

    def _validate_sequence(self) -> None:
        needed = self.vision_tokens_per_sample + self.special_tokens_per_sample
        if needed > self.seq_len and self.videos:
            per_video = ", ".join(str(t.llm_tokens) for t in self.video_tokens())
            raise VlplanError(
                f"the images and videos need {needed} tokens ({per_video} per video, "
                f"{self.special_tokens_per_sample} special included) but --seq-len is {self.seq_len}: LLaMA-Factory "
                f"would cut video tokens and crash with 'Video features and video tokens do not match'; raise "
                f"--seq-len to at least {needed + 1} or lower --video-max-pixels / --video-maxlen / --video-fps")
        if needed > self.seq_len:
            tokens = self.image_tokens()
            per_image = ", ".join(str(t.llm_tokens) for t in tokens)
            pixels = suggest_max_pixels(self)
            lower = (f" or lower --image-max-pixels (e.g. {pixels})" if pixels else
                     f" (a lower --image-max-pixels does not reduce {self.model.name}'s image tokens: its processor "
                     f"resizes every image to a fixed size or tile grid)")
            raise VlplanError(
                f"the images need {needed} tokens ({per_image} per image + {self.special_tokens_per_sample} special) "
                f"but --seq-len is {self.seq_len}: LLaMA-Factory would cut image tokens and crash with 'Image "
                f"features and image tokens do not match'; raise --seq-len to at least {needed + 1}{lower}"
            )

    # Derived quantities ---------------------------------------------------------------------------------------
    def image_tokens(self) -> list[ImageTokens]:
        return [image_tokens(self.model, w, h, image_max_pixels=self.image_max_pixels,
                             image_min_pixels=self.image_min_pixels) for w, h in self.images]

    def video_tokens(self) -> list[VideoTokens]:
        return [video_tokens(self.model, video, video_max_pixels=self.video_max_pixels,
                             video_min_pixels=self.video_min_pixels, video_fps=self.video_fps,
                             video_maxlen=self.video_maxlen) for video in self.videos]

    @property
    def vision_tokens_per_sample(self) -> int:
        return sum(t.llm_tokens for t in self.image_tokens()) + sum(t.llm_tokens for t in self.video_tokens())

    @property
    def vision_patches_per_sample(self) -> int:
        return (sum(t.vision_patches for t in self.image_tokens())
                + sum(t.vision_patches for t in self.video_tokens()))

    @property
    def special_tokens_per_sample(self) -> int:
        return (sum(t.special_tokens for t in self.image_tokens())
                + sum(t.special_tokens for t in self.video_tokens()))

    def checkpointing(self, component: str) -> bool:
        """Whether the layers of `component` (vision or language) are checkpointed."""
        if component == VISION and self.vision_gradient_checkpointing is not None:
            return self.vision_gradient_checkpointing
        return self.gradient_checkpointing

    @property
    def any_checkpointing(self) -> bool:
        """Some layer is checkpointed: the model's `is_gradient_checkpointing`, which peft reads."""
        return self.gradient_checkpointing or bool(self.vision_gradient_checkpointing)

    @property
    def preference(self) -> bool:
        """A preference stage (dpo, kto): the model returns fp32 logits to the trainer's log-prob code instead of a
        loss, and the trainer zeroes every dropout (trl disable_dropout_in_model)."""
        return self.stage != "sft"

    @property
    def uses_reference(self) -> bool:
        """A reference model's forward: LLaMA-Factory's FinetuningArguments.use_ref_model for DPO (a loss that needs
        the reference log-probs), always for KTO (train/kto/workflow.py `create_ref_model`; the trainer's
        `compute_reference_log_probs` in every step)."""
        return self.stage == "kto" or (self.stage == "dpo" and self.pref_loss not in ("orpo", "simpo"))

    @property
    def uses_reference_copy(self) -> bool:
        """The reference is a second, frozen model (train/trainer_utils.py `create_ref_model`: a copy of the model for
        every finetuning_type but lora, OFT included; for LoRA and QLoRA `ref_model = None` and the trainer runs the policy with
        its adapters disabled, `compute_reference_log_probs`)."""
        return self.uses_reference and self.method not in ("lora", "qlora")

    @property
    def rows_per_micro_batch(self) -> int:
        """Sequences in one forward: the pairwise collator (data/collator.py `PairwiseDataCollatorWithPadding`) puts
        the chosen then the rejected sequence of each sample in one batch of 2 x batch_size rows. KTO's collator
        (`KTODataCollatorWithPadding`) gives batch_size target rows and batch_size KL rows, run in separate forwards."""
        return 2 * self.batch_size if self.stage == "dpo" else self.batch_size

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes

    @property
    def trains(self) -> dict[str, Train]:
        return {VISION: self.vision, PROJECTOR: self.projector, LANGUAGE: self.language}

    def describe(self) -> dict:
        """Every resolved setting, JSON-ready."""
        d = asdict(self)
        d["model"] = self.model.name
        d["gpu"] = self.gpu.name
        for key in ("vision", "projector", "language"):
            d[key] = getattr(self, key).value
        d["lora"]["targets"] = list(self.lora.targets)
        d["images"] = [f"{w}x{h}" for w, h in self.images]
        if self.videos:
            d["videos"] = [video.label() for video in self.videos]
        else:
            del d["videos"]  # absent, so that the records of image-only setups stay as they were
        if not self.neat_packing:
            del d["neat_packing"]  # likewise for setups without neat packing
        if self.method != "oft":
            del d["oft"]  # the OFT settings are listed only for OFT (other setups read as before)
        if self.stage != "kto":  # likewise the KTO weights for KTO
            del d["kto_chosen_weight"], d["kto_rejected_weight"]
        d["world_size"] = self.world_size
        if self.sharding == "zero":  # the FSDP settings are listed only when FSDP shards (ZeRO setups read as before)
            del d["sharding"], d["fsdp"]
        return d


def check_pixel_limits(image_max_pixels: int | None, image_min_pixels: int | None) -> None:
    """LLaMA-Factory's pre-resize limits: positive (or None: no limit), within MAX_IMAGE_PIXELS, floor <= cap."""
    for value, flag in ((image_max_pixels, "--image-max-pixels"), (image_min_pixels, "--image-min-pixels")):
        if value is not None and value <= 0:
            raise VlplanError(f"{flag} must be positive, got {value}")
        if value is not None:
            _check_bound(value, flag, MAX_IMAGE_PIXELS)
    if image_max_pixels and image_min_pixels and image_min_pixels > image_max_pixels:
        raise VlplanError(f"--image-min-pixels {image_min_pixels} is above --image-max-pixels {image_max_pixels}; "
                          "lower the floor or raise the cap")


def _check_bound(value: int, flag: str, bound: int) -> None:
    if value > bound:
        raise VlplanError(f"{flag} {value} is above vlplan's bound of {bound} (a guard against typos that would "
                          "make the estimate hang); no real fine-tune comes near it")


def suggest_max_pixels(setup: TrainSetup) -> int | None:
    """The largest `image_max_pixels` whose images' tokens (special ones included) fit `seq_len`, or None when no
    value does (processors that resize every image to a fixed size or tile grid: InternVL, Gemma 3, Idefics3,
    SmolVLM)."""
    def fits(pixels: int) -> bool:
        tokens = [image_tokens(setup.model, w, h, image_max_pixels=pixels, image_min_pixels=setup.image_min_pixels)
                  for w, h in setup.images]
        return sum(t.llm_tokens + t.special_tokens for t in tokens) < setup.seq_len

    low, high = max(setup.image_min_pixels or 0, 28 * 28), setup.image_max_pixels or 16384 * 28 * 28
    if not fits(low):
        return None
    best = low
    while low <= high:
        mid = (low + high) // 2
        if fits(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def make_setup(model: ModelSpec, *, method: str = "lora", train_vision: bool | None = None,
               train_projector: bool | None = None, freeze_llm: bool | None = None, lora_rank: int | None = None,
               lora_alpha: int | None = None, lora_target: str | list[str] | None = None, dora: bool | None = None,
               lora_dropout: float | None = None, oft_rank: int | None = None, oft_block_size: int | None = None,
               module_dropout: float | None = None,
               quant_bits: int | None = None, num_images: int | None = None,
               image_size: tuple[int, int] | None = None, images: list[tuple[int, int]] | None = None,
               gpu: GPU | str = "h100-80g", vision: str | Train | None = None, projector: str | Train | None = None,
               language: str | Train | None = None, **settings) -> TrainSetup:
    """Build a TrainSetup from CLI-style choices, applying the method presets and LLaMA-Factory's defaults.

    Defaults follow LLaMA-Factory: vision tower and projector frozen, LoRA rank 8 (alpha 2*rank) on every language-
    model linear, gradient checkpointing on, sdpa, bf16 AMP, one image at the `image_max_pixels` cap.
    `--method full` trains the language model only unless the vision tower or projector is asked for.
    `vision` (frozen | lora | full), `projector` (frozen | full) and `language` (frozen | lora | full | freeze: the last
    `freeze_trainable_layers` layers, i.e. `--method freeze`) say how each component trains, over the method's
    preset (e.g. LoRA on the language model with the vision tower and projector in full, ms-swift's
    lora_llm_full_vit); one that contradicts a preset flag (train_vision, train_projector, freeze_llm) is refused.
    The LoRA settings (`lora_rank`, `lora_alpha`, `lora_target`, `dora`, `lora_dropout`) are None when not given;
    one given with `--method full` or `freeze` (no adapters) is refused rather than ignored. `--method oft` reads
    `lora_target` only (LLaMA-Factory builds OFTConfig's target_modules from it) and the OFT settings (`oft_rank`,
    `oft_block_size`, `module_dropout`); `oft_rank` alone sets the block size to 0 (peft takes one of the two).
    """
    if method not in METHODS:
        raise VlplanError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    adapter = method in ("lora", "qlora", "oft")
    if method == "oft":
        given = [flag for flag, value in (("--lora-rank", lora_rank), ("--lora-alpha", lora_alpha),
                                          ("--dora", dora or None), ("--lora-dropout", lora_dropout)) if value is not None]
        if given:
            raise VlplanError(f"{', '.join(given)}: LoRA settings, but --method oft trains orthogonal blocks; use "
                              "--oft-rank / --oft-block-size (--lora-target still picks the adapted linears)")
    elif any(value is not None for value in (oft_rank, oft_block_size, module_dropout)):
        raise VlplanError("--oft-rank, --oft-block-size and --module-dropout are OFT settings; use them with "
                          "--method oft")
    if not adapter:
        given = [flag for flag, value in (("--lora-rank", lora_rank), ("--lora-alpha", lora_alpha),
                                          ("--lora-target", lora_target), ("--dora", dora or None),
                                          ("--lora-dropout", lora_dropout)) if value is not None]
        if given:
            names = ", ".join(given)
            raise VlplanError(f"{names} {'is a LoRA setting' if len(given) == 1 else 'are LoRA settings'}, but "
                              f"--method {method} has no adapters; use --method lora or qlora, or drop {names}")
    lora_rank = 8 if lora_rank is None else lora_rank
    lora_target = "all" if lora_target is None else lora_target
    modes = _component_modes(method, vision, projector, language, train_vision, train_projector, freeze_llm)
    vision = Train.FROZEN
    if train_vision:
        vision = Train.LORA if adapter else Train.FULL
    projector = Train.FULL if train_projector else Train.FROZEN
    if freeze_llm:
        language = Train.FROZEN
    else:
        language = Train.LORA if adapter else Train.FULL
    vision, projector, language = (modes.get(key, preset) for key, preset in
                                   (("vision", vision), ("projector", projector), ("language", language)))
    if method == "qlora" and quant_bits is None:
        quant_bits = 4
    targets = tuple(t.strip() for t in (lora_target.split(",") if isinstance(lora_target, str) else lora_target)
                    if t.strip())
    lora = LoraSettings(rank=lora_rank, alpha=lora_alpha if lora_alpha is not None else 2 * lora_rank,
                        targets=targets, dora=bool(dora), dropout=0.0 if lora_dropout is None else lora_dropout)
    if oft_rank and oft_block_size is None:
        oft_block_size = 0
    oft = OftSettings(rank=oft_rank or 0, block_size=32 if oft_block_size is None else oft_block_size,
                      module_dropout=module_dropout or 0.0)
    if images is None:
        count = 1 if num_images is None else num_images
        if count < 0:
            raise VlplanError(f"--images must be 0 or more, got {count}")
        _check_bound(count, "--images (images per sample)", MAX_IMAGES_PER_SAMPLE)  # before building the list
        if image_size is None:
            # one square image at LLaMA-Factory's image_max_pixels cap (768x768 by default)
            max_pixels = settings.get("image_max_pixels") or LF_IMAGE_MAX_PIXELS
            if max_pixels <= 0:
                raise VlplanError(f"--image-max-pixels must be positive, got {max_pixels}")
            _check_bound(max_pixels, "--image-max-pixels", MAX_IMAGE_PIXELS)
            side = math.isqrt(int(max_pixels))
            image_size = (side, side)
        images = [image_size] * count
    return TrainSetup(model=model, method=method, vision=vision, projector=projector, language=language, lora=lora,
                      oft=oft,
                      quant_bits=quant_bits, images=tuple(tuple(i) for i in images),
                      gpu=find_gpu(gpu) if isinstance(gpu, str) else gpu, **settings)


COMPONENT_MODES = {"vision": ("frozen", "lora", "full"), "projector": ("frozen", "full"),
                   "language": ("frozen", "lora", "full", "freeze")}


def implied_method(vision: str | None, projector: str | None, language: str | None) -> str | None:
    """The method per-component modes imply when no method is given: freeze for `--language freeze`, LoRA where a
    component has adapters, full where the language model trains in full or nothing has adapters; None (the default
    method stands) when the language model's mode is not given and no component asks for adapters."""
    modes = {str(getattr(m, "value", m)) for m in (vision, projector, language) if m is not None}
    if language is not None and str(getattr(language, "value", language)) == "freeze":
        return "freeze"
    if "lora" in modes:
        return "lora"
    if language is not None:
        return "full"
    return None


def _component_modes(method: str, vision, projector, language, train_vision, train_projector,
                     freeze_llm) -> dict[str, Train]:
    """The per-component modes given (as Train), checked against their choices, the method and the preset flags."""
    modes: dict[str, Train] = {}
    for key, value in (("vision", vision), ("projector", projector), ("language", language)):
        if value is None:
            continue
        value = str(getattr(value, "value", value))
        if value not in COMPONENT_MODES[key]:
            raise VlplanError(f"--{key} {value!r} is not one of {', '.join(COMPONENT_MODES[key])}")
        if value == "freeze":
            if method != "freeze":
                raise VlplanError(f"--language freeze trains the last language-model layers (--method freeze), "
                                  f"but the method is {method}; use --method freeze or another --language mode")
            value = "full"
        modes[key] = Train(value)
    for key, flag, given in (("vision", "--train-vision", train_vision), ("projector", "--train-projector",
                                                                           train_projector)):
        if key in modes and given is not None and given != (modes[key] is not Train.FROZEN):
            off = flag.replace("train", "freeze")
            raise VlplanError(f"{flag if given else off} contradicts --{key} {modes[key].value}; pass one of them")
    if "language" in modes and freeze_llm is not None and freeze_llm != (modes["language"] is Train.FROZEN):
        raise VlplanError(f"{'--freeze-llm' if freeze_llm else '--train-llm'} contradicts --language "
                          f"{modes['language'].value}; pass one of them")
    return modes

