"""Core training-step benchmark: lyco vs peft vs lycoris-lora on the SD1.5 UNet (issue 2).

    python benchmarks/bench_core.py                 # full run (estimated 35-40 min on 2 idle cores)
    python benchmarks/bench_core.py --quick         # smoke run: every configuration, 1 warm-up + 1 step
    python benchmarks/bench_core.py --steps 16 --rounds 4 --only 'attn/lora'

Every configuration runs in its own process (clean peak RSS), in an interleaved order over several
rounds (A B C, C B A, ...) so that load drift from other jobs hits all configurations alike.

What one configuration measures, on the SD1.5-architecture UNet with random fp32 weights, CPU,
latents 1x4x32x32, text context 1x77x768, timestep 500:

- `floor`: the frozen UNet, forward + backward to the input latents only (no parameter gradients).
- `<preset>/<algo>/<tool>`: the same UNet with an adapter from `tool` on the `preset` modules, and one
  training step = forward + backward + AdamW step + zero_grad. The input latents require grad in every
  configuration (floor included), so every configuration back-propagates through the whole UNet and
  "overhead above the floor" is the adapter's cost alone.

Presets: `attn` = rank 16 / alpha 8 on to_q, to_k, to_v, to_out.0 of every Attention (128 modules);
`full` = rank 8 / alpha 4 on every Linear/Conv2d of transformer blocks, ResNet blocks, down/upsamplers,
conv_in/conv_out and the time embedding (282 modules). Every tool is checked to adapt exactly the same
module set (the worker reports the sorted module list's hash; the parent refuses to compare different sets).

Adapter weights are made non-zero before timing (the zero-initialised factor gets N(0, 0.02)), so no
implementation can skip work on a zero ΔW.

The UNet's random weights are generated once (seeded) and cached as a torch file (3.4 GB, default
/tmp/lyco_bench_cache, `--cache-dir`); workers memory-map it (`torch.load(mmap=True)`), which takes
under a second instead of ~10-25 s of random init. The mapped pages count in RSS once touched, so
peak RSS includes the 3.4 GB of frozen weights exactly as if they had been allocated.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import common  # noqa: E402

TOOLS = ("lyco", "peft", "lycoris", "lycoris-bypass")
# Diagnostic variants, only with --tools: lyco with a forced forward path; `lyco-alt` = lyco imported
# from the directory given by --alt-lyco (a candidate change measured side by side, interleaved).
EXTRA_TOOLS = ("lyco-rebuild", "lyco-bypass", "lyco-alt")
ALGOS = ("lora", "loha", "lokr")
PRESETS: dict[str, dict[str, Any]] = {
    "attn": {"rank": 16, "alpha": 8.0, "lyco_preset": "attn-only", "expected_modules": 128},
    "full": {"rank": 8, "alpha": 4.0, "lyco_preset": "full", "expected_modules": 282},
}
PEERS = ("peft", "lycoris", "lycoris-bypass")

# peft: target_modules as one regex, re.fullmatch()-ed against each module path.
PEFT_TARGETS = {
    "attn": r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "full": (
        r"conv_in|conv_out|time_embedding\.linear_[12]"
        r"|.*\.attentions\.\d+\.(proj_in|proj_out"
        r"|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
        r"|.*\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)"
        r"|.*\.(downsamplers|upsamplers)\.0\.conv"
    ),
}
# lycoris: an explicit preset file (LycorisNetwork.apply_preset keys). Its builtin presets are not usable
# as-is on a diffusers UNet: in the standalone wrapper (create_lycoris) only `enable_conv` of a builtin
# preset takes effect (its class lists are stored under unet_* keys that apply_preset ignores), so
# "attn-only" wraps every Linear (230 modules) and "full" every Linear/Conv2d; and the kohya entry point
# (lycoris.kohya.create_network, preset "full") fails on SD1 UNets with "duplicated lora name:
# lora_unet_time_embedding_linear_1" (TimestepEmbedding listed by class and its linears by name).
# The explicit `full` below is LyCORIS's full preset without the TimestepEmbedding class entry.
LYCORIS_PRESETS = {
    "attn": {
        "enable_conv": False,
        "target_module": [],
        "target_name": [r".*\.attn[12]\.to_(q|k|v)$", r".*\.attn[12]\.to_out\.0$"],
    },
    "full": {
        "enable_conv": True,
        "target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
        "target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
    },
}

LATENT_SHAPE = (1, 4, 32, 32)
CONTEXT_SHAPE = (1, 77, 768)
TIMESTEP = 500
ZERO_FACTOR_STD = 0.02


# =====================================================================================================
# worker side
# =====================================================================================================
def _unet_config() -> dict[str, Any]:
    from tests.sd_configs import SD15_UNET

    return dict(SD15_UNET)


def cache_path(cache_dir: str, seed: int) -> Path:
    import diffusers

    key = json.dumps({"config": _unet_config(), "seed": seed, "diffusers": diffusers.__version__}, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"sd15_unet_fp32_seed{seed}_{digest}.pt"


def prepare_cache(payload: dict[str, Any]) -> dict[str, Any]:
    import torch
    from diffusers import UNet2DConditionModel

    path = cache_path(payload["cache_dir"], payload["seed"])
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(payload["seed"])
        unet = UNet2DConditionModel(**_unet_config())
        tmp = path.with_suffix(".tmp")
        torch.save(unet.state_dict(), tmp)
        tmp.replace(path)
    return {"path": str(path), "bytes": path.stat().st_size}


def build_unet(payload: dict[str, Any]):
    import torch
    from diffusers import UNet2DConditionModel

    path = cache_path(payload["cache_dir"], payload["seed"]) if payload.get("cache_dir") else None
    if path is not None and path.exists():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**_unet_config())
        state = torch.load(path, mmap=True, weights_only=True)
        unet.load_state_dict(state, assign=True)
        source = "mmap-cache"
    else:
        torch.manual_seed(payload["seed"])
        unet = UNet2DConditionModel(**_unet_config())
        source = "random-init"
    unet.requires_grad_(False)
    unet.train()
    return unet, source


def _norm(path: str) -> str:
    return path.replace(".", "_")


def attach_lyco(unet, preset: str, algo: str, path: str = "auto"):
    from lyco.network import LycoNetwork
    from lyco.settings import NetworkConfig

    p = PRESETS[preset]
    config = NetworkConfig(algo=algo, rank=p["rank"], alpha=p["alpha"], preset=p["lyco_preset"], parts=("unet",), path=path)
    net = LycoNetwork.create({"unet": unet}, config)
    modules = [net.slot(k).path for k in net.layers]
    return net, list(net.parameters()), modules


def attach_peft(unet, preset: str, algo: str):
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    p = PRESETS[preset]
    target = PEFT_TARGETS[preset]
    if algo == "lora":
        config = LoraConfig(r=p["rank"], lora_alpha=p["alpha"], target_modules=target, lora_dropout=0.0)
    elif algo == "loha":
        config = LoHaConfig(r=p["rank"], alpha=p["alpha"], target_modules=target)
    else:
        config = LoKrConfig(r=p["rank"], alpha=p["alpha"], target_modules=target)
    inject_adapter_in_model(config, unet)
    modules = [n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    prefixes = ("lora_", "hada_", "lokr_")
    params = []
    for name, param in unet.named_parameters():
        trainable = any(f".{pre}" in name for pre in prefixes)
        param.requires_grad_(trainable)
        if trainable:
            params.append(param)
    return None, params, modules


def attach_lycoris(unet, preset: str, algo: str, bypass: bool, workdir: str):
    import toml
    from lycoris import create_lycoris

    p = PRESETS[preset]
    preset_file = Path(workdir) / f"lycoris_preset_{preset}.toml"
    preset_file.write_text(toml.dumps(LYCORIS_PRESETS[preset]))
    net = create_lycoris(unet, 1.0, linear_dim=p["rank"], linear_alpha=p["alpha"], algo=algo, preset=str(preset_file), bypass_mode=bypass)
    net.apply_to()
    net.requires_grad_(True)
    prefix = net.LORA_PREFIX + "_"
    modules = [lora.lora_name[len(prefix):] for lora in net.loras]
    return net, [q for q in net.parameters() if q.requires_grad], modules


def make_nonzero(params, seed: int) -> int:
    """Give every all-zero adapter tensor N(0, ZERO_FACTOR_STD) values; returns how many were zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for q in params:
            if not bool(q.any()):
                q.normal_(0.0, ZERO_FACTOR_STD, generator=g)
                count += 1
    return count


