"""lyco-ui callbacks as plain functions: the folder allow-list, the Train form <-> TOML mapping and its
checks, the dataset preview, starting a run, the Generate stack (no reloads on strength changes, PNG
parameters), and the tools. Uses builtin:tiny-sd at 64x64 with 2 denoising steps."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ui.app import Settings, build_app, build_parser, make_context, parse_auth
from ui.paths import PathNotAllowed, PathPolicy
from ui.state import AdapterRow
from ui import generate_tab as gen
from ui import tools_tab as tools
from ui import train_config as cfg
from ui import train_tab as train


@pytest.fixture
def policy(tmp_path: Path, monkeypatch) -> PathPolicy:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    (tmp_path / "gradio").mkdir()
    return PathPolicy.create(workdir=tmp_path / "work", data_dir=tmp_path / "data")


@pytest.fixture(scope="module")
def concept(tmp_path_factory) -> Path:
    from pipelines.synthetic import write_concept_dataset

    root = tmp_path_factory.mktemp("concept") / "sks"
    write_concept_dataset(root, n_images=4, repeats=3)
    return root


# ----- paths -------------------------------------------------------------------------------------------
def test_paths_outside_the_folders_are_refused(policy: PathPolicy, tmp_path: Path) -> None:
    assert policy.resolve("x/y.toml") == policy.work / "x" / "y.toml"
    assert policy.resolve("sks", base="data") == policy.data / "sks"
    for text in ("../outside", str(tmp_path / "elsewhere"), "/etc/passwd", "~/.ssh/id_rsa", str(policy.work / ".." / "..")):
        with pytest.raises(PathNotAllowed, match="outside the folders"):
            policy.resolve(text)
    (policy.work / "link").symlink_to("/etc")
    with pytest.raises(PathNotAllowed):
        policy.resolve("link/passwd")
    with pytest.raises(PathNotAllowed, match="may written|may be|outside"):
        PathPolicy.create(workdir=tmp_path / "w2", model_dirs=[tmp_path / "models"]).resolve(tmp_path / "models" / "m", write=True)


def test_models_uploads_and_output_names(policy: PathPolicy, tmp_path: Path, monkeypatch) -> None:
    assert policy.model("builtin:tiny-sd") == "builtin:tiny-sd"
    assert policy.model("org/some-model") == "org/some-model"
    with pytest.raises(PathNotAllowed):
        policy.model("/etc")
    (tmp_path / "org" / "local").mkdir(parents=True)  # a folder that looks like a hub id is a path, and checked
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PathNotAllowed, match="outside"):
        policy.model("org/local")
    with pytest.raises(PathNotAllowed, match="not a file uploaded"):
        policy.uploaded("/etc/passwd")
    upload = tmp_path / "gradio" / "abc" / "a.safetensors"
    upload.parent.mkdir()
    upload.write_bytes(b"x")
    assert policy.uploaded(str(upload)) == upload
    assert policy.output_file("merged") == policy.adapters / "merged.safetensors"
    for bad in ("../merged", "a/b", "", ".."):
        with pytest.raises(PathNotAllowed, match="plain file name"):
            policy.output_file(bad)


# ----- the Train form ------------------------------------------------------------------------------------
def test_form_round_trip_keeps_what_the_form_does_not_show(policy: PathPolicy) -> None:
    base = {**cfg.DEFAULT_CONFIG, "training": {"max_train_steps": 200, "seed": 0, "noise_offset": 0.05},
            "sampling": {"prompts": [{"prompt": "a photo of sks", "seed": 7, "steps": 3}]}}
    values = cfg.config_to_form(base, policy)
    assert cfg.form_to_config(values, base, policy) == base
    values.update(rank=16, alpha=0, length_unit="epochs", length=3, text_encoder_lr="0", unet_lr="", algo="lokr", factor=4,
                  sample_prompts="a photo of sks\nsks on a red background", data_dir="sks")
    data = cfg.form_to_config(values, base, policy)
    assert data["network"]["rank"] == 16 and "alpha" not in data["network"] and data["network"]["factor"] == 4
    assert data["training"] == {"max_train_epochs": 3, "seed": 0, "noise_offset": 0.05}
    assert data["optimizer"]["text_encoder_lr"] == 0.0 and "unet_lr" not in data["optimizer"]
    assert data["sampling"]["prompts"] == [{"prompt": "a photo of sks", "seed": 7, "steps": 3}, {"prompt": "sks on a red background"}]
    assert data["dataset"]["train_data_dir"] == str(policy.data / "sks")
    values.update(algo="lora")
    assert "factor" not in cfg.form_to_config(values, base, policy)["network"]
    with pytest.raises(ValueError, match="optimizer.unet_lr"):
        cfg.form_to_config({**values, "unet_lr": "fast"}, base, policy)


def test_config_errors_name_the_field(policy: PathPolicy, concept: Path, tmp_path: Path) -> None:
    values = cfg.config_to_form(cfg.DEFAULT_CONFIG, policy)
    _, _, problems = cfg.check_config(cfg.form_to_config({**values, "data_dir": "missing"}, cfg.DEFAULT_CONFIG, policy), policy)
    assert any(p.startswith("dataset.train_data_dir: folder") and "does not exist" in p for p in problems)
    _, _, problems = cfg.check_config(cfg.form_to_config({**values, "data_dir": str(concept)}, cfg.DEFAULT_CONFIG, policy), policy)
    assert problems and "dataset.train_data_dir" in problems[0] and "outside the folders" in problems[0]
    data = {**cfg.DEFAULT_CONFIG, "network": {"rank": 0, "algo": "lora"}, "dataset": {"train_data_dir": str(policy.data), "batch_sise": 2}}
    _, _, problems = cfg.check_config(data, policy)
    assert any(p.startswith("network.rank") for p in problems)
    assert any(p.startswith("dataset.batch_sise: unknown key; did you mean 'batch_size'") for p in problems)
    _, _, problems = cfg.check_config({**cfg.DEFAULT_CONFIG, "model": {"path": "/etc"}}, policy)
    assert any(p.startswith("model.path") for p in problems)


def test_save_and_load_config_is_the_toml_lyco_train_reads(policy: PathPolicy, concept: Path, capsys) -> None:
    import shutil

    from trainers.cli import main as lyco_train

    shutil.copytree(concept, policy.data / "sks")
    values = {**cfg.config_to_form(cfg.DEFAULT_CONFIG, policy), "data_dir": "sks", "rank": 4, "length": 7}
    path, problems = cfg.save_config_file(policy, cfg.form_to_config(values, cfg.DEFAULT_CONFIG, policy), "configs/mine")
    assert problems == [] and path == policy.work / "configs" / "mine.toml"
    assert lyco_train(["--config", str(path), "--print-config"]) == 0
    assert "max_train_steps = 7" in capsys.readouterr().out
    data, problems = cfg.load_config_file(policy, path)
    assert problems == []
    loaded = cfg.config_to_form(data, policy)
    assert (loaded["rank"], loaded["length"], loaded["data_dir"]) == (4, 7, "sks")
    assert loaded["output_dir"] == "my_adapter"  # <adapter folder>/<output name>, shown relative
    assert train.shown_command(path, resume=True) == f"lyco-train --config {path} --resume"
    bad, problems = cfg.save_config_file(policy, data, "/etc/x")
    assert bad is None and "outside" in problems[0]


def test_dataset_preview_counts_images_captions_and_buckets(policy: PathPolicy, concept: Path) -> None:
    import shutil

    shutil.copytree(concept, policy.data / "sks")
    (policy.data / "sks" / "3_sks" / "0000.txt").unlink()
    text, thumbs = train.preview_dataset(policy, "sks", model="builtin:tiny-sd")
    assert "4 images in 1 subset" in text and "4 images x 3 repeats, 3/4 captioned" in text
    assert "bucket 64x64: 4 images (12 with repeats)" in text and len(thumbs) == 4
    assert train.list_datasets(policy) == ["sks"]
    text, thumbs = train.preview_dataset(policy, "/etc")
    assert "outside the folders" in text and thumbs == []


FAKE_PYTHON = textwrap.dedent("""\
    #!{python}
    import json, sys
    args = sys.argv[1:]
    assert args[:2] == ["-m", "trainers.cli"], args
    progress = json.loads(args[args.index("--set") + 1].split("=", 1)[1])
    with open(progress, "a") as f:
        for record in ({{"event": "start", "total_steps": 1, "step": 0}}, {{"event": "step", "step": 1, "loss": 0.25, "eta_s": 0, "total_steps": 1}},
                       {{"event": "end", "status": "completed", "step": 1, "adapter": "x.safetensors"}}):
            f.write(json.dumps(record) + "\\n")
    print("fake trainer ran", args[3])
