"""TrainSetup: everything that decides the memory of a training step, resolved and validated once.

One `TrainSetup` flows through every stage (estimate, plan, trace, profile, run, tables). It is built by
`make_setup` from CLI flags, a LLaMA-Factory YAML or a plan, which applies the method presets and LLaMA-Factory's
defaults; `TrainSetup.__post_init__` rejects contradictory or impossible combinations with a message that says
what to change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum

from .errors import VlplanError
from .hardware import GPU, find_gpu
from .modules import LANGUAGE, PROJECTOR, VISION, model_inventory
from .spec import ModelSpec
from .tokens import LF_IMAGE_MAX_PIXELS, LF_IMAGE_MIN_PIXELS, ImageTokens, image_tokens

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


METHODS = ("full", "freeze", "lora", "qlora")
PRECISIONS = ("bf16", "fp16", "fp32", "pure-bf16")
# adamw: torch AdamW(fused=True) = HF optim "adamw_torch_fused", the Trainer default with torch >= 2.8
OPTIMIZERS = ("adamw", "adamw-foreach", "adamw-8bit", "paged-adamw-8bit", "sgd", "adafactor")
ATTENTIONS = ("sdpa", "fa2", "eager")
OFFLOADS = ("none", "optimizer", "all")


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
        if not self.targets:
            raise VlplanError("--lora-target is empty; use all or a comma-separated list such as q_proj,v_proj")
        if not 0.0 <= self.dropout < 1.0:
            raise VlplanError(f"--lora-dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainSetup:
    model: ModelSpec
    method: str = "lora"
    vision: Train = Train.FROZEN
    projector: Train = Train.FROZEN
    language: Train = Train.LORA
    lora: LoraSettings = field(default_factory=LoraSettings)
    # method "freeze": the last N language-model layers train in full (LLaMA-Factory freeze_trainable_layers)
    freeze_trainable_layers: int = 2
    precision: str = "bf16"
    quant_bits: int | None = None
    optimizer: str = "adamw"
    seq_len: int = 2048
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # Image sizes (W, H) in each sample; every sample of the batch has the same images and seq_len tokens
    images: tuple[tuple[int, int], ...] = ((768, 768),)
    image_max_pixels: int | None = LF_IMAGE_MAX_PIXELS
    image_min_pixels: int | None = LF_IMAGE_MIN_PIXELS
    attn: str = "sdpa"
    gradient_checkpointing: bool = True
    gpu: GPU = field(default_factory=lambda: find_gpu("h100-80g"))
    num_gpus: int = 1  # per node
    num_nodes: int = 1
    zero: int = 0
    offload: str = "none"
    max_grad_norm: float = 1.0
    # DeepSpeed buffers (None: the HF integration's "auto" values, hidden_size**2 elements)
    ds_reduce_bucket_size: int | None = None
    ds_overlap_comm: bool = False
    # Recorded for the launch configs (LLaMA-Factory keys); the memory model does not read them yet
    packing: bool = False  # LLaMA-Factory packing / neat_packing: sequences filled to seq_len
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
                                     (self.offload, OFFLOADS, "--offload")):
            if value not in choices:
                raise VlplanError(f"{flag} {value!r} is not one of {', '.join(choices)}")
        for value, flag in ((self.seq_len, "--seq-len"), (self.batch_size, "--batch-size"),
                            (self.gradient_accumulation_steps, "--gradient-accumulation-steps"),
                            (self.num_gpus, "--num-gpus"), (self.num_nodes, "--num-nodes")):
            if value <= 0:
                raise VlplanError(f"{flag} must be positive, got {value}")
        if self.zero not in (0, 1, 2, 3):
            raise VlplanError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.quant_bits not in (None, 4, 8):
            raise VlplanError(f"--quant-bits must be 4 or 8, got {self.quant_bits}")
        if self.freeze_trainable_layers <= 0:
            raise VlplanError(f"--freeze-trainable-layers must be positive, got {self.freeze_trainable_layers}")
        for w, h in self.images:
            if w <= 0 or h <= 0:
                raise VlplanError(f"image size must be positive, got {w}x{h}")
        for value, flag in ((self.image_max_pixels, "--image-max-pixels"), (self.image_min_pixels,
                                                                             "--image-min-pixels")):
            if value is not None and value <= 0:
                raise VlplanError(f"{flag} must be positive, got {value}")
        for value, flag in ((self.video_max_pixels, "video_max_pixels"), (self.video_min_pixels, "video_min_pixels"),
                            (self.video_fps, "video_fps"), (self.video_maxlen, "video_maxlen")):
            if value <= 0:
                raise VlplanError(f"{flag} must be positive, got {value}")

    def _validate_combinations(self) -> None:
        trains = (self.vision, self.projector, self.language)
        if all(t is Train.FROZEN for t in trains):
            raise VlplanError("nothing trains: every component is frozen; drop --freeze-llm or add --train-vision/"
                              "--train-projector")
        if self.method in ("lora", "qlora") and self.language is Train.FULL:
            raise VlplanError("--method lora trains the language model with adapters, not in full; use --method full")
        if self.method in ("full", "freeze") and Train.LORA in trains:
            raise VlplanError(f"--method {self.method} has no LoRA adapters; use --method lora for adapters")
        if self.method == "freeze" and self.language is Train.FROZEN:
            raise VlplanError("--method freeze trains the last language-model layers; it cannot be combined with "
                              "--freeze-llm")
        if self.quant_bits is not None and self.method != "qlora":
            raise VlplanError("--quant-bits quantizes the frozen base weights for QLoRA; use --method qlora")
        if self.method == "qlora" and self.quant_bits is None:
            raise VlplanError("--method qlora needs --quant-bits 4 or 8")
        if self.method == "qlora" and self.zero == 3:
            raise VlplanError("QLoRA cannot be combined with ZeRO-3 (DeepSpeed cannot partition bitsandbytes "
                              "quantized weights); use --zero 2 or less")
        if self.lora.dora and self.method not in ("lora", "qlora"):
            raise VlplanError("--dora is a LoRA variant; use it with --method lora or qlora")
        if self.precision == "pure-bf16" and self.zero == 3:
            raise VlplanError("pure bf16 cannot be combined with ZeRO-3 (LLaMA-Factory refuses it); use --precision "
                              "bf16 or --zero 2")
        if self.precision in ("bf16", "pure-bf16") and not self.gpu.bf16:
            raise VlplanError(f"{self.gpu.name} has no bf16 support; use --precision fp16 or fp32")
        if self.attn == "fa2" and self.precision == "fp32":
            raise VlplanError("FlashAttention-2 runs in fp16/bf16 only; use --attn sdpa with --precision fp32")
        if self.offload != "none" and self.zero == 0:
            raise VlplanError(f"--offload {self.offload} needs DeepSpeed ZeRO; add --zero 2 (optimizer) or --zero 3")
        if self.offload == "all" and self.zero != 3:
            raise VlplanError("--offload all (parameters too) needs --zero 3; use --offload optimizer with ZeRO-1/2")
        if self.optimizer in ("adamw-8bit", "paged-adamw-8bit") and self.offload != "none":
            raise VlplanError("DeepSpeed optimizer offload runs its own CPU Adam; use --optimizer adamw with "
                              "--offload")
        if self.method == "lora" or self.method == "qlora":
            self._validate_lora_targets()

    def _validate_lora_targets(self) -> None:
        if "all" in self.lora.targets:
            return
        available = set()
        inventories = model_inventory(self.model)
        for component, train in ((VISION, self.vision), (LANGUAGE, self.language)):
            if train is Train.LORA:
                available |= {linear.name for linear in inventories[component].linears}
        unknown = [t for t in self.lora.targets if t not in available]
        if unknown:
            raise VlplanError(f"--lora-target {','.join(unknown)} matches no linear layer of the LoRA-trained "
                              f"components of {self.model.name}; choose from all, {', '.join(sorted(available))}")

    def _validate_sequence(self) -> None:
        needed = self.vision_tokens_per_sample + self.special_tokens_per_sample
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

    @property
    def vision_tokens_per_sample(self) -> int:
        return sum(t.llm_tokens for t in self.image_tokens())

    @property
    def vision_patches_per_sample(self) -> int:
        return sum(t.vision_patches for t in self.image_tokens())

    @property
    def special_tokens_per_sample(self) -> int:
        return sum(t.special_tokens for t in self.image_tokens())

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
        d["world_size"] = self.world_size
        return d


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
               train_projector: bool | None = None, freeze_llm: bool = False, lora_rank: int = 8,
               lora_alpha: int | None = None, lora_target: str | list[str] = "all", dora: bool = False,
               lora_dropout: float = 0.0,
               quant_bits: int | None = None, num_images: int | None = None,
               image_size: tuple[int, int] | None = None, images: list[tuple[int, int]] | None = None,
               gpu: GPU | str = "h100-80g", **settings) -> TrainSetup:
    """Build a TrainSetup from CLI-style choices, applying the method presets and LLaMA-Factory's defaults.

    Defaults follow LLaMA-Factory: vision tower and projector frozen, LoRA rank 8 (alpha 2*rank) on every language-
    model linear, gradient checkpointing on, sdpa, bf16 AMP, one image at the `image_max_pixels` cap.
    `--method full` trains the language model only unless the vision tower or projector is asked for.
    """
    if method not in METHODS:
        raise VlplanError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    adapter = method in ("lora", "qlora")
    vision = Train.FROZEN
    if train_vision:
        vision = Train.LORA if adapter else Train.FULL
    projector = Train.FULL if train_projector else Train.FROZEN
    if freeze_llm:
        language = Train.FROZEN
    else:
        language = Train.LORA if adapter else Train.FULL
    if method == "qlora" and quant_bits is None:
        quant_bits = 4
    targets = tuple(t.strip() for t in (lora_target.split(",") if isinstance(lora_target, str) else lora_target)
                    if t.strip())
    lora = LoraSettings(rank=lora_rank, alpha=lora_alpha if lora_alpha is not None else 2 * lora_rank,
                        targets=targets, dora=dora, dropout=lora_dropout)
    if images is None:
        count = 1 if num_images is None else num_images
        if count < 0:
            raise VlplanError(f"--images must be 0 or more, got {count}")
        if image_size is None:
            # one square image at LLaMA-Factory's image_max_pixels cap (768x768 by default)
            side = int((settings.get("image_max_pixels") or LF_IMAGE_MAX_PIXELS) ** 0.5)
            image_size = (side, side)
        images = [image_size] * count
    return TrainSetup(model=model, method=method, vision=vision, projector=projector, language=language, lora=lora,
                      quant_bits=quant_bits, images=tuple(tuple(i) for i in images),
                      gpu=find_gpu(gpu) if isinstance(gpu, str) else gpu, **settings)


def with_changes(setup: TrainSetup, **changes) -> TrainSetup:
    return replace(setup, **changes)
