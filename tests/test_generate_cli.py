"""lyco-generate end to end on builtin:tiny-sd, generate() as the trainer/UI use it, PNG infotext round trips."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lyco import LycoNetwork, NetworkConfig
from pipelines import cli
from pipelines.generate import GenerationError, GenerationSettings, describe_scheduler, generate, make_scheduler, scheduler_key
from pipelines.png_info import ImageParameters, format_parameters, make_grid, parse_parameters, read_png_parameters, save_png
from pipelines.prompt_tags import AdapterLibrary, PromptTagError, parse_tag
from pipelines.stack import AdapterStack
from test_stack import make_adapter


@pytest.fixture(scope="module")
def pipe():
    from pipelines.models import load_pipeline

    return load_pipeline("builtin:tiny-sd")


@pytest.fixture(scope="module")
def adapters(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    library = root / "library"
    library.mkdir()
    style = make_adapter(pipe, root / "style.safetensors", algo="lokr", seed=3, scale=0.2, rank=2, preset="attn-only")
    make_adapter(pipe, library / "ink.safetensors", algo="loha", seed=4, scale=0.2, rank=2)
    return root, style, library


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_cli_end_to_end_metadata_round_trip_and_reproducibility(pipe, adapters, tmp_path, capsys):
    root, style, library = adapters
    prompt = "a red circle, <lora:ink:0.7:1.2:lbw=OUTALL> white background"
    argv = ["--prompt", prompt, "--negative", "blurry, dark", "--seed", "5..6", "--steps", "2", "--guidance", "6.5",
            "--scheduler", "euler", "--batch", "2", "--adapter", f"{style}:0.9:0.4", "--adapter-dir", str(library),
            "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in written] == ["00000-5.png", "00001-6.png", "grid.png"]
    with Image.open(written[2]) as grid:
        assert grid.size == (128, 64)

    params = parse_parameters(read_png_parameters(written[1]))
    assert (params.prompt, params.negative_prompt, params.seed, params.steps, params.cfg_scale) == (prompt, "blurry, dark", 6, 2, 6.5)
    assert (params.sampler, params.schedule_type, params.width, params.height, params.model) == ("Euler", None, 64, 64, "tiny-sd")
    assert len(params.model_hash) == 10 and set(params.lora_hashes) == {"style", "ink"}
    assert params.lyco_adapters == ("<lora:style:0.4:0.9>",)

    # The same command reproduces the same images; without --overwrite nothing is replaced.
    assert cli.main([*argv, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert np.array_equal(pixels(tmp_path / "a" / "00001-6.png"), pixels(tmp_path / "b" / "00001-6.png"))
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 1
    error = capsys.readouterr().err
    assert "3 output files already exist" in error and "pass --overwrite" in error
    assert cli.main([*argv, "--out", str(tmp_path / "a"), "--overwrite"]) == 0

    # Regenerate seed 6 from the parsed metadata alone (plus the adapter files) through generate().
    stack = AdapterStack(pipe)
    for text in params.lyco_adapters:
        tag = parse_tag("lora", text[len("<lora:"):-1])
        stack.add(tag.name, style, unet=tag.unet, text_encoder=tag.te)
    settings = GenerationSettings(prompt=params.prompt, negative_prompt=params.negative_prompt, seeds=(params.seed,),
                                  steps=params.steps, guidance_scale=params.cfg_scale, width=params.width, height=params.height,
                                  scheduler=scheduler_key(params.sampler, params.schedule_type))
    try:
        result = generate(pipe, settings, stack=stack, library=AdapterLibrary(library))
        again = np.asarray(result.images[0].convert("RGB")).astype(int)
        assert np.abs(again - pixels(tmp_path / "a" / "00001-6.png")).max() <= 2  # batch of 2 vs 1: float rounding only
        assert result.parameters[0].lora_hashes == params.lora_hashes
        assert not stack.settings("ink").enabled  # tag adapters are only on while their prompt runs
    finally:
        stack.clear()


def test_cli_errors(adapters, tmp_path, capsys):
    root, style, library = adapters
    assert cli.main(["--prompt", "x <lora:inq:1>", "--adapter-dir", str(library), "--seed", "1", "--steps", "1",
                     "--out", str(tmp_path), "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert "no adapter named 'inq'" in error and "available: ink" in error
    assert cli.main(["--prompt", "x", "--adapter", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)]) == 1
    assert "is not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--prompt", "x", "--out", str(tmp_path), "--scheduler", "nope"])


def test_seed_and_adapter_arguments(tmp_path):
    assert cli.parse_seeds(["3", "7..9"], batch=1) == (3, 7, 8, 9)
    assert cli.parse_seeds(["10"], batch=3) == (10, 11, 12)
    assert len(cli.parse_seeds(None, batch=1)) == 1
    for bad in ("x", "9..7", "-1"):
        with pytest.raises(cli.CliError):
            cli.parse_seeds([bad], batch=1)
    path = tmp_path / "a:b.safetensors"
    path.write_bytes(b"x")
    assert cli.parse_adapter_arg(str(path)) == (path, 1.0, None)
    assert cli.parse_adapter_arg(f"{path}:0.5") == (path, 0.5, None)
    assert cli.parse_adapter_arg(f"{path}:0.5:-1") == (path, 0.5, -1.0)


def test_generate_with_a_borrowed_training_network(pipe):
    """The trainer's path: an in-memory network in training mode, sampled through the stack."""
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    network = LycoNetwork.create(parts, NetworkConfig(algo="lora", rank=2, preset="attn-only", dropout=0.5))
    with torch.no_grad():
        for layer in network.layers.values():
            layer.up_parameters()[0].normal_(0, 0.2)  # non-zero, so that dropout would show
    scheduler = pipe.scheduler
    pipe.unet.train()
    try:
        settings = GenerationSettings(prompt="a circle", seeds=(1, 2), steps=2, batch_size=2, scheduler="dpmpp_2m_karras")
        base = generate(pipe, settings)  # no stack: whatever is attached to the pipe runs (here at strength 1)
        stack = AdapterStack(pipe)
        stack.add("training", network, strength=0.5)
        first = generate(pipe, settings, stack=stack)
        second = generate(pipe, settings, stack=stack)
        assert not np.array_equal(np.asarray(base.images[1]), np.asarray(first.images[1]))
        assert np.array_equal(np.asarray(first.images[1]), np.asarray(second.images[1]))  # dropout was off (eval)
        assert first.parameters[0].sampler == "DPM++ 2M" and first.parameters[0].schedule_type == "Karras"
        assert first.parameters[0].lyco_adapters == ("<lora:training:0.5>",) and first.parameters[0].lora_hashes == {}
        assert pipe.scheduler is scheduler and pipe.unet.training  # restored
        stack.remove("training")
        assert network.attached
    finally:
        pipe.unet.eval()
        network.remove()