""")


def test_start_writes_the_run_and_the_live_view_follows_the_child(policy: PathPolicy, concept: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(concept, policy.data / "sks")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    ctx = make_context(Settings(workdir=policy.work, data_dir=policy.data, python=str(fake)))
    values = cfg.config_to_form(cfg.DEFAULT_CONFIG, ctx.policy)
    ok, text = train.start_training(ctx, cfg.DEFAULT_CONFIG, {**values, "rank": 0})
    assert not ok and "network.rank" in text and ctx.job.status().state == "idle"
    ok, text = train.start_training(ctx, cfg.DEFAULT_CONFIG, {**values, "data_dir": "sks"})
    assert ok, text
    assert ctx.job.wait(30)
    view = train.status_view(ctx)
    assert view["state"] == "completed" and not view["alive"]
    assert "Step 1 / 1" in view["progress"] and "loss 0.2500" in view["progress"] and view["losses"] == [(1, 0.25)]
    assert "fake trainer ran" in view["log"]
    config = Path(view["log"].split("fake trainer ran", 1)[1].split()[0])
    assert config.name == "config.toml" and config.parent.parent == ctx.policy.work / "runs"
    ctx.job.start([sys.executable, "-c", "import time; time.sleep(60)"], log_path=tmp_path / "busy.log", progress_path=tmp_path / "p.jsonl")
    try:  # one training at a time, with a clear message
        ok, text = train.start_training(ctx, cfg.DEFAULT_CONFIG, {**values, "data_dir": "sks", "overwrite": True})
        assert not ok and "already running" in text and "one" in text
    finally:
        ctx.job.kill()
    assert not ctx.job.alive and train.status_view(ctx)["state"] == "stopped"


# ----- Generate -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_ctx(tmp_path_factory):
    """A UI context on builtin:tiny-sd and an adapter file with a clearly non-zero update."""
    from lyco import LycoNetwork, NetworkConfig, save_network
    from pipelines.models import load_pipeline

    root = tmp_path_factory.mktemp("gen")
    ctx = make_context(Settings(workdir=root / "work"))
    pipe = load_pipeline("builtin:tiny-sd")
    network = LycoNetwork.create({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, NetworkConfig(rank=4, alpha=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    save_network(network, ctx.policy.adapters / "style" / "style.safetensors")
    network.remove()
    return ctx


def _generate(ctx, rows, prompt="a photo of sks", **kw):
    return gen.generate_images(ctx, "builtin:tiny-sd", rows, prompt=prompt, seed=3, steps=2, guidance=5.0, **kw)


def test_stack_strength_changes_do_not_reload_and_images_carry_parameters(gen_ctx) -> None:
    from PIL import Image

    from pipelines.png_info import parse_parameters, read_png_parameters

    ctx = gen_ctx
    assert gen.list_adapters(ctx.policy) == ["style/style.safetensors"]
    rows, text = gen.add_adapter(ctx, "builtin:tiny-sd", [], "style/style.safetensors")
    assert [r.name for r in rows] == ["style"] and "Added style" in text
    assert gen.add_adapter(ctx, "builtin:tiny-sd", rows, "style/style.safetensors")[1].endswith("already in the stack.")
    assert "outside" in gen.add_adapter(ctx, "builtin:tiny-sd", rows, "/etc/passwd")[1]
    loads = dict(ctx.engine.stats)
    images = {}
    for strength in (0.0, 1.0):
        settings = [True, strength, False, 1.0, 1.0]
        items, params, note = _generate(ctx, gen.apply_slot_values(rows, settings))
        assert len(items) == 1 and "written to" in note
        images[strength] = Image.open(items[0][0]).convert("RGB")
        text = read_png_parameters(items[0][0])
        assert text == params and f"<lora:style:{strength:g}>" in text and "Lora hashes" in text
        assert parse_parameters(text).seed == 3
    assert ctx.engine.stats["model_loads"] == loads["model_loads"] and ctx.engine.stats["adapter_loads"] == loads["adapter_loads"]
    assert images[0.0].tobytes() != images[1.0].tobytes()
    split = gen.apply_slot_values(rows, [True, 1.0, True, 0.0, 1.0])
    assert split[0].strengths() == (0.0, 1.0)
    items, params, _ = _generate(ctx, split)
    assert "<lora:style:1:0>" in params
    assert ctx.engine.stats["adapter_loads"] == loads["adapter_loads"]
    items, _, _ = _generate(ctx, [])  # removed from the stack: strength 0 was the base model exactly
    assert "style" not in ctx.engine.stack and Image.open(items[0][0]).convert("RGB").tobytes() == images[0.0].tobytes()


def test_prompt_tags_and_errors(gen_ctx) -> None:
    ctx = gen_ctx
    items, params, _ = _generate(ctx, [], prompt="a photo of sks <lora:style:0.5>")
    assert items and "<lora:style:0.5>" in params and "Lora hashes" in params
    items, params, note = _generate(ctx, [], prompt="a photo <lora:nothere:1>")
    assert items == [] and note.startswith("Generation failed") and "nothere" in note
    assert _generate(ctx, [], prompt=" ")[2] == "Write a prompt first."
    assert gen.remove_row([AdapterRow("a", "x"), AdapterRow("b", "y")], 0) == [AdapterRow("b", "y")]
    assert gen.unique_name("style", [AdapterRow("style", "x")]) == "style-2"


def test_tools_inspect_and_resize(gen_ctx) -> None:
    ctx = gen_ctx
    report, info = tools.inspect_choice(ctx.policy, "style/style.safetensors")
    assert "Algorithms: lora" in report and info["module_count"] > 0
    assert "outside" in tools.inspect_choice(ctx.policy, "/etc/passwd")[0]
    out = tools.run_with(ctx, "resize", tools.resize_args, source="style/style.safetensors", rank=2, output="small")
    assert out.startswith("$ lyco-resize ") and "wrote" in out, out
    assert "Ranks:      2" in tools.inspect_choice(ctx.policy, "small.safetensors")[0]
    assert "already exists" in tools.run_with(ctx, "resize", tools.resize_args, source="style/style.safetensors", rank=2, output="small")
    assert "outside" in tools.run_with(ctx, "convert", tools.convert_args, source="../../x.safetensors", output="c")
    assert "plain file name" in tools.run_with(ctx, "convert", tools.convert_args, source="small.safetensors", output="../c")
    assert "one per adapter" in tools.run_with(ctx, "merge", tools.merge_args, sources=["small.safetensors"], strengths="1,2", output="m")
    args = tools.merge_args(ctx.policy, sources=["small.safetensors"], mode="bake", base="builtin:tiny-sd", output="baked")
    assert args[args.index("-o") + 1] == str(ctx.policy.work / "models" / "baked")


# ----- the app ----------------------------------------------------------------------------------------------
def test_app_builds_with_stable_ids_and_safe_defaults(tmp_path: Path) -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.auth) == ("127.0.0.1", 7860, None)
    assert parse_auth("me:secret") == ("me", "secret")
    with pytest.raises(Exception):
        parse_auth("nopassword")
    app = build_app(Settings(workdir=tmp_path / "w"))
    config = app.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    labels = {c["props"].get("label") for c in config["components"] if c["type"] == "tabitem"}
    assert {"Train", "Generate", "Tools", "Inspect", "Merge", "Resize", "Extract", "Convert"} <= labels
    assert {"train-start", "train-stop", "train-status", "train-progress", "train-loss", "train-samples", "train-log", "gen-run",
            "gen-gallery", "gen-parameters", "gen-slot-0-strength", "tools-inspect-run"} <= ids
    assert (tmp_path / "w" / "adapters").is_dir() and (tmp_path / "w" / "data").is_dir()
