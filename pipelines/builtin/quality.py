"""The colour quality bar of the builtin tiny-sd model: generate the fixed prompt set, classify.

Used by the pretraining script (to watch progress) and by tests/test_tiny_quality.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pipelines.synthetic import ShapeSpec, dominant_foreground_colour, quality_prompts

QUALITY_STEPS = 20
QUALITY_GUIDANCE = 5.0
QUALITY_SEED = 0


@dataclass(frozen=True)
class ColourReport:
    """Outcome of `colour_hit_rate`: the hit rate and, per prompt, the colour that was found."""

    hit_rate: float
    prompts: tuple[str, ...]
    expected: tuple[str, ...]
    found: tuple[str, ...]

    def per_colour(self) -> dict[str, float]:
        rates: dict[str, list[bool]] = {}
        for want, got in zip(self.expected, self.found):
            rates.setdefault(want, []).append(want == got)
        return {colour: sum(hits) / len(hits) for colour, hits in rates.items()}


@torch.no_grad()
def colour_hit_rate(
    pipe: Any,
    *,
    prompts: Sequence[tuple[str, ShapeSpec]] | None = None,
    steps: int = QUALITY_STEPS,
    guidance_scale: float = QUALITY_GUIDANCE,
    seed: int = QUALITY_SEED,
    batch_size: int = 72,
) -> ColourReport:
    """Generate one image per prompt (all prompts batched) and check its foreground colour."""
    items = list(prompts) if prompts is not None else quality_prompts()
    found: list[str] = []
    generator = torch.Generator("cpu").manual_seed(seed)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = pipe(
            [text for text, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
        ).images
        found.extend(dominant_foreground_colour(image) for image in images)
    expected = tuple(spec.colour for _, spec in items)
    hits = sum(want == got for want, got in zip(expected, found))
    return ColourReport(hits / len(items), tuple(t for t, _ in items), expected, tuple(found))


@torch.no_grad()
def vae_round_trip(vae: Any, images: Sequence[Any]) -> list[Any]:
    """Encode (posterior mean) and decode `images` (PIL or HxWx3 uint8); returns uint8 arrays.

    What the autoencoder cannot carry, nothing trained on its latents can draw."""
    import numpy as np

    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images])
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.float().cpu()
    return [((d.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy() for d in decoded]
