"""Quality bar of the shipped builtin:tiny-sd weights.

Every colour x shape x background prompt (4 x 4 x 3 = 48) is generated once, batched, with the
fixed steps, guidance and seed of pipelines.builtin.quality; a pixel statistic (`dominant_foreground_colour`: the palette hue most
saturated pixels are closest to; backgrounds are neutral) must find the prompt's colour in at
least 80% of the images.
"""

from __future__ import annotations

from pipelines.builtin.quality import QUALITY_GUIDANCE, QUALITY_STEPS, colour_hit_rate
from pipelines.models import load_pipeline
from pipelines.synthetic import quality_prompts


def test_tiny_sd_colour_hit_rate_at_least_80_percent():
    pipe = load_pipeline("builtin:tiny-sd")
    prompts = quality_prompts()
    assert len(prompts) >= 48 and QUALITY_STEPS <= 25
    report = colour_hit_rate(pipe, prompts=prompts, steps=QUALITY_STEPS, guidance_scale=QUALITY_GUIDANCE, seed=0)
    print(f"\ntiny-sd colour hit rate {report.hit_rate:.3f} over {len(prompts)} prompts; per colour {report.per_colour()}")
    misses = [(p, f) for p, e, f in zip(report.prompts, report.expected, report.found) if e != f]
    assert report.hit_rate >= 0.8, f"hit rate {report.hit_rate:.3f}; misses: {misses}"
