"""Generate tab: a base model, a stack of adapters (enable, strength, optional UNet/TE strengths,
remove), prompt with `<lora:name:w>` tags, and a gallery of PNGs that carry their A1111 parameters.

The session's stack is a list of `AdapterRow`s in a gr.State (names and files, server-side); the
strengths live in the slot components and are read at generation time. The model and the adapter
files are loaded by the shared `GenerationEngine` once; a strength change only sets numbers.
"""
from __future__ import annotations

import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .paths import PathNotAllowed, PathPolicy, safe_name
from .state import AdapterRow, UIContext, output_folder

MAX_SLOTS = 6
SLOT_FIELDS = ("enabled", "strength", "separate", "unet", "te")  # values each slot sends to a generation
DEFAULT_SCHEDULER = "model default"


# ----- the stack ----------------------------------------------------------------------------------------
def list_adapters(policy: PathPolicy) -> list[str]:
    """Adapter files in the adapter folder (relative paths), without training states."""
    root = policy.adapters
    files = [p for p in root.rglob("*.safetensors") if p.is_file() and "state" not in p.relative_to(root).parts[:-1]]
    return sorted(p.relative_to(root).as_posix() for p in files)


def unique_name(stem: str, rows: Sequence[AdapterRow]) -> str:
    base = safe_name(stem, default="adapter").replace(":", "_")
    taken = {row.name for row in rows}
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def add_adapter(ctx: UIContext, model: str, rows: Sequence[AdapterRow], choice: str) -> tuple[list[AdapterRow], str]:
    """Add the adapter file `choice` (a path in the adapter folder) to the session's stack; it is loaded
    on the model now, so an incompatible file is reported at once."""
    rows = list(rows)
    if not choice:
        return rows, "Pick an adapter file first."
    if len(rows) >= MAX_SLOTS:
        return rows, f"The stack holds {MAX_SLOTS} adapters; remove one first (prompt tags can add more)."
    try:
        path = ctx.policy.resolve(choice, base="adapters", what="adapter", must_exist=True, kind="file")
        model_id = ctx.policy.model(model)
    except PathNotAllowed as err:
        return rows, str(err)
    if any(Path(row.path) == path for row in rows):
        return rows, f"{path.name} is already in the stack."
    name = unique_name(path.stem, rows)
    try:
        info = ctx.engine.load_adapter(model_id, name, str(path))
    except Exception as err:  # model or adapter errors carry their own explanation
        return rows, f"Could not add {path.name}: {err}"
    modules = ", ".join(f"{count} {part}" for part, count in info.modules.items())
    algos = ", ".join(f"{algo} x{count}" for algo, count in info.algorithms.items())
    return rows + [AdapterRow(name=name, path=str(path))], f"Added {name}: {algos} ({modules} modules)."


def store_upload(policy: PathPolicy, file: str) -> Path:
    """Copy an uploaded adapter into `<adapter folder>/uploads/` (never over an existing file)."""
    source = policy.uploaded(file)
    if source.suffix.lower() != ".safetensors":
        raise PathNotAllowed(f"upload: {source.name} is not a .safetensors file")
    folder = policy.adapters / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / f"{safe_name(source.stem)}.safetensors", 2
    while target.exists():
        target, n = folder / f"{safe_name(source.stem)}-{n}.safetensors", n + 1
    shutil.copyfile(source, target)
    return target


def apply_slot_values(rows: Sequence[AdapterRow], values: Sequence[Any]) -> list[AdapterRow]:
    """Rows with the settings the slot components show (`values`: SLOT_FIELDS per slot, flattened)."""
    out = []
    for index, row in enumerate(rows):
        enabled, strength, separate, unet, te = values[index * len(SLOT_FIELDS):(index + 1) * len(SLOT_FIELDS)]
        out.append(replace(row, enabled=bool(enabled), strength=float(strength), separate=bool(separate), unet=float(unet), text_encoder=float(te)))
    return out


def remove_row(rows: Sequence[AdapterRow], index: int) -> list[AdapterRow]:
    return [row for i, row in enumerate(rows) if i != index]


