"""Training throughput: lyco-train vs a diffusers `train_text_to_image_lora.py`-style loop (peft LoRA).

    python benchmarks/bench_train.py                 # tiny + SD1.5 architecture, with and without latent caching
    python benchmarks/bench_train.py --quick         # smoke run: 1 warm-up + 2 steps, one round
    python benchmarks/bench_train.py --models tiny --steps 20 --rounds 3

Both trainers get the same data and settings: the synthetic concept images (kohya folder, captions
with the trigger word), UNet-only LoRA rank 4 / alpha 4 on every attention's to_q, to_k, to_v, to_out.0
(diffusers' script defaults; the worker checks both adapt the same number of modules), AdamW lr 1e-4,
constant schedule, max grad norm 1, fp32, no gradient checkpointing, center crop, no flips, the text
encoder frozen and run every step. "cache" precomputes the VAE latents once (lyco:
`dataset.cache_latents = "memory"`; the diffusers loop: a dict of latents computed before the loop,
which the original script does not do) and excludes that time from the measurement.

Models: `tiny` = builtin:tiny-sd (64 px images, batch 4); `sd15` = the SD1.5 architecture with random
fp32 weights (UNet 860M, CLIP-L-shaped text encoder, SD VAE; 256 px images = 32x32 latents, batch 1),
written once as a diffusers folder under --cache-dir.

Each (model, trainer, cache) runs in its own process, interleaved over rounds (A B C D, D C B A, ...),
and reports seconds per optimizer step over the steps after the warm-up (data loading included, model
loading and latent caching excluded) and its peak RSS.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import common  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"path": "builtin:tiny-sd", "resolution": 64, "batch": 4},
    "sd15": {"path": None, "resolution": 256, "batch": 1},
}
TRAINERS = ("lyco", "diffusers-peft")
RANK = 4
LR = 1e-4
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


# ----- shared inputs ---------------------------------------------------------------------------------
def prepare_data(cache_dir: Path, resolution: int) -> Path:
    from pipelines.synthetic import write_concept_dataset

    root = cache_dir / f"concept_{resolution}"
    if not root.exists():
        write_concept_dataset(root, n_images=16, repeats=1, size=resolution)
    return root


def prepare_sd15(cache_dir: Path) -> Path:
    """A diffusers folder with the SD1.5 architecture and random (seeded) fp32 weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = cache_dir / "sd15_random_pipeline"
    if (folder / "model_index.json").exists():
        return folder
    sys.path.insert(0, str(ROOT / "tests"))
    from sd_configs import SD15_UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768))
    tokenizer = CLIPTokenizer.from_pretrained(str(ROOT / "pipelines" / "builtin" / "tiny-sd" / "tokenizer"))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, folder)
    return folder


# ----- workers ---------------------------------------------------------------------------------------
def run_lyco(p: dict[str, Any]) -> dict[str, Any]:
    from trainers.config_io import validate
    from trainers.loop import Trainer

    config = validate({
        "model": {"path": p["model_path"]},
        "network": {"rank": RANK, "alpha": float(RANK), "preset": "attn-only", "train_text_encoder": False},
        "dataset": {"train_data_dir": p["data"], "resolution": p["resolution"], "batch_size": p["batch"],
                    "cache_latents": "memory" if p["cache"] else "none"},
        "training": {"max_train_steps": p["warmup"] + p["steps"], "seed": 0, "max_grad_norm": 1.0},
        "optimizer": {"type": "AdamW", "learning_rate": LR, "weight_decay": 1e-2},
        "saving": {"output_dir": p["workdir"], "output_name": "bench", "overwrite": True},
        "logging": {"trackers": []},
    })
    trainer = Trainer(config)
    marks: list[float] = []
    original = trainer.after_step

    def timed(*args, **kwargs):
        marks.append(time.perf_counter())
        return original(*args, **kwargs)

    trainer.after_step = timed
    trainer.train()
    return {"step_marks": marks, "modules": len(trainer.run.network)}


def run_diffusers(p: dict[str, Any]) -> dict[str, Any]:
    """The loop of diffusers' examples/text_to_image/train_text_to_image_lora.py, condensed."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipelines.models import resolve_model_path

    torch.manual_seed(0)
    folder = str(resolve_model_path(p["model_path"]))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    modules = sum(1 for name, m in unet.named_modules() if hasattr(m, "lora_A") and name.split(".")[-1] in ("to_q", "to_k", "to_v", "0"))
    params = [q for q in unet.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    size = p["resolution"]

    class Images(torch.utils.data.Dataset):
        """Decoded and transformed on access, like the script's `dataset.with_transform(preprocess_train)`."""

        def __init__(self) -> None:
            self.paths = sorted(Path(p["data"]).rglob("*.png"))
            self.latents: dict[int, torch.Tensor] = {}

        def __len__(self) -> int:
            return len(self.paths)

        def pixels(self, i: int) -> torch.Tensor:
            image = Image.open(self.paths[i]).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)  # Resize + CenterCrop
            return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            caption = self.paths[i].with_suffix(".txt").read_text().strip()
            ids = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
            if p["cache"]:
                return {"input_ids": ids, "latents": self.latents[i]}
            return {"input_ids": ids, "pixel_values": self.pixels(i)}

    examples = Images()
    if p["cache"]:
        with torch.no_grad():
            for i in range(len(examples)):
                examples.latents[i] = vae.encode(examples.pixels(i)[None]).latent_dist.sample()[0] * vae.config.scaling_factor

    def collate(batch):
        out = {"input_ids": torch.stack([b["input_ids"] for b in batch])}
        out["latents" if p["cache"] else "pixel_values"] = torch.stack([b["latents" if p["cache"] else "pixel_values"] for b in batch])
        return out

    loader = torch.utils.data.DataLoader(examples, shuffle=True, collate_fn=collate, batch_size=p["batch"], num_workers=0, drop_last=True)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=p["warmup"] + p["steps"])
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    unet.train()
    marks: list[float] = []
    step = 0
    while step < p["warmup"] + p["steps"]:
        for batch in loader:
            with accelerator.accumulate(unet):
                if p["cache"]:
                    latents = batch["latents"]
                else:
                    latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step += 1
            marks.append(time.perf_counter())
            if step >= p["warmup"] + p["steps"]:
                break
    return {"step_marks": marks, "modules": modules}