def run_config(payload: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    threads = payload.get("threads") or os.cpu_count() or 1
    torch.set_num_threads(threads)
    result: dict[str, Any] = {"name": payload["name"], "threads": threads, "load_start": common.load_average()}

    t0 = time.perf_counter()
    unet, source = build_unet(payload)
    result["unet_source"] = source
    result["build_s"] = time.perf_counter() - t0

    tool, preset, algo = payload["tool"], payload.get("preset"), payload.get("algo")
    t0 = time.perf_counter()
    net, params, modules = None, [], []
    if tool == "lyco":
        net, params, modules = attach_lyco(unet, preset, algo)
    elif tool in ("lyco-rebuild", "lyco-bypass"):
        net, params, modules = attach_lyco(unet, preset, algo, path=tool.split("-", 1)[1])
    elif tool == "lyco-alt":
        sys.path.insert(0, payload["alt_lyco"])
        net, params, modules = attach_lyco(unet, preset, algo)
    elif tool == "peft":
        net, params, modules = attach_peft(unet, preset, algo)
    elif tool in ("lycoris", "lycoris-bypass"):
        net, params, modules = attach_lycoris(unet, preset, algo, tool == "lycoris-bypass", payload["workdir"])
    elif tool != "floor":
        raise ValueError(f"unknown tool {tool!r}")
    switch = adapter_switch(tool, net, unet)
    result["attach_s"] = time.perf_counter() - t0
    if "lyco" in sys.modules:
        result["lyco_file"] = sys.modules["lyco"].__file__
    normed = sorted(_norm(m) for m in modules)
    result["modules"] = len(normed)
    result["module_set_sha1"] = hashlib.sha1("\n".join(normed).encode()).hexdigest()[:16] if normed else None
    result["trainable_tensors"] = len(params)
    result["trainable_params"] = int(sum(q.numel() for q in params))
    frozen_trainable = [n for n, q in unet.named_parameters() if q.requires_grad and all(q is not r for r in params)]
    if frozen_trainable:
        raise RuntimeError(f"UNet weights left trainable: {frozen_trainable[:5]}")
    result["zero_tensors_randomized"] = make_nonzero(params, payload["seed"] + 1)

    g = torch.Generator().manual_seed(payload["seed"] + 2)
    latents = torch.randn(LATENT_SHAPE, generator=g).requires_grad_(True)
    context = torch.randn(CONTEXT_SHAPE, generator=g)
    target = torch.randn(LATENT_SHAPE, generator=g)
    timestep = torch.tensor([TIMESTEP])
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step() -> dict[str, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        out = unet(latents, timestep, encoder_hidden_states=context, return_dict=False)[0]
        loss = F.mse_loss(out, target)
        w1 = time.perf_counter()
        loss.backward()
        w2 = time.perf_counter()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        latents.grad = None
        w3, c3 = time.perf_counter(), time.process_time()
        return {"step": w3 - w0, "fwd": w1 - w0, "bwd": w2 - w1, "opt": w3 - w2, "cpu": c3 - c0, "cpu_util": (c3 - c0) / max(w3 - w0, 1e-9), "loss": float(loss.detach())}

    gc.collect()
    warm = [step() for _ in range(payload["warmup"])]
    result["warmup_s"] = [s["step"] for s in warm]
    result.update(common.memory_snapshot("after_warmup_"))
    steps = [step() for _ in range(payload["steps"])]
    for key in ("step", "fwd", "bwd", "opt", "cpu"):
        result[f"{key}_s"] = [s[key] for s in steps]
    result["cpu_util"] = [s["cpu_util"] for s in steps]
    losses = [s["loss"] for s in warm + steps]
    result["loss_first"], result["loss_last"] = (losses[0], losses[-1]) if losses else (None, None)
    result["loss_finite"] = all(math.isfinite(v) for v in losses)
    result.update(common.memory_snapshot())
    if payload.get("module_reps") and switch is not None:
        inputs = record_module_inputs(unet, set(normed), lambda: unet(latents, timestep, encoder_hidden_states=context))
        clear_grads = (lambda: optimizer.zero_grad(set_to_none=True)) if optimizer is not None else (lambda: None)
        result["module_timing"] = time_modules(inputs, switch, clear_grads, payload["module_reps"])
    result["load_end"] = common.load_average()
    return result


def adapter_switch(tool: str, net, unet) -> Optional[Callable[[bool], None]]:
    """A function turning every adapter of the tool off (the frozen UNet alone runs) and on again."""
    if tool in ("lyco", "lyco-rebuild", "lyco-bypass", "lyco-alt"):
        layers = list(net.layers.values())

        def switch(on: bool) -> None:
            for layer in layers:
                layer.enabled = on
    elif tool == "peft":
        from peft.tuners.tuners_utils import BaseTunerLayer

        tuner_layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]

        def switch(on: bool) -> None:
            for layer in tuner_layers:
                layer.enable_adapters(on)
    elif tool in ("lycoris", "lycoris-bypass"):
        # lycoris hooks by replacing `forward` on the wrapped module; swap the two bound methods
        hooked = [(lora.org_module[0], lora.forward, lora.org_forward) for lora in net.loras]

        def switch(on: bool) -> None:
            for module, adapted, original in hooked:
                module.forward = adapted if on else original
    else:
        return None
    return switch


def record_module_inputs(unet, module_set: set[str], forward: Callable[[], Any]) -> list[tuple[str, Any, Any]]:
    """(path, module, input) of every adapted module, the input captured during one UNet forward."""
    import torch

    targets = [(name, m) for name, m in unet.named_modules() if _norm(name) in module_set]
    captured: dict[str, Any] = {}

    def keep_input(name: str) -> Callable[..., None]:
        def hook(module, args, output) -> None:  # returning None keeps the module's output
            captured.setdefault(name, args[0].detach().clone())

        return hook

    hooks = [m.register_forward_hook(keep_input(name)) for name, m in targets]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    return [(name, m, captured[name]) for name, m in targets if name in captured]


def time_modules(inputs, switch: Callable[[bool], None], clear_grads: Callable[[], None], reps: int) -> dict[str, Any]:
    """CPU seconds of forward + backward (to the input and the adapter) of every adapted module on
    its recorded input, adapters on and off, `reps` calls each way twice (on, off, off, on).

    The sum over modules of median(on) − median(off) is the adapters' cost per training step
    without the optimizer, resolved far below the step-to-step noise of whole-UNet timings."""
    import torch

    def timed(module, x, grad_out) -> float:
        c0 = time.process_time()
        module(x).backward(grad_out)
        c1 = time.process_time()
        x.grad = None
        clear_grads()
        return c1 - c0

    per_module = []
    for name, module, recorded in inputs:
        x = recorded.requires_grad_(True)
        with torch.no_grad():
            grad_out = torch.randn_like(module(x))
        on: list[float] = []
        off: list[float] = []
        for phase in (True, False, False, True):
            switch(phase)
            timed(module, x, grad_out)  # untimed: the first call after a switch
            (on if phase else off).extend(timed(module, x, grad_out) for _ in range(reps))
        switch(True)
        on_s, off_s = common.summarize(on)["median"], common.summarize(off)["median"]
        per_module.append({"module": name, "shape": list(x.shape), "on_s": on_s, "off_s": off_s})
    return {
        "reps": reps,
        "modules": len(per_module),
        "on_s": sum(m["on_s"] for m in per_module),
        "off_s": sum(m["off_s"] for m in per_module),
        "overhead_s": sum(m["on_s"] - m["off_s"] for m in per_module),
        "per_module": per_module,
    }


def worker_main() -> None:
    payload = common.worker_payload()
    if payload.get("kind") == "prepare":
        common.emit_worker_result(prepare_cache(payload))
        return
    common.emit_worker_result(run_config(payload))


# =====================================================================================================
# parent side
# =====================================================================================================
def config_list(tools: tuple[str, ...], algos: tuple[str, ...], presets: tuple[str, ...]) -> list[dict[str, Any]]:
    configs = [{"name": "floor", "tool": "floor"}]
    for preset in presets:
        for algo in algos:
            for tool in tools:
                configs.append({"name": f"{preset}/{algo}/{tool}", "tool": tool, "preset": preset, "algo": algo})
    return configs


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the timed steps of every round of one configuration."""
    first = runs[0]
    pooled = {key: [v for r in runs for v in r[key]] for key in ("step_s", "fwd_s", "bwd_s", "opt_s", "cpu_s", "cpu_util")}
    shas = {r["module_set_sha1"] for r in runs}
    return {
        "name": first["name"],
        "rounds": len(runs),
        "modules": first["modules"],
        "module_set_sha1": first["module_set_sha1"] if len(shas) == 1 else sorted(map(str, shas)),
        "trainable_params": first["trainable_params"],
        "trainable_tensors": first["trainable_tensors"],
        "zero_tensors_randomized": first["zero_tensors_randomized"],
        "step": common.summarize(pooled["step_s"]),
        "fwd": common.summarize(pooled["fwd_s"]),
        "bwd": common.summarize(pooled["bwd_s"]),
        "opt": common.summarize(pooled["opt_s"]),
        "cpu": common.summarize(pooled["cpu_s"]),
        "cpu_util": common.summarize(pooled["cpu_util"]),
        "round_medians": [common.summarize(r["step_s"])["median"] for r in runs],
        "peak_rss": max(r["peak_rss"] for r in runs),
        "peak_rss_rounds": [r["peak_rss"] for r in runs],
        "after_warmup_rss": max(r["after_warmup_rss"] for r in runs),
        "loss_finite": all(r["loss_finite"] for r in runs),
        "attach_s": [r["attach_s"] for r in runs],
        "load": [r.get("load_start") for r in runs],
        "module_overhead_s": (
            statistics.median(r["module_timing"]["overhead_s"] for r in runs) if all("module_timing" in r for r in runs) else None
        ),
        "module_off_s": (
            statistics.median(r["module_timing"]["off_s"] for r in runs) if all("module_timing" in r for r in runs) else None
        ),
    }


def analyse(agg: dict[str, dict[str, Any]], metric: str) -> dict[str, Any]:
    """Ratios to the floor and to the peers, and the issue-2 targets per (preset, algo), on `metric`
    ("step" = wall-clock seconds per step, "cpu" = process CPU seconds per step)."""
    floor = agg["floor"][metric]["median"]
    floor_rss = agg["floor"]["peak_rss"]
    for a in agg.values():
        med = a[metric]["median"]
        a["ratio_to_floor"] = med / floor
        a["overhead_s"] = med - floor
        a["rss_over_floor"] = a["peak_rss"] - floor_rss
    verdicts = []
    for preset in PRESETS:
        for algo in ALGOS:
            peers = {t: agg[f"{preset}/{algo}/{t}"] for t in PEERS if f"{preset}/{algo}/{t}" in agg}
            for candidate in ("lyco", "lyco-alt"):
                lyco = agg.get(f"{preset}/{algo}/{candidate}")
                if lyco is None or not peers:
                    continue
                best_name = min(peers, key=lambda t: peers[t]["overhead_s"])
                best = peers[best_name]
                # A peer at or below the floor (within noise) cannot be halved: then lyco must simply not exceed it.
                overhead_ratio = lyco["overhead_s"] / best["overhead_s"] if best["overhead_s"] > 0 else None
                overhead_met = lyco["overhead_s"] <= (0.5 * best["overhead_s"] if best["overhead_s"] > 0 else best["overhead_s"])
                time_ratios = {t: lyco[metric]["median"] / p[metric]["median"] for t, p in peers.items()}
                rss_diffs = {t: lyco["peak_rss"] - p["peak_rss"] for t, p in peers.items()}
                if candidate == "lyco":
                    for t, p in peers.items():
                        p["lyco_time_ratio"] = time_ratios[t]
                        p["lyco_overhead_ratio"] = lyco["overhead_s"] / p["overhead_s"] if p["overhead_s"] > 0 else None
                        p["lyco_rss_diff"] = rss_diffs[t]
                lyco["overhead_ratio_vs_best_peer"] = overhead_ratio
                module_verdict = _module_verdict(lyco, peers)
                verdicts.append(
                    {
                        "preset": preset,
                        "algo": algo,
                        "candidate": candidate,
                        "lyco_overhead_s": lyco["overhead_s"],
                        "best_peer": best_name,
                        "best_peer_overhead_s": best["overhead_s"],
                        "overhead_ratio": overhead_ratio,
                        "overhead_target_met": overhead_met,
                        "time_ratio_vs_peers": time_ratios,
                        "never_slower": all(r <= 1.0 for r in time_ratios.values()),
                        "rss_diff_vs_peers": rss_diffs,
                        "memory_target_met": all(d <= 0 for d in rss_diffs.values()),
                        **module_verdict,
                    }
                )
    return {"metric": metric, "floor_s": floor, "floor_peak_rss": floor_rss, "verdicts": verdicts}


def _module_verdict(lyco: dict[str, Any], peers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The overhead targets on the module-level overheads (`--module-reps`), when every tool has them.
    The frozen layers are the same in every tool, so "lyco time ≤ peer time" is "lyco overhead ≤ peer's"."""
    overheads = {t: p.get("module_overhead_s") for t, p in peers.items()}
    ours = lyco.get("module_overhead_s")
    if ours is None or any(v is None for v in overheads.values()):
        return {}
    best = min(overheads, key=overheads.get)
    return {
        "module_lyco_overhead_s": ours,
        "module_best_peer": best,
        "module_best_peer_overhead_s": overheads[best],
        "module_overhead_ratio": ours / overheads[best] if overheads[best] > 0 else None,
        "module_overhead_target_met": ours <= 0.5 * overheads[best],
        "module_never_slower": all(ours <= v for v in overheads.values()),
    }


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


METRIC_LABEL = {"step": "wall-clock s/step", "cpu": "CPU s/step"}


def render_tables(agg: dict[str, dict[str, Any]], analysis: dict[str, Any]) -> str:
    metric = analysis["metric"]
    floor = agg["floor"]
    f = floor[metric]
    lines = [
        f"Ratios and overheads below use **{METRIC_LABEL[metric]}** (median over all timed steps of all rounds).",
        "",
        f"Floor (frozen UNet, forward + backward to the input): **{f['median']:.2f} s** "
        f"(p25–p75 {f['p25']:.2f}–{f['p75']:.2f} s, n={f['n']}; wall {floor['step']['median']:.2f} s, CPU {floor['cpu']['median']:.2f} s), "
        f"peak RSS {common.fmt_bytes(floor['peak_rss'])} GiB.",
        "",
    ]
    headers = [
        "algo", "tool", "params", f"{metric} s median", "p25–p75", "wall s", "CPU s", "fwd / bwd / opt (wall s)",
        "× floor", "overhead s", "lyco overhead ÷ this", "lyco time ÷ this", "peak RSS GiB", "RSS − floor GiB",
    ]
    show_modules = any(a.get("module_overhead_s") is not None for a in agg.values())
    if show_modules:
        headers.append("module overhead s (of frozen-layer s)")
    for preset, p in PRESETS.items():
        rows = []
        for algo in ALGOS:
            for tool in TOOLS + EXTRA_TOOLS:
                a = agg.get(f"{preset}/{algo}/{tool}")
                if a is None:
                    continue
                is_lyco = tool in ("lyco", "lyco-alt")
                s = a[metric]
                if is_lyco:
                    ratio = a.get("overhead_ratio_vs_best_peer")
                    overhead_cell = f"{common.fmt_ratio(ratio)} (vs best)" if ratio is not None else "n/a"
                else:
                    overhead_cell = common.fmt_ratio(a.get("lyco_overhead_ratio"))
                rows.append(
                    [
                        algo if tool == "lyco" else "",
                        f"**{tool}**" if is_lyco else tool,
                        f"{a['trainable_params'] / 1e6:.2f}M",
                        f"{s['median']:.2f}",
                        f"{s['p25']:.2f}–{s['p75']:.2f}",
                        f"{a['step']['median']:.2f}",
                        f"{a['cpu']['median']:.2f}",
                        f"{a['fwd']['median']:.2f} / {a['bwd']['median']:.2f} / {a['opt']['median']:.2f}",
                        common.fmt_ratio(a["ratio_to_floor"]),
                        f"{a['overhead_s']:+.2f}",
                        overhead_cell,
                        "" if is_lyco else common.fmt_ratio(a.get("lyco_time_ratio")),
                        common.fmt_bytes(a["peak_rss"]),
                        f"{a['rss_over_floor'] / common.GIB:+.2f}",
                    ]
                )
                if show_modules:
                    ov, off = a.get("module_overhead_s"), a.get("module_off_s")
                    rows[-1].append(f"{ov:+.3f} (of {off:.2f})" if ov is not None else "")
        if rows:
            lines.append(f"**{preset}** (rank {p['rank']}, alpha {p['alpha']:g}, {p['expected_modules']} modules in every tool, lyco preset `{p['lyco_preset']}`)")
            lines.append("")
            lines.append(common.markdown_table(headers, rows, "ll" + "r" * (len(headers) - 2)))
            lines.append("")
    if analysis["verdicts"]:
        rows = []
        for v in analysis["verdicts"]:
            slowest = max(v["time_ratio_vs_peers"].values())
            rows.append(
                [
                    f"{v['preset']}/{v['algo']}" + (" (lyco-alt)" if v["candidate"] != "lyco" else ""),
                    f"{v['lyco_overhead_s']:+.2f}",
                    f"{v['best_peer']} {v['best_peer_overhead_s']:+.2f}",
                    f"{common.fmt_ratio(v['overhead_ratio']) if v['overhead_ratio'] is not None else 'n/a (peer ≤ floor)'} {_yes(v['overhead_target_met'])}",
                    f"{common.fmt_ratio(slowest)} {_yes(v['never_slower'])}",
                    f"{max(v['rss_diff_vs_peers'].values()) / common.GIB:+.2f} {_yes(v['memory_target_met'])}",
                ]
            )
        module_rows = [
            [
                f"{v['preset']}/{v['algo']}" + (" (lyco-alt)" if v["candidate"] != "lyco" else ""),
                f"{v['module_lyco_overhead_s']:+.3f}",
                f"{v['module_best_peer']} {v['module_best_peer_overhead_s']:+.3f}",
                f"{common.fmt_ratio(v['module_overhead_ratio']) if v['module_overhead_ratio'] is not None else 'n/a'} {_yes(v['module_overhead_target_met'])}",
                _yes(v["module_never_slower"]),
            ]
            for v in analysis["verdicts"] if "module_lyco_overhead_s" in v
        ]
        if module_rows:
            lines.append(
                "Targets on the module-level overheads (per adapted module: median CPU s of forward + backward with the "
                "adapters on − off, summed over the modules; no optimizer):"
            )
            lines.append("")
            lines.append(
                common.markdown_table(
                    ["preset/algo", "lyco module overhead s", "best peer, its module overhead s", "overhead ratio ≤ 0.50", "lyco overhead ≤ every peer's"],
                    module_rows,
                )
            )
            lines.append("")
        lines.append("Targets (lyco overhead ≤ 0.5 × best peer's; lyco time ≤ every peer's; lyco peak RSS ≤ every peer's):")
        lines.append("")
        lines.append(
            common.markdown_table(
                ["preset/algo", "lyco overhead s", "best peer, its overhead s", "overhead ratio ≤ 0.50", "max lyco/peer time ≤ 1", "max lyco − peer RSS GiB ≤ 0"],
                rows,
            )
        )
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> int:
    tools = tuple(args.tools.split(",")) if args.tools else TOOLS
    if args.alt_lyco and "lyco-alt" not in tools:
        tools += ("lyco-alt",)
    if "lyco-alt" in tools and not args.alt_lyco:
        raise SystemExit("--tools lyco-alt needs --alt-lyco DIR")
    algos = tuple(args.algos.split(",")) if args.algos else ALGOS
    presets = tuple(args.presets.split(",")) if args.presets else tuple(PRESETS)
    configs = config_list(tools, algos, presets)
    if args.only:
        import re

        configs = [c for c in configs if c["name"] == "floor" or re.search(args.only, c["name"])]
    if args.quick:
        args.steps, args.rounds, args.warmup = 1, 1, 1
    steps_per_round = max(1, math.ceil(args.steps / args.rounds))
    run_id = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    workdir = Path(args.cache_dir) / "runs" / run_id
    workdir.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    info = common.machine_info(["torch", "diffusers", "peft", "lycoris-lora", "lyco"])
    print(f"# bench_core {run_id}: {len(configs)} configurations x {args.rounds} rounds x ({args.warmup} warm-up + {steps_per_round} timed steps)")
    print(f"# machine: {info['cpu']}, {info['logical_cpus']} CPUs, load {info['load_average']}; logs in {workdir}", flush=True)

    t_start = time.perf_counter()
    prep = common.run_worker(me, {"kind": "prepare", "cache_dir": args.cache_dir, "seed": args.seed, "name": "prepare"}, log_path=workdir / "prepare.log")
    print(f"# UNet weights: {prep['path']} ({prep['bytes'] / common.GIB:.2f} GiB), {prep['wall_s']:.0f} s", flush=True)

    runs: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c in configs}
    partial_path = HERE / "results" / f"core_{common.today()}{'_quick' if args.quick else ''}.partial.json"
    failures: dict[str, str] = {}
    schedule = common.interleaved_schedule(configs, args.rounds)
    for i, (rnd, config) in enumerate(schedule, 1):
        if config["name"] in failures:
            continue
        load = common.wait_for_quiet(args.max_load, args.max_wait)
        payload = {
            **config,
            "seed": args.seed,
            "cache_dir": args.cache_dir,
            "warmup": args.warmup,
            "steps": steps_per_round,
            "threads": args.threads,
            "workdir": str(workdir),
            "alt_lyco": args.alt_lyco,
            "module_reps": args.module_reps,
        }
        log_path = workdir / (config["name"].replace("/", "_") + ".log")
        try:
            r = common.run_worker(me, payload, timeout=args.timeout, log_path=log_path)
        except common.WorkerError as err:
            failures[config["name"]] = str(err)
            print(f"[{i}/{len(schedule)}] r{rnd} {config['name']:<28} FAILED: {err}", flush=True)
            continue
        r["round"] = rnd
        runs[config["name"]].append(r)
        # Keep what is done so far: `--render` turns a partial file into tables if the run is cut short.
        common.write_json(
            partial_path,
            {
                "benchmark": "core", "run_id": run_id, "date": common.today(), "quick": args.quick, "partial": True,
                "settings": {"warmup": args.warmup, "steps_per_round": steps_per_round, "rounds": args.rounds, "threads": args.threads or os.cpu_count(), "module_reps": args.module_reps},
                "machine": info, "failures": failures, "raw": {k: v for k, v in runs.items() if v},
            },
        )
        s = common.summarize(r["step_s"])
        print(
            f"[{i}/{len(schedule)}] r{rnd} {config['name']:<28} step {s['median']:6.2f} s (min {s['min']:.2f}, max {s['max']:.2f}) "
            f"cpu {common.summarize(r['cpu_s'])['median']:.2f} s (util {common.summarize(r['cpu_util'])['median']:.2f}) peak {r['peak_rss'] / common.GIB:5.2f} GiB modules {r['modules']:3d} "
            f"load {load if load is None else round(load, 2)} wall {r['wall_s']:.0f} s",
            flush=True,
        )

    code = finish(args, {k: v for k, v in runs.items() if v}, failures, info, run_id, t_start)
    partial_path.unlink(missing_ok=True)
    return code


