"""Idefics3 and SmolVLM-Instruct: a SigLIP vision tower over the tiles and global view of every image, a
pixel-shuffle connector and a Llama language model (transformers models/idefics3/modeling_idefics3.py).

Idefics3Model.get_image_features casts the padded pixel values to the model dtype, drops all-zero padding images
(`pixel_values[real_images_inds]`: a gathered copy, also of the pixel_attention_mask), turns the pixel mask into a
patch mask and runs the vision tower on every view in one batch; an all-ones patch mask gives no attention mask under
sdpa or eager (`create_bidirectional_mask` skips it). Idefics3Connector
pixel-shuffles each view (two reshapes of permuted views: two copies) and projects it with one Linear; forward cats the
per-sample features (a copy) and scatters them into the <image> placeholders. The language model is LlamaModel
(model.py's LLaMA layers).

Mirrors transformers 5.23 models/idefics3/modeling_idefics3.py and models/smolvlm/modeling_smolvlm.py.
"""

from __future__ import annotations

from ...memory import ops
from ...memory.blocks import Context, apply_linear
from ...memory.model import BaseModel, ConditionalGenerationStep, LMAttention
from ...memory.siglip import SiglipVision
from ...memory.sim import Engine, Node, T
from ...memory.vision import batched_attention
from ...modules import PROJECTOR
from ...setup import TrainSetup


class Idefics3Vision(SiglipVision):
    """Idefics3VisionTransformer: Idefics3VisionEmbeddings (Conv2d on the pixel values as given, NaViT-style
    bucketed position ids per view from the patch mask, + position_embedding), the encoder, post_layernorm."""

    position_ids_buffer = False  # computed per view in forward

    def embeddings(self, e: Engine, pixel_values: T, images: int) -> T:
        v = self.v
        grid = v.image_size // v.patch_size
        tokens = images * self.positions
        patches = ops.conv2d(e, pixel_values, self.patch, self.patch_bias, tokens * v.hidden_size, name="patch_embeds")
        # position ids: boundaries, full((views, P), 0), per-view patch counts and steps, fractional coordinates,
        # bucketize, pos_ids = bucket_h * grid + bucket_w, torch.where(mask, pos_ids, position_ids)
        boundaries = e.new(grid - 1, "fp32", name="boundaries")
        position_ids = e.new(tokens, "int64", name="position_ids.zeros")
        counts = [e.new(images, "int64", name="nb_patches") for _ in range(2)]
        steps = [e.new(images, "fp32", name="step") for _ in range(2)]
        indices = [e.new(grid, "fp32", name="indices") for _ in range(2)]
        buckets = []
        for _ in range(2):
            coords = e.new(images * grid, "fp32", name="fractional_coords")
            clamped = e.new(images * grid, "fp32", name="fractional_coords.clamp")
            del coords
            buckets.append(e.new(images * grid, "int64", name="bucket_coords"))
            del clamped
        scaled = e.new(images * grid, "int64", name="bucket_h*grid")
        pos_ids = e.new(tokens, "int64", name="pos_ids")
        del scaled
        final_ids = e.new(tokens, "int64", name="position_ids")
        del boundaries, position_ids, counts, steps, indices, buckets, pos_ids
        pos = e.new(tokens * v.hidden_size, self.pos.dtype, name="position_embedding")
        # EmbeddingBackward keeps the indices when the table trains
        e.record(Node("embedding", [], [final_ids] if self.pos.trainable else [],
                      [self.pos] if self.pos.trainable else []), pos)
        del final_ids
        out = ops.add(e, patches, pos, name="embeddings")
        del patches, pos
        return e.hook_input(out)  # Idefics3VisionTransformer.get_input_embeddings() is the whole `embeddings`