# ----- generation ---------------------------------------------------------------------------------------
def generate_images(ctx: UIContext, model: str, rows: Sequence[AdapterRow], *, prompt: str, negative: str = "", seed: int = -1,
                    steps: int = 20, guidance: float = 7.0, width: int = 0, height: int = 0, batch: int = 1,
                    scheduler: str = DEFAULT_SCHEDULER, progress: Callable[[int], None] | None = None) -> tuple[list[tuple[str, str]], str, str]:
    """(gallery items, parameters text, message). PNGs go to `<work>/outputs/<date>/`."""
    from pipelines.generate import GenerationSettings

    if not (prompt or "").strip():
        return [], "", "Write a prompt first."
    try:
        model_id = ctx.policy.model(model)
    except PathNotAllowed as err:
        return [], "", str(err)
    first = int(seed) if seed is not None and int(seed) >= 0 else random.randrange(2**32 - 1)
    count = max(1, int(batch or 1))
    settings = GenerationSettings(
        prompt=prompt, negative_prompt=negative or "", seeds=tuple(first + i for i in range(count)), steps=int(steps),
        guidance_scale=float(guidance), width=int(width) or None, height=int(height) or None,
        scheduler=None if scheduler in (None, "", DEFAULT_SCHEDULER) else scheduler, batch_size=count,
    )
    try:
        paths, texts = ctx.engine.generate(model_id, rows, settings, out_dir=output_folder(ctx.policy), progress=progress)
    except Exception as err:  # GenerationError, PromptTagError, AdapterStackError, ModelLoadError, ...
        return [], "", f"Generation failed: {err}"
    items = [(str(path), f"seed {path.stem.split('-', 1)[1]}") for path in paths]
    return items, "\n\n".join(texts), f"{len(paths)} image(s) written to {paths[0].parent}"


def read_parameters(policy: PathPolicy, path: str) -> str:
    """The `parameters` text of a PNG in the UI's folders."""
    from pipelines.png_info import read_png_parameters

    try:
        return read_png_parameters(policy.resolve(path, base="work", what="image", must_exist=True, kind="file"))
    except (PathNotAllowed, KeyError, OSError) as err:
        return str(err)


