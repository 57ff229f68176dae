"""A1111 prompt tags: every syntax form, tag removal, formatting round trip, name resolution against a folder."""
from __future__ import annotations

import pytest

from pipelines.prompt_tags import AdapterLibrary, AdapterTag, PromptTagError, format_tag, parse_prompt, parse_tag, strip_tags


def _one(prompt: str) -> AdapterTag:
    _, tags = parse_prompt(prompt)
    assert len(tags) == 1
    return tags[0]


@pytest.mark.parametrize(
    ("tag", "te", "unet", "lbw"),
    [
        ("<lora:ink>", 1.0, 1.0, None),
        ("<lora:ink:0.7>", 0.7, 0.7, None),
        ("<lora:ink:-.5>", -0.5, -0.5, None),
        ("<lora:ink:0.3:0.9>", 0.3, 0.9, None),
        ("<lyco:ink:0.3:0.9>", 0.3, 0.9, None),
        ("<lora:ink:te=0.2>", 0.2, 1.0, None),
        ("<lora:ink:unet=0.4>", 1.0, 0.4, None),
        ("<lora:ink:0.8:te=0.1>", 0.1, 0.8, None),
        ("<lora:ink:0.8:unet=0.25>", 0.8, 0.25, None),
        ("<lora:ink:te=0.2:unet=0.4>", 0.2, 0.4, None),
        ("<lora:ink:1:lbw=OUTALL>", 1.0, 1.0, "OUTALL"),
        ("<lora:ink:0.6:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>", 0.6, 0.6, (1.0,) + (0.0,) * 7 + (1.0,) * 9),
        ("<lora:ink:1:MIDD>", 1.0, 1.0, "MIDD"),
        ("<lora:ink:0.5:0.7:OUTS>", 0.5, 0.7, "OUTS"),
        ("<lora:ink : 0.5 : unet = 0.7 >", 0.5, 0.7, None),
    ],
)
def test_every_syntax_form(tag, te, unet, lbw):
    parsed = _one(f"a cat, {tag}, blue")
    assert (parsed.name, parsed.te, parsed.unet, parsed.lbw) == ("ink", te, unet, lbw)
    assert parsed.text == tag


def test_tags_are_removed_and_nothing_else_changes():
    prompt, tags = parse_prompt("a cat <lora:ink:0.5>, blue <lyco:soft_style-v2:1:0.2>sky")
    assert prompt == "a cat , blue sky"
    assert [t.name for t in tags] == ["ink", "soft_style-v2"]
    assert parse_prompt("no tags here") == ("no tags here", [])
    assert strip_tags("ugly <lora:ink:1>") == "ugly "


def test_names_with_spaces_dots_and_folders():
    assert _one("<lora:styles/my style v1.5:0.5>").name == "styles/my style v1.5"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora:ink:strong>", "strength 'strong' is not a number"),
        ("<lora:ink:1:2:3>", "too many values"),
        ("<lora:ink:dyn=4>", r"unknown argument dyn=.*te=, unet=, lbw="),
        ("<lora:ink:te=1:te=2>", "te= is given twice"),
        ("<lora:ink:1:OUTS:lbw=ALL>", "block weights are given twice"),
        ("<lora::1>", "adapter name is empty"),
        ("<lora:ink:1:lbw=1,x,1>", "block weight 'x' is not a number"),
        ("<lora:ink:inf>", "not finite"),
        ("<hypernet:foo:1>", "lora:...> and <lyco:...> tags only"),
        ("<lora:ink:1> and <lora:ink:0.5>", "tagged twice"),
    ],
)
def test_malformed_tags_raise_clear_errors(prompt, message):
    with pytest.raises(PromptTagError, match=message):
        parse_prompt(prompt)


@pytest.mark.parametrize(
    "tag",
    [AdapterTag("a", 0.5, 0.5), AdapterTag("a", 0.25, 1.5), AdapterTag("b", 1, 1, "OUTALL"), AdapterTag("c", -1, 2, (1.0, 0.5) + (0.0,) * 15)],
)
def test_format_round_trips(tag):
    text = tag.format()
    parsed = _one(text)
    assert (parsed.name, parsed.te, parsed.unet, parsed.lbw) == (tag.name, tag.te, tag.unet, tag.lbw)


def test_format_is_the_short_a1111_form():
    assert format_tag("ink", te=0.5) == "<lora:ink:0.5>"
    assert format_tag("ink", te=0.5, unet=0.8) == "<lora:ink:0.5:0.8>"
    assert format_tag("ink", te=1, unet=1, lbw="OUTS") == "<lora:ink:1:lbw=OUTS>"
    assert parse_tag("lora", "x:0.1") == AdapterTag("x", 0.1, 0.1, None, "<lora:x:0.1>")


@pytest.fixture()
def library(tmp_path):
    for rel in ("ink.safetensors", "styles/Soft.safetensors", "styles/dup.safetensors", "chars/dup.safetensors", "notes.txt"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return AdapterLibrary(tmp_path)


def test_library_resolves_stems_paths_and_case(library, tmp_path):
    assert library.resolve("ink") == tmp_path / "ink.safetensors"
    assert library.resolve("Soft") == tmp_path / "styles" / "Soft.safetensors"
    assert library.resolve("soft") == tmp_path / "styles" / "Soft.safetensors"
    assert library.resolve("chars/dup") == tmp_path / "chars" / "dup.safetensors"
    assert "ink" in library and "notes" not in library
    assert library.names() == ["Soft", "chars/dup", "ink", "styles/Soft", "styles/dup"]


def test_unknown_name_lists_the_available_adapters(library):
    with pytest.raises(PromptTagError, match=r"no adapter named 'inq' in .*available: Soft, chars/dup, ink, styles/Soft, styles/dup"):
        library.resolve("inq")


def test_ambiguous_name_asks_for_the_folder_form(library):
    with pytest.raises(PromptTagError, match="matches several files.*chars/dup, styles/dup.*folder/name"):
        library.resolve("dup")


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AdapterLibrary(tmp_path / "nope")
    with pytest.raises(PromptTagError, match="none: the folder has no .safetensors files"):
        AdapterLibrary(tmp_path).resolve("x")
