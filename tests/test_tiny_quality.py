"""Quality bar of the shipped builtin:tiny-sd weights.

Every colour x shape x background prompt (4 x 4 x 3 = 48) is generated once, batched, with the
fixed steps, guidance and seed of pipelines.builtin.quality; a pixel statistic (`dominant_foreground_colour`: the palette hue most
saturated pixels are closest to; backgrounds are neutral) must find the prompt's colour in at
least 80% of the images.
"""

from __future__ import annotations

from pipelines.builtin.quality import QUALITY_GUIDANCE, QUALITY_STEPS, colour_hit_rate, vae_round_trip
from pipelines.models import load_pipeline
from pipelines.synthetic import (
    BACKGROUNDS,
    all_specs,
    concept_scores,
    dominant_foreground_colour,
    quality_prompts,
    render_concept,
    render_shape,
)


def test_tiny_sd_colour_hit_rate_at_least_80_percent():
    pipe = load_pipeline("builtin:tiny-sd")
    prompts = quality_prompts()
    assert len(prompts) >= 48 and QUALITY_STEPS <= 25
    report = colour_hit_rate(pipe, prompts=prompts, steps=QUALITY_STEPS, guidance_scale=QUALITY_GUIDANCE, seed=0)
    print(f"\ntiny-sd colour hit rate {report.hit_rate:.3f} over {len(prompts)} prompts; per colour {report.per_colour()}")
    misses = [(p, f) for p, e, f in zip(report.prompts, report.expected, report.found) if e != f]
    assert report.hit_rate >= 0.8, f"hit rate {report.hit_rate:.3f}; misses: {misses}"


def test_tiny_sd_vae_carries_the_concept_and_the_base_colours():
    """Anything trained on tiny-sd is drawn by its decoder: the concept's teal and the four base colours
    must survive an encode/decode round trip on every background (the first VAE turned teal blue)."""
    vae = load_pipeline("builtin:tiny-sd").vae
    for background in BACKGROUNDS:
        renders = [render_concept(seed=20_000 + s, background=background) for s in range(8)]
        scores = concept_scores(vae_round_trip(vae, renders))
        assert sum(s >= 0.5 for s in scores) >= 7, (background, [round(s, 2) for s in scores])
    specs = all_specs()
    decoded = vae_round_trip(vae, [render_shape(spec, seed=60_000 + i) for i, spec in enumerate(specs)])
    kept = [dominant_foreground_colour(image) == spec.colour for image, spec in zip(decoded, specs)]
    assert sum(kept) >= 0.95 * len(specs), [(s, dominant_foreground_colour(d)) for s, d, k in zip(specs, decoded, kept) if not k]
