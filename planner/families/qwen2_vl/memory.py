"""Qwen2-VL and Qwen2.5-VL (transformers models/qwen2_vl, models/qwen2_5_vl).

Mirrors transformers 5.23 models/qwen2_vl/modeling_qwen2_vl.py and models/qwen2_5_vl/modeling_qwen2_5_vl.py.
"""

from __future__ import annotations

from types import SimpleNamespace

from ...memory import ops
from ...memory.model import BaseModel, segment_attention
from ...memory.sim import Engine, Node, T
from ...memory.vision import QwenMerger, QwenVisionBlock
from ...modules import VISION
from ...setup import Train, TrainSetup


class QwenVLModel(BaseModel):
    """Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration."""

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        super().__init__(e, setup, counts)
        v = setup.model.vision
        self.images = setup.image_tokens()
        # each video enters the vision tower as grid_t frames of grid_h x grid_w patches (planner/video.py)
        self.videos = setup.video_tokens()
        self.video_frames = video_frames(self.videos)
        if counts and "vision_full" in counts:
            window, full = counts["vision_window"], counts["vision_full"]
            kinds = [False] * window + [True] * full
        elif counts and "vision" in counts:
            kinds = [True] * counts["vision"]
        else:
            kinds = [(not v.fullatt_block_indexes) or i in v.fullatt_block_indexes for i in range(v.num_layers)]
        self.patch_embed = e.param("vision.patch_embed", v.in_channels * v.temporal_patch_size * v.patch_size ** 2
                                   * v.hidden_size, self.p._dtype(self.p.full(VISION)), self.p.full(VISION), VISION,
                                   shape=(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size,
                                          v.patch_size))
        self.blocks = [QwenVisionBlock(self.p, i, full) for i, full in enumerate(kinds)]
        # vision rotary buffers: inv_freq and original_inv_freq, head_dim/4 fp32 each
        self.vision_buffers = [e.param(f"vision.rotary_pos_emb.{n}", v.head_dim // 4, "fp32", False, VISION)
                               for n in ("inv_freq", "original_inv_freq")]
        self.merger = QwenMerger(self.p)

    def graph_held_inputs(self, e: Engine) -> tuple[str, ...]:
        """With a vision graph (a trainable tower, or LLaMA-Factory's input hook on the patch embedding) its index
        and boundary inputs are saved too (traced: the rotary position ids, cu_seqlens, the window index)."""
        held = super().graph_held_inputs(e)
        if e.input_grads or self.setup.vision is not Train.FROZEN:
            held += tuple(f"{kind}_{key}" for kind in ("image", "video")
                          for key in ("position_ids", "cu_seqlens", "window_index", "cu_window_seqlens"))
        return held

    def inputs(self, e: Engine) -> dict[str, T]:
        inputs = self.text_inputs(e)
        inputs["mm_token_type_ids"] = e.new(self.tokens, "int32", name="mm_token_type_ids", category="inputs/batch")
        if self.images:
            self._vision_inputs(e, inputs, "image", self.images, len(self.images))
        if self.videos:
            # pixel_values_videos, video_grid_thw and the video_* helper tensors (accepts_precomputed_kwargs with
            # modality="video"); the rope positions come once, after the images' inputs when there are images
            self._vision_inputs(e, inputs, "video", self.video_frames, len(self.videos))
        return inputs

    def _vision_inputs(self, e: Engine, inputs: dict[str, T], kind: str, items, count: int) -> None:
        v = self.setup.model.vision
        patches = sum(t.vision_patches for t in items) * self.batch
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        pixels = "pixel_values" if kind == "image" else "pixel_values_videos"
        inputs[pixels] = e.new(patches * patch_dim, "fp32", name=pixels, category="inputs/batch")
        n = count * self.batch
        inputs[f"{kind}_grid_thw"] = e.new(n * 3, "int64", name=f"{kind}_grid_thw", category="inputs/batch")
        if "position_ids" not in inputs:
            inputs["position_ids"] = e.new(3 * self.tokens, "int64", name="position_ids", category="inputs/batch")
        inputs[f"{kind}_position_ids"] = e.new(patches * 2, "int64", name="vision_position_ids",
                                               category="inputs/batch")
        # cu_seqlens: one boundary per image, per video frame (get_vision_cu_seqlens repeats h*w grid_t times)
        segments = len(items) * self.batch
        inputs[f"{kind}_cu_seqlens"] = e.new(segments + 1, "int32", name="cu_seqlens", category="inputs/batch")
        if v.window_size:
            windows = len(window_segments(items, v, 1)) * self.batch  # the same windows in every sample
            inputs[f"{kind}_window_index"] = e.new(patches // 4, "int64", name="window_index",
                                                   category="inputs/batch")
            inputs[f"{kind}_cu_window_seqlens"] = e.new(windows + 1, "int32", name="cu_window_seqlens",
                                                        category="inputs/batch")

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        x = self.embed_tokens(e)
        if not self.images and not self.videos:
            return x
        # Qwen2VLModel.forward: get_image_features, then get_video_features (mm_encoder_outputs keeps both), then
        # each is concatenated, cast and scattered into the embeddings in that order
        towers = []
        if self.images:
            towers.append(("image", self._tower(e, inputs["pixel_values"], self.images)))
        if self.videos:
            towers.append(("video", self._tower(e, inputs["pixel_values_videos"], self.video_frames)))
        keep = []
        out = x
        for kind, (hidden, merged) in towers:
            e.scope = "projector"
            # get_*_features splits per item; forward cats them and casts to the text embeddings' dtype
            cat = e.new(merged.numel, merged.dtype, name=f"{kind}_embeds")
            e.record(Node("cat", [merged] if merged.rg else [], [], []), cat)
            embeds = ops.cast(e, cat, x.dtype, name=f"{kind}_embeds:cast")
            e.scope = "language"
            mask = e.new(self.tokens, "bool", name=f"{kind}_mask")
            out = ops.masked_scatter(e, out, mask, embeds, name=f"inputs_embeds:scatter_{kind}")
            # The vision outputs (last_hidden_state, pooler_output) and the embeddings stay referenced until the
            # language model returns (mm_encoder_outputs / *_embeds locals of Qwen2VLModel.forward)
            keep += [hidden, merged, cat, embeds]
            del mask
        self._keep = tuple(keep)
        return out

    def _tower(self, e: Engine, pixel_values: T, items) -> tuple[T, T]:
        """get_image_features / get_video_features: the vision tower and merger over `items` (images, or video
        frames: one attention segment each)."""
        e.scope = "vision"
        v = self.setup.model.vision
        patches = sum(t.vision_patches for t in items) * self.batch
        # get_*_features: pixel_values.type(self.visual.dtype); PatchEmbed casts to the conv weight dtype
        pixels = ops.cast(e, pixel_values, self.patch_embed.dtype, name="pixel_values:cast")
        # nn.Conv3d (no bias); the cast pixel values live until get_*_features returns
        hidden = ops.patch_conv(e, pixels, self.patch_embed, None, patches * v.hidden_size, "patch_embed")
        hidden = e.hook_input(hidden)  # visual.get_input_embeddings() is patch_embed
        if v.window_size:
            # permute_input_for_window_attn: hidden_states[window_index] (a gathered copy)
            hidden = _gather(e, hidden, "window_permute")
        ctx = VisionContext(patches, items, v, self.batch, segment_attention(self.setup))
        ctx.cos, ctx.sin = _vision_rotary(e, patches, v.head_dim)
        if v.window_size:
            ctx.cos, ctx.sin = _gather(e, ctx.cos, "cos_permute"), _gather(e, ctx.sin, "sin_permute")
        for block in self.blocks:
            hidden = self._run_layer(e, block, hidden, ctx)
        del ctx
        e.scope = "projector"
        merged = self.merger(e, hidden, patches)
        if v.window_size:
            reverse = e.new(patches // 4, "int64", name="reverse_indices")  # torch.argsort(window_index)
            merged = _gather(e, merged, "unpermute")
            del reverse
        del pixels
        return hidden, merged

    def language(self, e: Engine, x: T) -> T:
        out = super().language(e, x)
        self._keep = None
        return out


def video_frames(videos) -> list:
    """The frames of each video as the vision tower sees them: grid_t items of grid_h x grid_w patches, with the
    resized size (window attention splits each frame into windows as it would an image:
    vision_utils.get_vision_window_index reshapes each video to (grid_t, h, w))."""
    return [SimpleNamespace(vision_patches=t.frame_patches, resized_height=t.resized_height,
                            resized_width=t.resized_width) for t in videos for _ in range(t.grid_t)]


def _gather(e: Engine, x: T, name: str) -> T:
    """x[index] along the first dimension: a copy; IndexBackward saves only the index."""
    out = e.new(x.numel, x.dtype, name=name)
    e.record(Node("index", [x] if x.rg else [], [], []), out)
    return out


def _vision_rotary(e: Engine, patches: int, head_dim: int) -> tuple[T, T]:
    """Qwen2VLVisionRotaryEmbedding.forward: freqs (patches, 2, head_dim/4) fp32, cos/sin scaled, then
    recomposition_frequencies concatenates to (patches, head_dim) fp32."""
    freqs = e.new(patches * head_dim // 2, "fp32", name="vision.freqs")
    out = []
    for name in ("cos", "sin"):
        scaled = e.new(patches * head_dim // 2, "fp32", name=f"vision.{name}_scaled")
        hw = e.new(patches * head_dim // 2, "fp32", name=f"vision.{name}_hw")
        out.append(e.new(patches * head_dim, "fp32", name=f"vision.{name}"))
        del hw
        out.append(scaled)
    cos, cos_scaled, sin, sin_scaled = out
    del out, freqs, cos_scaled, sin_scaled
    return cos, sin


class VisionContext:
    def __init__(self, tokens: int, images, v, batch: int, attention) -> None:
        self.tokens = tokens
        self.segments = [t.vision_patches for t in images] * batch
        self.window_segments = window_segments(images, v, batch) if v.window_size else self.segments
        self.attention_segments = attention
        self.cos = self.sin = None


def window_segments(images, v, batch: int) -> list[int]:
    """transformers vision_utils.get_vision_window_index: windows of window_size // merge // patch merged units,
    the grid padded up to whole windows; each window holds up to (8x8) patches of one image."""
    unit = v.window_size // v.spatial_merge_size // v.patch_size
    merge = v.spatial_merge_size ** 2
    segments = []
    for image in images:
        gh = image.resized_height // v.patch_size // v.spatial_merge_size
        gw = image.resized_width // v.patch_size // v.spatial_merge_size
        rows = [min(unit, gh - r) for r in range(0, gh, unit)]
        cols = [min(unit, gw - c) for c in range(0, gw, unit)]
        segments += [r * c * merge for r in rows for c in cols]
    return segments * batch



MODELS = {"qwen2_vl": QwenVLModel, "qwen2_5_vl": QwenVLModel}