def finish(
    args: argparse.Namespace,
    runs: dict[str, list[dict[str, Any]]],
    failures: dict[str, str],
    info: dict[str, Any],
    run_id: str,
    t_start: float,
    json_path: Path | None = None,
    saved: dict[str, Any] | None = None,
) -> int:
    """Aggregate, analyse, write JSON + markdown, print the tables (also used by --render)."""
    steps_per_round = max(1, math.ceil(args.steps / args.rounds))
    agg = {name: aggregate(rs) for name, rs in runs.items() if rs}
    problems = check_module_sets(agg)
    for name, a in agg.items():
        if not a["loss_finite"]:
            problems.append(f"{name}: non-finite loss")
    if "floor" not in agg:
        print("floor failed; nothing to compare", file=sys.stderr)
        return 1
    primary = args.primary if args.primary != "auto" else ("cpu" if (args.threads or os.cpu_count()) == 1 else "step")
    primary = {"wall": "step"}.get(primary, primary)
    other = "cpu" if primary == "step" else "step"
    analysis_other = analyse(agg, other)  # first, so that the primary metric's ratios stay in agg
    analysis = analyse(agg, primary)
    tables = render_tables(agg, analysis)
    elapsed = time.perf_counter() - t_start if t_start else (saved or {}).get("elapsed_s")
    date = (saved or {}).get("date") or common.today()
    out = {
        "benchmark": "core",
        "run_id": run_id,
        "date": date,
        "quick": args.quick,
        "settings": {
            "latents": LATENT_SHAPE, "context": CONTEXT_SHAPE, "timestep": TIMESTEP, "dtype": "float32", "device": "cpu",
            "warmup": args.warmup, "steps_per_round": steps_per_round, "rounds": args.rounds, "threads": args.threads or os.cpu_count(),
            "module_reps": args.module_reps,
            "presets": PRESETS, "peft_targets": PEFT_TARGETS, "lycoris_presets": LYCORIS_PRESETS, "zero_factor_std": ZERO_FACTOR_STD,
            "optimizer": "torch.optim.AdamW(lr=1e-5), zero_grad(set_to_none=True)",
        },
        "machine": info,
        "elapsed_s": elapsed,
        "load_average_end": (saved or {}).get("load_average_end") or common.load_average(),
        "failures": failures,
        "problems": problems,
        "analysis": analysis,
        "analysis_other_metric": analysis_other,
        "configs": agg,
        "raw": runs,
    }
    for key in ("merged_from", "sources", "notes"):
        if saved and key in saved:
            out[key] = saved[key]
    suffix = "_quick" if args.quick else ""
    json_path = json_path or (Path(args.out) if args.out else HERE / "results" / f"core_{date}{suffix}.json")
    common.write_json(json_path, out)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(tables + "\n")
    print()
    print(tables)
    print()
    if elapsed is not None:
        print(f"# elapsed {elapsed / 60:.1f} min; load at the end {out['load_average_end']}")
    print(f"# results: {json_path}")
    if args.update_readme:
        ok = common.replace_marked_block(HERE / "README.md", "core-results", f"Run `{run_id}` ({date}, commit {info['git_commit']}):\n\n" + tables)
        print("# README table updated" if ok else "# README has no core-results markers; not updated")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    for name, err in failures.items():
        print(f"FAILED: {name}: {err}", file=sys.stderr)
    return 1 if (problems or failures) else 0


