"""A small CLIP tokenizer generated from the project's own word list.

Real CLIP tokenizers are byte-level BPE with ~49k merges. This one has the same format
(vocab.json + merges.txt read by `CLIPTokenizer`): the 256 byte symbols, the same symbols with
the end-of-word marker `</w>`, BPE merges learned on `vocabulary_words()` until every one of
those words is a single token, and `<|startoftext|>` / `<|endoftext|>`. Any other text still
tokenizes (into characters), like a rare word does in real CLIP.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from pipelines.synthetic import vocabulary_words

END_OF_WORD = "</w>"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Greedy BPE on `words` (each counted once) until every word is one symbol.

    Ties between equally frequent pairs are broken by the pair's text, so the result is
    deterministic.
    """
    corpus = [tuple(w[:-1]) + (w[-1] + END_OF_WORD,) for w in sorted(set(words)) if w]
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in corpus:
            pairs.update(zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = []
        for symbols in corpus:
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged.append(tuple(out))
        corpus = merged


def build_vocab(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-ordered vocabulary (bytes, bytes + `</w>`, merges, specials) and the merges."""
    symbols = list(bytes_to_unicode().values())
    merges = learn_merges(words)
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer(out_dir: str | Path, *, pad_token: str = EOS, words: Sequence[str] | None = None) -> Path:
    """Write vocab.json, merges.txt and the configs of a `CLIPTokenizer` into `out_dir`.

    `pad_token` is `<|endoftext|>` for SD1 / SDXL's first tokenizer and `!` for the OpenCLIP
    tokenizers of SD2 / SDXL's second tokenizer, as in the real checkpoints.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(list(words) if words is not None else vocabulary_words())
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return out
