"""The `PATH[:STRENGTH[:TE_STRENGTH]]` adapter argument shared by lyco-generate and lyco-merge."""
from __future__ import annotations


def split_adapter_arg(text: str) -> tuple[str, tuple[float, ...]]:
    """(path, up to two numbers). Numbers are taken from the right, so a path containing ':' (a Windows
    drive) is kept whole: the first number is the strength (the UNet's when a second one follows),
    the second the text encoders' strength."""
    pieces = text.split(":")
    numbers: list[float] = []
    while len(pieces) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(pieces[-1]))
        except ValueError:
            break
        pieces.pop()
    return ":".join(pieces), tuple(numbers)