def test_generate_img2img_through_pipeline_kwargs(pipe, adapters):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    stack = AdapterStack(img2img)
    stack.add("style", adapters[1], strength=0.5)
    try:
        init = Image.new("RGB", (64, 64), "red")
        result = generate(img2img, GenerationSettings(prompt="a circle", seeds=(3,), steps=4), stack=stack,
                          pipeline_kwargs={"image": init, "strength": 0.5})
        assert result.images[0].size == (64, 64)
    finally:
        stack.clear()


def test_generate_validates_settings(pipe):
    for settings, message in [
        (GenerationSettings(prompt="x", seeds=(1, 1)), "seeds repeat"),
        (GenerationSettings(prompt="x", width=60), "multiple of 8"),
        (GenerationSettings(prompt="x", scheduler="nope"), "unknown scheduler"),
    ]:
        with pytest.raises(GenerationError, match=message):
            generate(pipe, settings)
    with pytest.raises(GenerationError, match="adapter tags but no adapter stack"):
        generate(pipe, GenerationSettings(prompt="x <lora:a:1>"))
    with pytest.raises(GenerationError, match="no adapter folder"):
        generate(pipe, GenerationSettings(prompt="x <lora:a:1>"), stack=AdapterStack(pipe))
    with pytest.raises(PromptTagError):
        generate(pipe, GenerationSettings(prompt="x <lora:a:b:c:d>"), stack=AdapterStack(pipe))


def test_scheduler_names_round_trip(pipe):
    for key in ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "pndm", "heun"):
        sampler, schedule = describe_scheduler(make_scheduler(key, pipe.scheduler.config))
        assert scheduler_key(sampler, schedule) == key
    assert scheduler_key("DPM++ 2M", "Automatic") == "dpmpp_2m"


A1111_TEXT = """masterpiece, a cat <lora:ink:0.6>
second line
Negative prompt: lowres, bad hands
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "ink: 0123456789ab", Version: v1.10.1"""


def test_png_info_reads_a1111_text_and_round_trips(tmp_path):
    params = parse_parameters(A1111_TEXT)
    assert params.prompt == "masterpiece, a cat <lora:ink:0.6>\nsecond line"
    assert params.negative_prompt == "lowres, bad hands"
    assert (params.steps, params.sampler, params.schedule_type, params.cfg_scale, params.seed) == (28, "DPM++ 2M", "Karras", 6.5, 1234567)
    assert (params.width, params.height, params.model_hash, params.lora_hashes) == (512, 768, "6ce0161689", {"ink": "0123456789ab"})
    assert parse_parameters(format_parameters(params)) == params
    odd = ImageParameters(prompt='say "hi", then: go', negative_prompt="", seed=3, extra={"Denoising strength": "0.5", "Note": 'a "q", b'})
    assert parse_parameters(format_parameters(odd)) == odd
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", parameters=format_parameters(odd))
    assert parse_parameters(read_png_parameters(path)) == odd
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_png(Image.new("RGB", (8, 8)), path, parameters="")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(KeyError, match="no 'parameters' text chunk"):
        read_png_parameters(tmp_path / "plain.png")
    assert make_grid([Image.new("RGB", (8, 8))] * 5).size == (24, 16)
