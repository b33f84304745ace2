"""The heaviest samples of a dataset for a setup: the micro-batch that needs the most memory.

A sample's load is its language-model sequence length and its images (stored sizes; the estimate applies
LLaMA-Factory's pre-resize). The estimator grows with both (a longer sequence, a larger image, one more image), but
what weighs more, a long text or a large image, depends on the family (a Qwen image is 4x its language-model tokens
in encoder patches): so the samples are ranked by the estimate itself. Estimating every sample would cost seconds per
thousand samples; the heaviest sample has the most tokens or the most vision tokens in nearly every dataset, so
`heaviest_samples` estimates a shortlist: the `SHORTLIST_PER_KEY` x count samples with the most total tokens and as
many with the most vision tokens (ties: the lower index), each alone at micro-batch 1 in the setup.

`vlplan run` probes the micro-batch of the `batch_size` heaviest samples before training (runner/probe.py);
`vlplan plan --dataset` states it (planner/fit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import VlplanError
from .setup import TrainSetup

# Per sample the micro-batch needs: the shortlist holds this many times the micro-batch by each key
SHORTLIST_PER_KEY = 4


@dataclass(frozen=True)
class SampleLoad:
    """What one sample puts through the model: `tokens` in the language-model sequence (image tokens included),
    `vision_tokens` of them image placeholders, and its images as stored (W, H)."""

    index: int
    tokens: int
    vision_tokens: int
    images: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class RankedSample:
    load: SampleLoad
    peak_bytes: int | None  # the setup's estimated peak with this sample alone at micro-batch 1; None: refused
    refused: str | None = None  # why the setup refuses this sample (e.g. its images do not fit its length)

    def to_dict(self) -> dict:
        return {"index": self.load.index, "tokens": self.load.tokens, "vision_tokens": self.load.vision_tokens,
                "images": [f"{w}x{h}" for w, h in self.load.images], "estimate_peak_bytes": self.peak_bytes,
                **({"refused": self.refused} if self.refused else {})}


def loads_from_scan(scan) -> list[SampleLoad]:
    """Each scanned sample's load (planner.dataset.ScanResult: tokens and images per sample)."""
    return [SampleLoad(i, total, vision, tuple(sizes)) for i, (total, vision, sizes) in
            enumerate(zip(scan.total_tokens, scan.vision_tokens, scan.image_sizes))]


def sample_setup(setup: TrainSetup, load: SampleLoad) -> TrainSetup:
    """The setup with this sample's images and sequence length, at micro-batch 1 (raises VlplanError when the setup
    refuses the sample)."""
    return replace(setup, images=load.images, seq_len=max(load.tokens, 1), batch_size=1)


def heaviest_samples(setup: TrainSetup, loads: list[SampleLoad], count: int) -> list[RankedSample]:
    """The `count` heaviest samples (fewer when the data has fewer), heaviest first: by the setup's estimated peak
    with each alone at micro-batch 1, over the shortlist of the module docstring (ties: more tokens, then the
    lower index). A sample the setup refuses (its images' tokens above its length, a bound) ranks after every
    estimated one, by its tokens."""
    from .memory.estimate import estimate

    if count < 1:
        raise VlplanError(f"the micro-batch must be at least 1, got {count}")
    if not loads:
        raise VlplanError("the dataset has no samples")
    keep = SHORTLIST_PER_KEY * count
    by_tokens = sorted(loads, key=lambda s: (-s.tokens, s.index))[:keep]
    by_vision = sorted(loads, key=lambda s: (-s.vision_tokens, -s.tokens, s.index))[:keep]
    shortlist = {s.index: s for s in by_tokens + by_vision}
    peaks: dict[tuple, int | str] = {}  # (tokens, images) -> peak or why refused: equal loads estimate once
    ranked = []
    for load in shortlist.values():
        key = (load.tokens, load.images)
        if key not in peaks:
            try:
                peaks[key] = estimate(sample_setup(setup, load)).peak_bytes
            except VlplanError as err:
                peaks[key] = str(err)
        value = peaks[key]
        ranked.append(RankedSample(load, value, None) if isinstance(value, int) else RankedSample(load, None, value))
    ranked.sort(key=lambda r: (r.peak_bytes is None, -(r.peak_bytes or 0), -r.load.tokens, r.load.index))
    return ranked[:count]
