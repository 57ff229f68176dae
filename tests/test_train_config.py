"""lyco-train config: every kind of error is reported before any model loads, with the field and a suggestion."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from trainers.config import TrainConfig
from trainers.config_io import ConfigError, apply_overrides, check_environment, dump_toml, load_config, parse_value, validate
from trainers.config_reference import render_reference

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "5_sks"
    folder.mkdir()
    return folder


def problems(data: dict, sets: list[str] = ()) -> list[str]:
    try:
        config = validate(apply_overrides(data, sets))
    except ConfigError as err:
        return err.problems
    return check_environment(config)


def base(images: Path) -> dict:
    return {"dataset": {"subsets": [{"image_dir": str(images)}]}, "logging": {"trackers": []}}


def test_minimal_config_is_valid_with_working_defaults(images):
    config = validate(base(images))
    assert config.network.algo == "lora" and config.optimizer.type == "AdamW" and config.model.path == "builtin:tiny-sd"
    assert check_environment(config) == []


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["network.rnak=4"], "network.rnak: unknown key; did you mean 'rank'?"),
        (["training.learning_rate=1e-4"], "training.learning_rate: unknown key; did you mean optimizer.learning_rate?"),
        (["dataset.subsets.0.image_dri='x'"], "dataset.subsets[0].image_dri: unknown key; did you mean 'image_dir'?"),
        (["netwrok.rank=4"], "netwrok: unknown key; did you mean 'network'?"),
        (["network.overrides=[{pattern='mid', rnk=3}]"], "network.overrides[0].rnk: unknown key; did you mean 'rank'?"),
        (["training.max_train_steps='10'"], "training.max_train_steps: expected an integer, got str '10'"),
        (["dataset.resolution='64'"], "dataset.resolution: expected an integer or a list, got str '64'"),
        (["dataset.flip_aug=1"], "dataset.flip_aug: expected true or false, got int 1"),
        (["network.algo='lorra'"], "network.algo: 'lorra' is not one of ['lora', 'locon', 'loha', 'lokr']; did you mean 'lora'?"),
        (["optimizer.type='adamw8'"], "did you mean 'AdamW"),
        (["network.preset='attn-mpl'"], "network.preset: unknown preset 'attn-mpl'"),
        (["network.dropout=1.5"], "network.dropout: Input should be less than 1"),
        (["dataset.cache_text_encoder_outputs=true"], "dataset.cache_text_encoder_outputs with network.train_text_encoder"),
        (["dataset.cache_latents='memory'", "dataset.random_crop=true"], "cache_latents = 'memory' with random_crop"),
        (["dataset.cache_text_encoder_outputs=true", "network.train_text_encoder=false", "dataset.shuffle_caption=true"],
         "cache_text_encoder_outputs with shuffle_caption"),
        (["training.max_train_epochs=2", "training.max_train_steps=5"], "set max_train_steps or max_train_epochs, not both"),
        (["network.train_unet=false", "network.train_text_encoder=false"], "nothing to train"),
        (["dataset.min_bucket_reso=512", "dataset.max_bucket_reso=256"], "min_bucket_reso (512) > max_bucket_reso (256)"),
        (["training.validate_every_n_steps=5"], "needs dataset.validation_split"),
        (["optimizer.lr_warmup_steps=1.5"], "lr_warmup_steps: a float is a fraction"),
        (["dataset.subsets.0.image_dir='/no/such/folder'"], "dataset.subsets[0].image_dir: folder /no/such/folder does not exist"),
        (["network.weights='/no/such.safetensors'"], "network.weights: file /no/such.safetensors does not exist"),
        (["model.path='/no/such/model'"], "model.path: model path /no/such/model does not exist"),
        (["model.path='builtin:tiny-sd3'"], "model.path: unknown builtin model 'builtin:tiny-sd3'"),
        (["optimizer.type='AdamW8bit'"], "optimizer.type: AdamW8bit needs the bitsandbytes package"),
        (["optimizer.type='Prodigy'"], "optimizer.type: Prodigy needs the prodigyopt package"),
        (["training.attention='xformers'"], "training.attention: xformers is not installed"),
    ],
)
def test_every_config_error_names_the_field(images, sets, expected):
    found = problems(base(images), sets)
    if "bitsandbytes" in expected and _installed("bitsandbytes") or "prodigyopt" in expected and _installed("prodigyopt") \
            or "xformers" in expected and _installed("xformers"):
        pytest.skip("the optional package is installed here")
    assert any(expected in p for p in found), found


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_all_problems_are_reported_at_once(images):
    found = problems(base(images), ["network.rnak=4", "training.seed='x'", "sampling.stpes=3"])
    assert len(found) == 3


def test_no_images_configured_is_an_error():
    assert any("no images" in p for p in problems({}))


def test_optimizer_names_are_case_insensitive(images):
    assert validate(apply_overrides(base(images), ["optimizer.type='adafactor'"])).optimizer.type == "Adafactor"


def test_set_parses_toml_values_and_list_indices(images):
    data = apply_overrides(base(images), ["optimizer.learning_rate=3e-4", "dataset.subsets.0.num_repeats=3",
                                          "network.include=['mid_block']", "saving.output_name=plain-text"])
    config = validate(data)
    assert config.optimizer.learning_rate == 3e-4 and config.dataset.subsets[0].num_repeats == 3
    assert config.network.include == ["mid_block"] and config.saving.output_name == "plain-text"
    assert parse_value("true") is True and parse_value("[1, 2]") == [1, 2] and parse_value("a b") == "a b"
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(base(images), ["dataset.subsets.3.num_repeats=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides(base(images), ["dataset.batch_size"])


def test_network_section_maps_to_the_core_config(images):
    data = apply_overrides(base(images), ["network.algo='lokr'", "network.factor=4", "network.conv_rank=2", "network.train_text_encoder=false",
                                          "network.overrides=[{pattern='mid_block', rank=16, algo='loha'}]"])
    core = validate(data).network.to_core()
    assert core.algo == "lokr" and core.factor == 4 and core.conv_rank == 2 and core.parts == ("unet",)
    assert core.overrides[0].settings == {"algo": "loha", "rank": 16} and core.overrides[0].pattern == "mid_block"


def test_printed_config_round_trips(images):
    data = apply_overrides(base(images), ["sampling.prompts=[{prompt='sks', seed=3}]", "optimizer.args={d_coef=2.0}",
                                          "training.max_train_epochs=2"])
    config = validate(data)
    again = validate(tomllib.loads(dump_toml(config)))
    assert again == config


def test_config_reference_is_current_and_complete():
    text = (REPO / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert text == render_reference(), "docs/config-reference.md is stale: run `python -m trainers.config_reference`"
    for section, info in TrainConfig.model_fields.items():
        for key in info.annotation.model_fields:
            assert f"`{section}.{key}`" in text


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    config = load_config(path, check_paths=False)
    assert config.dataset.subsets or config.dataset.train_data_dir


def test_cli_reports_errors_before_loading_any_model(images, tmp_path, monkeypatch, capsys):
    import pipelines.models
    from trainers.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipelines.models, "load_pipeline", no_loading)
    config = tmp_path / "bad.toml"
    config.write_text(f'[dataset]\ntrain_data_dir = "{images.parent}"\n[network]\nrnak = 4\n[training]\nseed = "x"\n')
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "network.rnak: unknown key; did you mean 'rank'?" in err and "training.seed: expected an integer" in err
    config.write_text(f'[dataset]\ntrain_data_dir = "{images.parent}"\n[optimizer]\ntype = "Lion"\n[network]\nweights = "gone.safetensors"\n')
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "network.weights: file gone.safetensors does not exist" in err


def test_cli_print_config_applies_set(images, tmp_path):
    config = tmp_path / "ok.toml"
    config.write_text(f'[[dataset.subsets]]\nimage_dir = "{images}"\n')
    out = subprocess.run([sys.executable, "-m", "trainers.cli", "--config", str(config), "--set", "network.rank=4", "--print-config"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert tomllib.loads(out.stdout)["network"]["rank"] == 4