def worker() -> None:
    payload = common.worker_payload()
    import torch

    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    result = run_lyco(payload) if payload["trainer"] == "lyco" else run_diffusers(payload)
    marks = result["step_marks"][payload["warmup"] - 1:] if payload["warmup"] else result["step_marks"]
    intervals = [b - a for a, b in zip(marks, marks[1:])]
    common.emit_worker_result({"step_s": intervals, "modules": result["modules"], **common.memory_snapshot()})


# ----- parent ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run (default: tiny 20, sd15 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    parser.add_argument("--cache-dir", default="/tmp/lyco_bench_cache")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-load", type=float, default=None, help="wait for the 1-min load average to drop below this first")
    parser.add_argument("--out", default=str(HERE / "results" / f"train_{common.today()}.json"))
    parser.add_argument("--readme", default=str(HERE / "README.md"), help="README whose bench_train block gets the table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    if args.quick:
        args.warmup, args.rounds = 1, 1
    cache = Path(args.cache_dir)
    (cache / "runs").mkdir(parents=True, exist_ok=True)
    configs = []
    for model in args.models:
        spec = MODELS[model]
        steps = args.steps or (2 if args.quick else (20 if model == "tiny" else 5))
        path = spec["path"] or str(prepare_sd15(cache))
        data = str(prepare_data(cache, spec["resolution"]))
        for trainer in TRAINERS:
            for cached in (False, True):
                configs.append({"name": f"{model}/{trainer}/{'cache' if cached else 'no-cache'}", "model": model, "trainer": trainer,
                                "cache": cached, "model_path": path, "data": data, "resolution": spec["resolution"],
                                "batch": spec["batch"], "steps": steps, "warmup": args.warmup, "threads": args.threads,
                                "workdir": str(cache / "runs" / f"train_{model}_{trainer}_{cached}")})
    results: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c in configs}
    for round_index, config in common.interleaved_schedule(configs, args.rounds):
        common.wait_for_quiet(args.max_load, 600)
        result = common.run_worker([sys.executable, __file__, "--worker"], config, timeout=3600,
                                   log_path=cache / "runs" / "bench_train.log")
        results[config["name"]].append(result)
        median = common.summarize(result["step_s"]).get("median", float("nan"))
        print(f"round {round_index} {config['name']}: {median:.3f} s/step, peak RSS {common.fmt_bytes(result['peak_rss'])} GiB", flush=True)
    table = render(configs, results)
    print(table)
    common.write_json(args.out, {"machine": common.machine_info(["torch", "diffusers", "transformers", "accelerate", "peft"]),
                                 "configs": configs, "results": results})
    if not args.quick and not common.replace_marked_block(args.readme, "bench_train", table):
        print(f"(no bench_train markers in {args.readme}; table not written there)")
    return 0


def render(configs: list[dict[str, Any]], results: dict[str, list[dict[str, Any]]]) -> str:
    rows = []
    for config in configs:
        runs = results[config["name"]]
        steps = [s for r in runs for s in r["step_s"]]
        stats = common.summarize(steps)
        peer = f"{config['model']}/diffusers-peft/{'cache' if config['cache'] else 'no-cache'}"
        peer_steps = [s for r in results.get(peer, []) for s in r["step_s"]]
        ratio = (common.summarize(peer_steps)["median"] / stats["median"]) if peer_steps and stats.get("n") else None
        rows.append([config["name"], runs[0]["modules"] if runs else "", f"{1 / stats['median']:.2f}" if stats.get("n") else "–",
                     f"{stats.get('median', float('nan')):.3f}", f"{stats.get('rel_iqr', float('nan')):.0%}",
                     common.fmt_ratio(ratio), common.fmt_bytes(max((r["peak_rss"] for r in runs), default=None))])
    headers = ["model / trainer / latents", "adapted modules", "steps/s", "s/step (median)", "IQR/median", "speed vs diffusers+peft", "peak RSS GiB"]
    return common.markdown_table(headers, rows)


if __name__ == "__main__":
    raise SystemExit(main())
