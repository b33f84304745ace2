"""LLaVA-NeXT / LLaVA-1.6 (transformers models/llava_next/modeling_llava_next.py, `LlavaNextForConditionalGeneration`),
re-executed on symbolic tensors (see sim.py): CLIP on every anyres view, the LLaVA projector, then
`pack_image_features` lays each image's tile features out as a feature map, cuts the padding rows or columns
(`unpad_image`), appends `image_newline` to every row and puts the base view's 576 features first.

What the image path allocates (per image, D = LM width, under autocast in the half dtype):
- get_image_features: the real views of the padded `pixel_values` concatenated (an fp32 copy, alive until it returns);
- pack: `permute(...).contiguous()` copies the tile features; the unpadded map plus the newline column is a new
  tensor (the newline broadcast is copied only when its dtype differs, i.e. when the projector trains in fp32); the
  base view plus the transposed map is the image's packed features, kept as `pooler_output` until the model returns;
- forward: `torch.cat(pooler_output)` is the output's `image_hidden_states`.
Backward of that path (full fine-tuning): concatenations and views hand narrowed views of the incoming gradient on;
slices and selects allocate their whole input (`slice_backward` / `select_backward` fill zeros), a reshape of a
transposed or permuted gradient copies, and the split of the projector output gathers one full-size gradient.

Mirrors transformers 5.23 models/llava_next/modeling_llava_next.py.
"""

from __future__ import annotations

from ...memory.sim import Engine, Node, T
from ...memory.vision import LlavaProjector
from ...modules import PROJECTOR
from ...setup import TrainSetup
from ..llava.memory import LlavaBase
from .tokens import anyres_layout


def _view(e: Engine, x: T, numel: int, name: str, passthrough: bool) -> T:
    """A view op with its own autograd node: `passthrough` when its backward is a view of the incoming gradient
    (permute, transpose, flatten of a contiguous gradient, clone), otherwise its backward allocates the input's size
    (slice/select backward, or a reshape that must copy)."""
    out = x.view(numel, name=name)
    node = Node(name, [x] if x.rg else [], [], [])
    if passthrough:
        node.grad_dtype[0] = "passthrough"
    e.record(node, out)
    return out


def _cat(e: Engine, parts: list[T], dtype: str, name: str) -> T:
    """torch.cat: a new tensor; CatBackward narrows the gradient (views) for each input."""
    out = e.new(sum(t.numel for t in parts), dtype, name=name)
    inputs = [t for t in parts if t.rg]
    node = Node("cat", inputs, [], [])
    for index, t in enumerate(inputs):
        if t.dtype == dtype:
            node.grad_dtype[index] = "passthrough"
    e.record(node, out)
    return out


