"""Sample images during training through `pipelines.generate.generate`, the project's one generation code path."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.generate import GenerationSettings, generate

from .config import SamplingSection


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg_scale: float
    width: int
    height: int


def sample_requests(config: SamplingSection, resolution: tuple[int, int]) -> list[SampleRequest]:
    """Each prompt with the section's defaults filled in (prompt i: seed = sampling.seed + i)."""
    out = []
    for i, p in enumerate(config.prompts):
        out.append(SampleRequest(
            prompt=p.prompt,
            negative_prompt=p.negative_prompt if p.negative_prompt is not None else config.negative_prompt,
            seed=p.seed if p.seed is not None else config.seed + i,
            steps=p.steps or config.steps,
            cfg_scale=p.cfg_scale if p.cfg_scale is not None else config.cfg_scale,
            width=p.width or config.width or resolution[0],
            height=p.height or config.height or resolution[1],
        ))
    return out


def draw(pipe: Any, requests: list[SampleRequest], out_dir: Path, *, step: int) -> list[Path]:
    """Generate and save one PNG per request as `<out_dir>/step<N>-<i>.png`; global RNG untouched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for i, request in enumerate(requests):
            image = generate_one(pipe, request)
            path = out_dir / f"step{step:06d}-{i:02d}.png"
            image.save(path)
            paths.append(path)
    return paths


def generate_one(pipe: Any, request: SampleRequest):
    """One image for a request, with the adapters currently attached to `pipe` (the training network)."""
    settings = GenerationSettings(prompt=request.prompt, negative_prompt=request.negative_prompt, seeds=(request.seed,),
                                  steps=request.steps, guidance_scale=request.cfg_scale, width=request.width, height=request.height)
    return generate(pipe, settings).images[0]