def check_module_sets(agg: dict[str, dict[str, Any]]) -> list[str]:
    """Every tool must adapt exactly the same modules per preset."""
    problems = []
    for preset, p in PRESETS.items():
        entries = {name: a for name, a in agg.items() if name.startswith(preset + "/")}
        shas = {a["module_set_sha1"] if isinstance(a["module_set_sha1"], str) else "mixed" for a in entries.values()}
        counts = {a["modules"] for a in entries.values()}
        if entries:
            print(f"# {preset}: module counts {sorted(counts)}, module-set hashes {sorted(shas)}")
        if len(shas) > 1:
            problems.append(f"{preset}: tools adapt different module sets: " + ", ".join(f"{n}={a['modules']}/{a['module_set_sha1']}" for n, a in entries.items()))
        if entries and counts != {p["expected_modules"]}:
            problems.append(f"{preset}: expected {p['expected_modules']} modules, got {sorted(counts)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 warm-up + 1 timed step per configuration")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration, split over the rounds (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per configuration, interleaved (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every process (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all CPUs)")
    parser.add_argument("--only", default=None, help="regex on configuration names (floor always runs), e.g. 'attn/lora'")
    parser.add_argument("--tools", default=None, help=f"comma list, default {','.join(TOOLS)}; extras: {','.join(EXTRA_TOOLS)}")
    parser.add_argument("--algos", default=None, help=f"comma list, default {','.join(ALGOS)}")
    parser.add_argument("--presets", default=None, help=f"comma list, default {','.join(PRESETS)}")
    parser.add_argument("--primary", choices=("auto", "wall", "cpu"), default="auto",
                        help="metric for ratios: wall-clock or process CPU seconds per step; auto = cpu with --threads 1, else wall")
    parser.add_argument("--alt-lyco", default=None, help="directory holding an alternative `lyco` package: adds the `lyco-alt` tool")
    parser.add_argument("--module-reps", type=int, default=0,
                        help="also time every adapted module alone, adapters on and off, N calls each way twice (0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.environ.get("LYCO_BENCH_CACHE", "/tmp/lyco_bench_cache"), help="UNet weight cache and logs")
    parser.add_argument("--max-load", type=float, default=None, help="before each worker, wait until the 1-min load average is below this")
    parser.add_argument("--max-wait", type=float, default=120.0, help="longest wait for --max-load, seconds (default 120)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-worker timeout, seconds")
    parser.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/core_<date>[_quick].json)")
    parser.add_argument("--render", default=None, metavar="JSON", help="re-analyse a saved results file (rewrites it and its .md) instead of running")
    parser.add_argument("--update-readme", action="store_true", help="write the table between the core-results markers of benchmarks/README.md")
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        for key in ("warmup", "rounds"):
            setattr(args, key, saved["settings"][key])
        args.steps = saved["settings"]["steps_per_round"] * saved["settings"]["rounds"]
        args.threads = saved["settings"]["threads"]
        args.quick = saved.get("quick", False)
        out_path = Path(args.out) if args.out else Path(str(args.render).replace(".partial.json", ".json"))
        return finish(args, saved["raw"], saved.get("failures", {}), saved["machine"], saved["run_id"], 0.0, out_path, saved)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