class LlavaNextModel(LlavaBase):
    """LlavaNextForConditionalGeneration: CLIP (vision_feature_layer -2, "default") on all views of all images as one
    batch, projector, pack_image_features, language model."""

    @classmethod
    def text_layer_delta_shared(cls, spec) -> bool:
        """No: where the loss segment peaks depends on the image size, so one more language-model layer does not add
        the same to it at every size (tests/test_speed_shortcuts.py shows it)."""
        return False

    def param_rank(self, p, rank: dict[str, int]) -> float:
        """image_newline is LlavaNextModel's own parameter: named_parameters yields it before the submodules'."""
        return -1 if p is getattr(self, "image_newline", None) else super().param_rank(p, rank)

    def __init__(self, e: Engine, setup: TrainSetup, counts: dict[str, int] | None) -> None:
        super().__init__(e, setup, counts)
        self._clip_params()
        self.projector = LlavaProjector(self.p)
        self.image_newline = self.p.vector(PROJECTOR, "image_newline", setup.model.text.hidden_size)
        self.images = setup.image_tokens() if setup.images else []
        self.n_images = len(self.images) * self.batch
        self.views = sum(t.views for t in self.images) * self.batch

    def inputs(self, e: Engine) -> dict[str, T]:
        """pixel_values (images, max views, 3, 336, 336) fp32 and image_sizes (images, 2) int64."""
        v = self.setup.model.vision
        inputs = self.text_inputs(e)
        if self.n_images:
            views = max(t.views for t in self.images)
            inputs["pixel_values"] = e.new(self.n_images * views * v.in_channels * v.image_size ** 2, "fp32",
                                           name="pixel_values", category="inputs/batch")
            inputs["image_sizes"] = e.new(self.n_images * 2, "int64", name="image_sizes", category="inputs/batch")
        return inputs

    def encode(self, e: Engine, inputs: dict[str, T]) -> T:
        x = self.embed_tokens(e)
        if not self.n_images:
            return x
        e.scope = "vision"
        v = self.setup.model.vision
        d = v.hidden_size
        grid = self.positions - 1
        # get_image_features: torch.cat of each image's real views (padding views dropped), alive until it returns
        pixels = e.new(self.views * v.in_channels * v.image_size ** 2, "fp32", name="pixel_values.cat")
        hidden, selected = self._clip(e, pixels, self.views)
        features = selected.view(self.views * grid * d, name="selected[:, 1:]")
        e.scope = "projector"
        projected = self.projector(e, features)
        del features
        e.scope = "language"  # pack_image_features is LlavaNextModel's own code
        packed = self._pack(e, projected)
        del projected
        # pack_image_features' feature_lens tensor, and image_outputs.pooler_output = the packed features
        feature_lens = e.new(self.n_images, "int64", name="feature_lens")
        self._pooled = None
        del feature_lens, pixels
        self._keep = (hidden, selected, packed)
        del hidden, selected
        return self._scatter(e, x, list(packed), narrow=True)

    def _pack(self, e: Engine, projected: T) -> list[T]:
        """LlavaNextModel.pack_image_features on the per-image splits of the projector output."""
        t = self.setup.model.text
        p = self.setup.model.processor
        dim = t.hidden_size
        grid = self.positions - 1
        dtype = projected.dtype
        chunks = _view(e, projected, projected.numel, "split", passthrough=False)  # gathers one full gradient
        out = []
        for image in self.images * self.batch:
            _, _, rows, columns = anyres_layout(p, *self._original_size(image))
            tiles = image.views - 1
            chunk = chunks.view(image.views * grid * dim, name="image_feature")
            base = _view(e, chunk, grid * dim, "image_feature[0]", passthrough=False)  # select_backward
            tile_features = _view(e, chunk, tiles * grid * dim, "image_feature[1:]", passthrough=False)
            del chunk
            # .view(nph, npw, 24, 24, -1): its backward reshapes a permuted gradient (a copy)
            grid_view = _view(e, tile_features, tile_features.numel, "view", passthrough=False)
            del tile_features
            permuted = _view(e, grid_view, grid_view.numel, "permute", passthrough=True)
            del grid_view
            feature_map = e.new(permuted.numel, dtype, name="permute.contiguous")
            node = Node("clone", [permuted] if permuted.rg else [], [], [])
            node.grad_dtype[0] = "passthrough"
            e.record(node, feature_map)
            del permuted
            unpadded = _view(e, feature_map, dim * rows * columns, "unpad_image", passthrough=False)
            del feature_map
            newline = self._newline(e, rows, dtype)
            with_newline = _cat(e, [unpadded, newline], dtype, "image_feature+newline")
            del unpadded, newline
            # .flatten(1, 2).transpose(0, 1): backward reshapes a transposed gradient (a copy)
            flat = _view(e, with_newline, with_newline.numel, "flatten.transpose", passthrough=False)
            del with_newline
            out.append(_cat(e, [base, flat], dtype, "packed_image_feature"))
            del base, flat
        return out

    def _original_size(self, image) -> tuple[int, int]:
        """The (width, height) the processor saw: after LLaMA-Factory's pre-resize (setup.image_tokens applies it)."""
        from ...tokens import llamafactory_preresize

        return llamafactory_preresize(image.width, image.height, self.setup.image_max_pixels,
                                      self.setup.image_min_pixels)

    def _newline(self, e: Engine, rows: int, dtype: str) -> T:
        """image_newline[:, None, None].expand(D, rows, 1).to(dtype): a view unless the dtype differs (an fp32
        trainable newline under autocast), then a copy whose backward sums the (D, rows) fp32 gradient into the
        parameter."""
        dim = self.setup.model.text.hidden_size
        param = self.image_newline
        if param.dtype == dtype:
            out = param.tensor.view(dim * rows, name="image_newline.expand")
            if param.trainable:
                e.record(Node("expand", [], [], [param]), out)
            return out
        out = e.new(dim * rows, dtype, name="image_newline.expand:cast")
        node = Node("expand_to_copy", [], [], [param] if param.trainable else [], workspace=dim * rows * 4)
        e.record(node, out)
        return out


MODELS = {"llava_next": LlavaNextModel}