class Idefics3Model(ConditionalGenerationStep, BaseModel):
    """Idefics3ForConditionalGeneration (Idefics3-8B-Llama3, SmolVLM-Instruct)."""

    @classmethod
    def text_layer_delta_shared(cls, spec) -> bool:
        """No: where the loss segment peaks depends on the image size, so one more language-model layer does not add
        the same to it at every size (tests/test_speed_shortcuts.py shows it)."""
        return False

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        super().__init__(e, setup, counts)
        spec = setup.model
        self.vision = Idefics3Vision(self, (counts or {}).get("vision", spec.vision.num_layers))
        proj = spec.projector
        self.proj = self.p.linear(PROJECTOR, "connector.modality_projection.proj", proj.in_features,
                                  proj.out_features, proj.bias)
        self.views = sum(t.views for t in setup.image_tokens()) * self.batch

    def inputs(self, e: Engine) -> dict[str, T]:
        v = self.setup.model.vision
        inputs = self.text_inputs(e)
        if self.views:
            inputs["pixel_values"] = e.new(self.views * v.in_channels * v.image_size ** 2, "fp32",
                                           name="pixel_values", category="inputs/batch")
            inputs["pixel_attention_mask"] = e.new(self.views * v.image_size ** 2, "int64",
                                                   name="pixel_attention_mask", category="inputs/batch")
        return inputs

    def _model_dtype(self) -> str:
        """`self.dtype` of the transformers model: the dtype of its first floating-point parameter (the vision
        tower's patch embedding)."""
        return self.vision.patch.dtype

    def image_features(self, e: Engine, inputs: dict[str, T]) -> tuple[T, T]:
        """Idefics3Model.get_image_features -> (vision last_hidden_state, connector output)."""
        v = self.setup.model.vision
        views, size = self.views, v.image_size
        pixels = ops.cast(e, inputs["pixel_values"], self._model_dtype(), name="pixel_values:cast")
        zeros = e.new(pixels.numel, "bool", name="pixel_values==0")
        per_image = e.new(views, "int64", name="zero_count")
        del zeros
        real = e.new(views, "bool", name="real_images_inds")
        del per_image
        real_count = e.new(self.batch, "int64", name="num_real_images_per_batch")
        gathered = e.new(pixels.numel, pixels.dtype, name="pixel_values[real]")  # a copy; IndexBackward: no grad
        del pixels
        pixel_mask = e.new(views * size * size, "int64", name="pixel_attention_mask[real]")
        grid = size // v.patch_size
        summed = e.new(views * grid * grid, "int64", name="patches_subgrid.sum")
        patch_mask = e.new(views * grid * grid, "bool", name="patch_attention_mask")
        del summed
        e.scope = "vision"
        # an all-ones patch mask: create_bidirectional_mask returns no mask (sdpa and eager alike)
        last = self.vision(self, e, gathered, views, batched_attention(self.setup, length=grid * grid))
        e.scope = "projector"
        shuffled = self.pixel_shuffle(e, last)
        features = apply_linear(e, shuffled, self.proj, "modality_projection.proj")
        del shuffled
        # get_image_features returns: its locals (the gathered pixels and masks, the split sizes) go
        del gathered, patch_mask, pixel_mask, real, real_count
        return last, features

    def pixel_shuffle(self, e: Engine, x: T) -> T:
        """Idefics3Connector.pixel_shuffle: view, view, permute, reshape (a copy), permute, reshape (a copy)."""
        first = e.new(x.numel, x.dtype, name="pixel_shuffle.reshape1")
        e.record(Node("copy", [x] if x.rg else [], [], []), first)
        second = e.new(x.numel, x.dtype, name="pixel_shuffle.reshape2")
        e.record(Node("copy", [first] if first.rg else [], [], []), second)
        del first
        return second

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        """Idefics3Model.forward up to the text model: embeddings, image features, torch.cat of the per-sample
        features (a copy), `.to(self.dtype)`, inputs_merger (input_ids == image_token_id, masked_scatter)."""
        x = self.embed_tokens(e)
        if not self.views:
            self._keep = ()
            return x
        last, features = self.image_features(e, inputs)
        e.scope = "language"
        cat = e.new(features.numel, features.dtype, name="image_hidden_states")
        e.record(Node("cat", [features] if features.rg else [], [], []), cat)
        cat = ops.cast(e, cat, self._model_dtype(), name="image_hidden_states:dtype")
        mask = e.new(self.tokens, "bool", name="special_image_mask")
        merged_in = ops.cast(e, cat, x.dtype, name="image_hidden_states:embeds_dtype")
        out = ops.masked_scatter(e, x, mask, merged_in, name="inputs_embeds:scatter")
        del merged_in, mask, x
        # mm_encoder_outputs (vision last_hidden_state, the connector output behind pooler_output) lives until
        # Idefics3Model.forward returns; image_hidden_states until the outputs are dropped
        self._keep = (last, features, cat)
        return out

    def language(self, e: Engine, x: T) -> T:
        """LlamaModel.forward: position_ids = arange(seq).unsqueeze(0) (an argument checkpointed layers keep), the
        causal mask (eager only), RoPE tables of (1, seq, head_dim) in the hidden dtype, the layers, the final norm.
        Idefics3Model.forward then returns: the vision outputs go, image_hidden_states stays with the outputs."""
        hd = self.setup.model.text.head_dim
        ctx = Context(tokens=self.tokens, attention=LMAttention(self.setup, self.batch, self.seq))
        ctx.position_ids = e.new(self.seq, "int64", name="position_ids")
        if self.setup.attn == "eager":
            ctx.attention.mask = e.new(self.batch * self.seq * self.seq, x.dtype, name="causal_mask")
        ctx.cos = e.new(self.seq * hd, x.dtype, name="cos")
        ctx.sin = e.new(self.seq * hd, x.dtype, name="sin")
        for layer in self.layers:
            x = self._run_layer(e, layer, x, ctx)
        out = ops.rms_norm(e, x, self.norm, self.tokens, name="norm")
        del x, ctx  # LlamaModel.forward returns: position_ids (and the eager mask) go
        self._outputs, self._keep = self._keep[2:], None  # image_hidden_states stays with the outputs
        return out


MODELS = {"idefics3": Idefics3Model, "smolvlm": Idefics3Model}