# ----- the tab ------------------------------------------------------------------------------------------
def build(ctx: UIContext) -> None:
    import gradio as gr

    from pipelines.generate import SCHEDULERS

    from .train_tab import model_choices

    policy = ctx.policy
    rows_state = gr.State([])
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Dropdown(model_choices(policy), value="builtin:tiny-sd", allow_custom_value=True, label="Base model", elem_id="gen-model")
            with gr.Column(variant="panel"):
                gr.Markdown("**Adapter stack**")
                pick = gr.Dropdown(list_adapters(policy), value=None, allow_custom_value=True, label=f"Adapter file (in {policy.adapters})",
                                   elem_id="gen-adapter-pick")
                with gr.Row():
                    add = gr.Button("Add to stack", variant="primary", elem_id="gen-adapter-add", size="sm")
                    refresh = gr.Button("Refresh list", elem_id="gen-adapter-refresh", size="sm")
                    upload = gr.UploadButton("Upload adapter...", file_types=[".safetensors"], elem_id="gen-adapter-upload", size="sm")
                stack_message = gr.Markdown(elem_id="gen-stack-message")
            slots: list[dict[str, Any]] = []
            for i in range(MAX_SLOTS):
                with gr.Group(visible=False) as group:
                    with gr.Row():
                        title = gr.Markdown(elem_id=f"gen-slot-{i}-title")
                        enabled = gr.Checkbox(True, label="Enabled", elem_id=f"gen-slot-{i}-enabled", scale=0, min_width=100)
                        remove = gr.Button("Remove", elem_id=f"gen-slot-{i}-remove", size="sm", scale=0, min_width=80)
                    with gr.Row():
                        strength = gr.Slider(-2, 2, value=1.0, step=0.05, label="Strength", elem_id=f"gen-slot-{i}-strength")
                        separate = gr.Checkbox(False, label="Separate UNet / TE", elem_id=f"gen-slot-{i}-separate", scale=0, min_width=140)
                    with gr.Row(visible=False) as split_row:
                        unet = gr.Slider(-2, 2, value=1.0, step=0.05, label="UNet strength", elem_id=f"gen-slot-{i}-unet")
                        te = gr.Slider(-2, 2, value=1.0, step=0.05, label="Text-encoder strength", elem_id=f"gen-slot-{i}-te")
                slots.append(dict(group=group, title=title, enabled=enabled, strength=strength, separate=separate, unet=unet, te=te,
                                  remove=remove, split_row=split_row))
                separate.change(lambda on: gr.update(visible=bool(on)), separate, split_row, show_progress="hidden")
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt (<lora:name:weight> tags load adapters from the adapter folder)", lines=2, elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
            with gr.Row():
                seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="gen-seed")
                steps = gr.Number(20, label="Steps", precision=0, minimum=1, elem_id="gen-steps")
                guidance = gr.Number(7.0, label="Guidance (CFG)", minimum=0, elem_id="gen-guidance")
                scheduler = gr.Dropdown([DEFAULT_SCHEDULER, *SCHEDULERS], value=DEFAULT_SCHEDULER, label="Sampler", elem_id="gen-scheduler")
            with gr.Row():
                width = gr.Number(0, label="Width (0 = model's)", precision=0, minimum=0, step=8, elem_id="gen-width")
                height = gr.Number(0, label="Height (0 = model's)", precision=0, minimum=0, step=8, elem_id="gen-height")
                batch = gr.Number(1, label="Batch size", precision=0, minimum=1, maximum=16, elem_id="gen-batch")
            go = gr.Button("Generate", variant="primary", elem_id="gen-run")
            gallery = gr.Gallery(label="Images", columns=4, height=320, object_fit="contain", elem_id="gen-gallery", format="png")
            message = gr.Markdown(elem_id="gen-message")
            parameters = gr.Textbox(label="Generation parameters (also in each PNG's 'parameters' chunk)", lines=5, interactive=False,
                                    elem_id="gen-parameters", buttons=["copy"])

    slot_inputs = [slot[key] for slot in slots for key in SLOT_FIELDS]
    slot_outputs = [slot[key] for slot in slots for key in ("group", "title", *SLOT_FIELDS, "split_row")]

    def slot_updates(rows: Sequence[AdapterRow]) -> list[Any]:
        out: list[Any] = []
        for i in range(MAX_SLOTS):
            if i < len(rows):
                r = rows[i]
                out += [gr.update(visible=True), f"**{r.name}**  \n`{Path(r.path).name}`", r.enabled, r.strength, r.separate, r.unet,
                        r.text_encoder, gr.update(visible=r.separate)]
            else:
                out += [gr.update(visible=False), "", True, 1.0, False, 1.0, 1.0, gr.update(visible=False)]
        return out

    def on_add(model_id, choice, rows, *values):
        rows = apply_slot_values(rows, values)
        rows, text = add_adapter(ctx, model_id, rows, choice)
        return [rows, text, *slot_updates(rows)]

    def on_upload(model_id, file, rows, *values):
        rows = apply_slot_values(rows, values)
        if not file:
            return [rows, gr.skip(), *slot_updates(rows)]
        try:
            stored = store_upload(policy, file)
        except PathNotAllowed as err:
            return [rows, str(err), *slot_updates(rows)]
        rows, text = add_adapter(ctx, model_id, rows, str(stored))
        return [rows, text, *slot_updates(rows)]

    def on_remove(index: int):
        def handler(rows, *values):
            rows = remove_row(apply_slot_values(rows, values), index)
            return [rows, "", *slot_updates(rows)]
        return handler

    def on_generate(model_id, rows, prompt_text, negative_text, seed_value, steps_value, guidance_value, width_value, height_value,
                    batch_value, scheduler_value, *values, progress=gr.Progress()):
        rows = apply_slot_values(rows, values)
        total = max(1, int(steps_value or 1)) * max(1, int(batch_value or 1))
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            progress((min(done[0], total), total), desc="denoising", unit="steps")

        items, text, note = generate_images(ctx, model_id, rows, prompt=prompt_text, negative=negative_text, seed=seed_value,
                                            steps=steps_value, guidance=guidance_value, width=width_value, height=height_value,
                                            batch=batch_value, scheduler=scheduler_value, progress=tick)
        return rows, items or gr.skip(), text or gr.skip(), note

    stack_outputs = [rows_state, stack_message, *slot_outputs]
    refresh.click(lambda: gr.update(choices=list_adapters(policy)), None, pick, show_progress="hidden")
    add.click(on_add, [model, pick, rows_state, *slot_inputs], stack_outputs, concurrency_id="pipeline", concurrency_limit=1)
    upload.upload(on_upload, [model, upload, rows_state, *slot_inputs], stack_outputs, concurrency_id="pipeline", concurrency_limit=1)
    for i, slot in enumerate(slots):
        slot["remove"].click(on_remove(i), [rows_state, *slot_inputs], stack_outputs, show_progress="hidden")
    go.click(on_generate, [model, rows_state, prompt, negative, seed, steps, guidance, width, height, batch, scheduler, *slot_inputs],
             [rows_state, gallery, parameters, message], concurrency_id="pipeline", concurrency_limit=1)
    prompt.submit(on_generate, [model, rows_state, prompt, negative, seed, steps, guidance, width, height, batch, scheduler, *slot_inputs],
                  [rows_state, gallery, parameters, message], concurrency_id="pipeline", concurrency_limit=1)
