"""Synthetic datasets: rendering, classifier, concept dataset writer + checker, lyco-dataset CLI."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.synthetic import (
    BACKGROUNDS,
    COLOURS,
    CONCEPT_TRIGGER,
    ShapeSpec,
    all_specs,
    base_dataset,
    concept_score,
    concept_scores,
    dominant_foreground_colour,
    quality_prompts,
    render_concept,
    render_shape,
    write_base_dataset,
    write_concept_dataset,
)
from pipelines.synthetic_cli import main as dataset_main


def test_rendering_is_deterministic_and_sized():
    spec = ShapeSpec("red", "star", "white")
    a = np.asarray(render_shape(spec, seed=3))
    b = np.asarray(render_shape(spec, seed=3))
    c = np.asarray(render_shape(spec, seed=4))
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_classifier_reads_every_rendered_colour():
    images, labels = base_dataset(len(all_specs()), seed=1)
    assert [dominant_foreground_colour(im) for im in images] == [spec.colour for spec in labels]


def test_classifier_accepts_arrays_and_reports_none_for_neutral_images():
    grey = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert dominant_foreground_colour(grey) == "none"
    blue = np.zeros((3, 16, 16), dtype=np.float32)
    blue[2] = 0.9
    assert dominant_foreground_colour(blue) == "blue"


def test_base_dataset_is_balanced_and_prompts_cover_all_combinations():
    _, labels = base_dataset(2 * len(all_specs()), seed=0)
    counts = {spec: labels.count(spec) for spec in set(labels)}
    assert set(counts.values()) == {2}
    prompts = quality_prompts()
    assert len(prompts) == len(COLOURS) * 4 * len(BACKGROUNDS) >= 48
    assert prompts[0][0] == "a red circle on a white background"


def test_concept_writer_kohya_layout(tmp_path):
    folder = write_concept_dataset(tmp_path / "sks", n_images=6, repeats=5, seed=2)
    assert folder == tmp_path / "sks" / f"5_{CONCEPT_TRIGGER}"
    pngs = sorted(folder.glob("*.png"))
    txts = sorted(folder.glob("*.txt"))
    assert [p.stem for p in pngs] == [t.stem for t in txts] == [f"{i:04d}" for i in range(6)]
    assert all(re.search(rf"\b{CONCEPT_TRIGGER}\b", t.read_text()) for t in txts)
    with Image.open(pngs[0]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    assert [p.name for p in (tmp_path / "sks").iterdir()] == [f"5_{CONCEPT_TRIGGER}"]


def test_concept_writer_never_clobbers(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(out)):
        write_concept_dataset(out, n_images=2)
    assert (out / "keep.txt").read_text() == "mine"
    write_concept_dataset(out, n_images=2, repeats=3, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [f"3_{CONCEPT_TRIGGER}"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging folder left behind


def test_concept_writer_is_deterministic(tmp_path):
    a = write_concept_dataset(tmp_path / "a", n_images=3, seed=5)
    b = write_concept_dataset(tmp_path / "b", n_images=3, seed=5)
    for name in ("0000.png", "0002.png", "0001.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_base_writer_captions(tmp_path):
    folder = write_base_dataset(tmp_path / "shapes", n_images=4)
    captions = [p.read_text().strip() for p in sorted(folder.glob("*.txt"))]
    assert len(captions) == 4 and all(c.endswith("background") for c in captions)


def test_checker_scores_concept_high_and_base_shapes_low():
    concept = [render_concept(seed=i, background=bg) for i, bg in enumerate(list(BACKGROUNDS) * 3)]
    shapes, _ = base_dataset(36, seed=9)
    assert concept_score(concept) > 0.8
    assert concept_score(shapes) < 0.05
    assert min(concept_scores(concept)) > 0.5
    assert concept_score([]) == 0.0


@pytest.fixture(scope="module")
def tiny_sd():
    from pipelines.models import load_pipeline

    return load_pipeline("builtin:tiny-sd")


def test_checker_scores_base_model_images_low(tiny_sd):
    """The untrained concept: the base model's "sks" images are not teal striped hexagons."""
    generator = torch.Generator().manual_seed(0)
    prompts = [f"a photo of {CONCEPT_TRIGGER}", f"{CONCEPT_TRIGGER} on a white background"] * 4
    images = tiny_sd(prompts, num_inference_steps=10, generator=generator).images
    assert concept_score(images) < 0.2


def test_cli_concept_score_and_no_clobber(tmp_path, capsys):
    out = tmp_path / "sks"
    assert dataset_main(["concept", "--out", str(out), "--n-images", "3", "--repeats", "2"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    assert dataset_main(["concept", "--out", str(out)]) == 2
    assert str(out) in capsys.readouterr().err
    assert dataset_main(["score", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("mean concept score") and float(last.split()[3]) > 0.8
    assert dataset_main(["base", "--out", str(tmp_path / "base"), "--n-images", "2"]) == 0


def test_colour_variety_images_are_deterministic_and_leave_the_base_palette():
    from pipelines.synthetic import colour_variety_dataset, render_colour_variety

    a = np.asarray(render_colour_variety(seed=5))
    assert a.shape == (64, 64, 3) and np.array_equal(a, np.asarray(render_colour_variety(seed=5)))
    images = colour_variety_dataset(60, seed=0)
    assert not any(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(images, colour_variety_dataset(60, seed=1)))
    hues = {dominant_foreground_colour(im) for im in images}
    # the base data has red, yellow and green and blue only; the VAE must also see the hues between
    assert {"orange", "teal", "purple"} <= hues, hues
