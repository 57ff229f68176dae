"""Adapter stack on diffusers pipelines (issue 6): load time vs diffusers, strength changes, generation speed.

    python benchmarks/bench_pipelines.py                       # tiny + SD1.5 architecture, 2 rounds
    python benchmarks/bench_pipelines.py --quick               # smoke run: 1 round, fewest steps
    python benchmarks/bench_pipelines.py --models tiny --rounds 3 --update-readme
    python benchmarks/bench_pipelines.py --render benchmarks/results/pipelines_*.json --update-readme

Models: `tiny` = builtin:tiny-sd (64 px, 8 steps); `sd15` = the SD1.5 architecture with random fp32
weights (UNet 860M, CLIP-L-shaped text encoder, SD VAE), the diffusers folder bench_train.py writes under
--cache-dir (256 px = 32x32 latents, 3 steps). Every generation uses classifier-free guidance (UNet batch 2),
the model's DDIM scheduler and `pipelines.generate.generate` (the one generation code path).

Adapters (random N(0, 0.02) factors, so no path can skip work on ΔW = 0), preset attn-mlp (every Linear /
1x1 conv of the transformer blocks + CLIP attention/MLP): `lora` rank 16 / alpha 8 (kohya's default
module set, a file diffusers can load too), `loha` rank 8 / alpha 4, `lokr` rank 8 / alpha 4.
"1 adapter" = lora, "3 adapters" = lora + loha + lokr on the same layers (nested wrappers).

Each configuration runs in its own process, interleaved over rounds; workers report wall and process CPU
seconds. With --threads 1 (default: the machine is shared) CPU seconds barely move with other jobs' load,
so ratios use CPU seconds; with more threads they use wall seconds.

- load: `AdapterStack.add(name, file)` vs `pipe.load_lora_weights(file, adapter_name=...)` (the same LoRA
  file; undone untimed between repetitions: `stack.remove` / `pipe.unload_lora_weights()`).
- strength: one `set_strength` on the 3-adapter stack, unfused (attribute writes) and fused (re-fuse of
  that adapter's layers from the kept originals); diffusers: `set_adapters` unfused, and
  `unfuse_lora` + `set_adapters` + `fuse_lora` for a fused LoRA. Also `fuse()` / `unfuse()` themselves.
- generate: base (no adapters), unfused (AdapterStack default: collapsed single-op layers inside
  generate()), per-forward (`collapse=False`: each adapter runs beside the frozen weight in every forward),
  fused; with 1 and 3 adapters. Times of `gen_reps` generate() calls (5 on tiny, 1 on sd15) after one
  untimed warm-up generate(); the table shows the median over all rounds. "vs base" divides by the base
  configuration's own processes; "vs paired base" by a second, adapter-free copy of the model loaded in
  the same process and timed alternately with the adapted one (robust to other jobs' load; peak RSS
  then includes both copies).
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

ADAPTERS: dict[str, dict[str, Any]] = {
    "lora": {"algo": "lora", "rank": 16, "alpha": 8.0},
    "loha": {"algo": "loha", "rank": 8, "alpha": 4.0},
    "lokr": {"algo": "lokr", "rank": 8, "alpha": 4.0},
}
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"size": 64, "steps": 8, "load_reps": 5, "strength_reps": 5, "gen_reps": 5},
    "sd15": {"size": 256, "steps": 3, "load_reps": 3, "strength_reps": 2, "gen_reps": 1},
}
GEN_MODES = ("base", "unfused-1", "unfused-3", "per-forward-1", "per-forward-3", "fused-1", "fused-3")
MARKER = "pipelines-results"


# ----- worker side -----------------------------------------------------------------------------------
def _model_path(model: str, cache_dir: str) -> str:
    if model == "tiny":
        return "builtin:tiny-sd"
    from bench_train import prepare_sd15

    return str(prepare_sd15(Path(cache_dir)))


def _load(payload: dict[str, Any]):
    from pipelines.models import load_pipeline

    return load_pipeline(_model_path(payload["model"], payload["cache_dir"]))


def _adapter_files(payload: dict[str, Any]) -> dict[str, str]:
    folder = Path(payload["cache_dir"]) / "pipelines_adapters" / payload["model"]
    return {name: str(folder / f"{name}.safetensors") for name in ADAPTERS}


def prepare(payload: dict[str, Any]) -> dict[str, Any]:
    """Write the adapter files once per model (random factors, seeded)."""
    import torch

    from lyco import LycoNetwork, NetworkConfig, save_network

    files = _adapter_files(payload)
    if all(Path(f).exists() for f in files.values()):
        return {"files": files}
    pipe = _load(payload)
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        network = LycoNetwork.create(parts, NetworkConfig(preset="attn-mlp", **options))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in network.layers.values():
                for param in layer.adapter.values():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        Path(files[name]).parent.mkdir(parents=True, exist_ok=True)
        save_network(network, files[name], overwrite=True)
        network.remove()
    return {"files": files, "modules": len(network)}


class Clock:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> dict[str, float]:
        return {"wall": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu}


def ops_lyco(payload: dict[str, Any]) -> dict[str, Any]:
    from pipelines.stack import AdapterStack

    pipe, files = _load(payload), _adapter_files(payload)
    stack = AdapterStack(pipe)
    out: dict[str, list[dict[str, float]]] = {"load": [], "load-loha": [], "load-lokr": []}
    for _ in range(payload["load_reps"] + 1):  # the first repetition is a warm-up
        for key, name in (("load", "lora"), ("load-loha", "loha"), ("load-lokr", "lokr")):
            clock = Clock()
            stack.add(name, files[name])
            out[key].append(clock.stop())
            stack.remove(name)
    for name in ADAPTERS:
        stack.add(name, files[name], strength=0.7)
    out.update({"strength-unfused": [], "strength-fused": [], "fuse": [], "unfuse": []})
    for rep in range(payload["strength_reps"]):
        clock = Clock()
        stack.set_strength("lora", 0.5 + 0.1 * rep)
        out["strength-unfused"].append(clock.stop())
        clock = Clock()
        stack.fuse()
        out["fuse"].append(clock.stop())
        clock = Clock()
        stack.set_strength("lora", 0.6 + 0.1 * rep)
        out["strength-fused"].append(clock.stop())
        clock = Clock()
        stack.unfuse()
        out["unfuse"].append(clock.stop())
    return {"times": {k: v[1:] if k.startswith("load") else v for k, v in out.items()}}


def ops_diffusers(payload: dict[str, Any]) -> dict[str, Any]:
    pipe, files = _load(payload), _adapter_files(payload)
    out: dict[str, list[dict[str, float]]] = {"load": [], "strength-unfused": [], "strength-fused": [], "fuse": [], "unfuse": []}
    for rep in range(payload["load_reps"] + 1):
        clock = Clock()
        pipe.load_lora_weights(files["lora"], adapter_name=f"lora{rep}")
        out["load"].append(clock.stop())
        pipe.unload_lora_weights()
    pipe.load_lora_weights(files["lora"], adapter_name="lora")
    for rep in range(payload["strength_reps"]):
        clock = Clock()
        pipe.set_adapters(["lora"], adapter_weights=[0.5 + 0.1 * rep])
        out["strength-unfused"].append(clock.stop())
        clock = Clock()
        pipe.fuse_lora(adapter_names=["lora"], lora_scale=1.0)
        out["fuse"].append(clock.stop())
        clock = Clock()  # a strength change of a fused LoRA: unfuse, set, fuse again
        pipe.unfuse_lora()
        pipe.set_adapters(["lora"], adapter_weights=[0.6 + 0.1 * rep])
        pipe.fuse_lora(adapter_names=["lora"], lora_scale=1.0)
        out["strength-fused"].append(clock.stop())
        clock = Clock()
        pipe.unfuse_lora()
        out["unfuse"].append(clock.stop())
    out["load"] = out["load"][1:]
    return {"times": out}


def generate_worker(payload: dict[str, Any]) -> dict[str, Any]:
    from pipelines.generate import GenerationSettings, generate
    from pipelines.stack import AdapterStack

    pipe, files = _load(payload), _adapter_files(payload)
    mode = payload["mode"]
    stack = None
    # A second, untouched copy of the model, timed alternately with the adapted one in the same process:
    # the ratio of the two cancels the load other jobs put on the machine.
    plain = None if mode == "base" else _load(payload)
    if mode != "base":
        kind, count = mode.rsplit("-", 1)
        stack = AdapterStack(pipe, collapse=kind != "per-forward")
        for name in list(ADAPTERS)[: int(count)]:
            stack.add(name, files[name], strength=0.7)
        if kind == "fused":
            stack.fuse()
    size = payload["size"]
    warm = GenerationSettings(prompt="a red circle", seeds=(0,), steps=1, width=size, height=size)
    settings = GenerationSettings(prompt="a red circle", seeds=(1,), steps=payload["steps"], width=size, height=size)
    times: dict[str, list[dict[str, float]]] = {"generate": [], "generate-paired-base": []}
    for model, model_stack in ((pipe, stack), (plain, None)):
        if model is not None:
            generate(model, warm, stack=model_stack)
    for _ in range(payload.get("gen_reps", 1)):
        for key, model, model_stack in (("generate", pipe, stack), ("generate-paired-base", plain, None)):
            if model is None:
                continue
            clock = Clock()
            generate(model, settings, stack=model_stack)
            times[key].append(clock.stop())
    return {"times": times}


def worker_main() -> None:
    import torch

    payload = common.worker_payload()
    torch.set_num_threads(payload["threads"])
    runner = {"prepare": prepare, "ops-lyco": ops_lyco, "ops-diffusers": ops_diffusers, "generate": generate_worker}[payload["kind"]]
    result = runner(payload)
    common.emit_worker_result({"name": payload["name"], **result, **common.memory_snapshot()})


# ----- parent side -----------------------------------------------------------------------------------
def configs(models: list[str], base: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for model in models:
        shared = {**base, "model": model, **MODELS[model]}
        if base.get("quick"):
            shared.update(steps=2, load_reps=1, strength_reps=1, gen_reps=1)
        out += [{**shared, "kind": kind, "name": f"{model}/{kind}"} for kind in ("ops-lyco", "ops-diffusers")]
        out += [{**shared, "kind": "generate", "mode": mode, "name": f"{model}/generate/{mode}"} for mode in GEN_MODES]
    return out


def collect(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, float]]]]:
    merged: dict[str, dict[str, list[dict[str, float]]]] = {}
    for run in runs:
        for key, values in run.get("times", {}).items():
            merged.setdefault(run["name"], {}).setdefault(key, []).extend(values)
    return merged


def _median(values: list[dict[str, float]], metric: str) -> float | None:
    return common.summarize([v[metric] for v in values])["median"] if values else None


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def render(data: dict[str, Any]) -> str:
    metric = data["metric"]
    times = data["times"]
    lines = [f"Metric: median {'process CPU' if metric == 'cpu' else 'wall-clock'} seconds, {data['threads']} torch thread(s); "
             f"{data['date']}, load average at start {data.get('load_start')}."]
    for model in data["models"]:
        get = lambda name, key: _median(times.get(f"{model}/{name}", {}).get(key, []), metric)  # noqa: E731
        base = get("generate/base", "generate")
        rows = []
        for mode in GEN_MODES:
            value = get(f"generate/{mode}", "generate")
            peaks = [r["peak_rss"] for r in data["runs"] if r.get("name") == f"{model}/generate/{mode}" and "peak_rss" in r]
            paired = get(f"generate/{mode}", "generate-paired-base")
            rows.append([mode, _fmt_s(value), common.fmt_ratio(value / base if base and value else None),
                         common.fmt_ratio(value / paired if paired and value else None),
                         common.fmt_bytes(max(peaks) if peaks else None)])
        lines += ["", f"**{model}** — generation ({MODELS[model]['size']} px, {data['steps'][model]} steps, CFG):", "",
                  common.markdown_table(["mode", "time", "vs base", "vs paired base", "peak RSS (GiB; two model copies except base)"], rows)]
        lyco_load, dif_load = get("ops-lyco", "load"), get("ops-diffusers", "load")
        ops = [
            ["load LoRA file", _fmt_s(lyco_load), _fmt_s(dif_load), common.fmt_ratio(lyco_load / dif_load if lyco_load and dif_load else None)],
            ["load LoHa file", _fmt_s(get("ops-lyco", "load-loha")), "not supported", ""],
            ["load LoKr file", _fmt_s(get("ops-lyco", "load-lokr")), "not supported", ""],
            ["strength change, unfused", _fmt_s(get("ops-lyco", "strength-unfused")), _fmt_s(get("ops-diffusers", "strength-unfused")), ""],
            ["strength change, fused (re-fuse)", _fmt_s(get("ops-lyco", "strength-fused")), _fmt_s(get("ops-diffusers", "strength-fused")), ""],
            ["fuse", _fmt_s(get("ops-lyco", "fuse")), _fmt_s(get("ops-diffusers", "fuse")), ""],
            ["unfuse", _fmt_s(get("ops-lyco", "unfuse")), _fmt_s(get("ops-diffusers", "unfuse")), ""],
        ]
        lines += ["", f"**{model}** — operations (lyco: 3-adapter stack for strength/fuse rows; diffusers: the LoRA alone):", "",
                  common.markdown_table(["operation", "lyco", "diffusers", "lyco / diffusers"], ops)]
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> int:
    models = args.models.split(",")
    me = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    base = {"cache_dir": args.cache_dir, "threads": args.threads, "quick": args.quick}
    run_id = time.strftime("%Y%m%d-%H%M%S")
    logs = Path(args.cache_dir) / "runs" / f"pipelines-{run_id}"
    logs.mkdir(parents=True, exist_ok=True)
    for model in models:
        print(f"prepare {model} ...", flush=True)
        common.run_worker(me, {**base, "kind": "prepare", "model": model, "name": f"{model}/prepare"}, log_path=logs / f"{model}-prepare.log")
    load_start = common.load_average()
    runs = []
    rounds = 1 if args.quick else args.rounds
    for index, (round_index, config) in enumerate(common.interleaved_schedule(configs(models, base), rounds)):
        print(f"[{index + 1}] round {round_index} {config['name']} ...", flush=True)
        try:
            runs.append(common.run_worker(me, config, timeout=args.timeout, log_path=logs / f"{config['name'].replace('/', '_')}.log"))
        except common.WorkerError as err:
            print(f"    failed: {err}", flush=True)
    data = {
        "date": common.today(), "machine": common.machine_info(["torch", "diffusers", "peft", "transformers"]),
        "models": models, "threads": args.threads, "metric": "cpu" if args.threads == 1 else "wall", "rounds": rounds,
        "steps": {m: 2 if args.quick else MODELS[m]["steps"] for m in models}, "load_start": load_start,
        "times": collect(runs), "runs": runs,
    }
    out = common.write_json(HERE / "results" / f"pipelines_{common.today()}_{'-'.join(models)}{'_quick' if args.quick else ''}.json", data)
    print(f"wrote {out}\n")
    return finish(render(data), args)


def finish(text: str, args: argparse.Namespace) -> int:
    print(text)
    if args.update_readme and not common.replace_marked_block(HERE / "README.md", MARKER, text):
        print(f"README.md has no <!-- {MARKER}:start/end --> block; nothing written", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="tiny,sd15", help="comma-separated: tiny, sd15")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--cache-dir", default=os.environ.get("LYCO_BENCH_CACHE", "/tmp/lyco_bench_cache"))
    parser.add_argument("--render", nargs="+", metavar="JSON", help="render saved results (several files: their models side by side)")
    parser.add_argument("--update-readme", action="store_true", help=f"rewrite the <!-- {MARKER} --> block of benchmarks/README.md")
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    if args.render:
        import json

        texts = [render(json.loads(Path(p).read_text())) for p in args.render]
        return finish("\n\n".join(texts), args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
