"""Deterministic generator for the shipped image-and-text example (the tiny-vl default's data).

Coloured shapes on white, 112x112 pixels (16 image tokens for the tiny-vl processor), with
questions about their colour, shape and count: a random-init vision tower can learn colour
from pixels within a few hundred CPU steps, and every answer is checkable. Run
``python -m training.example_images`` to rewrite ``examples/data/shapes*`` (PNG files come out
byte-identical for the same seed and Pillow's zlib).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from training.example_data import EXAMPLES_DIR

SEED = 20261206
SIZE = 112
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "What shape are they?",
    "count": "How many shapes are there?",
}
IMAGES = 120
IMAGE_DIR = "shapes"


def draw(colour: str, shape: str, count: int, rng: random.Random):
    """One image: `count` shapes of one kind and colour, each in its own quadrant."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    half, r = SIZE // 2, 16
    for quadrant in rng.sample(range(4), count):
        cx = (quadrant % 2) * half + half // 2 + rng.randint(-6, 6)
        cy = (quadrant // 2) * half + half // 2 + rng.randint(-6, 6)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            pen.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            pen.rectangle(box, fill=COLOURS[colour])
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def answer(kind: str, colour: str, shape: str, count: int) -> str:
    if kind == "colour":
        return f"They are {colour}." if count > 1 else f"It is {colour}."
    if kind == "shape":
        return f"They are {PLURAL[shape]}." if count > 1 else f"It is a {shape}."
    return f"There {'are' if count > 1 else 'is'} {count}."


def shapes_rows(out: Path, n: int = IMAGES, seed: int = SEED) -> list[dict]:
    """Write `n` images under out/shapes/ and return one question row per image (messages with
    an image part, and the image's path relative to `out`)."""
    rng = random.Random(seed)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3)
        kind = list(QUESTIONS)[i % len(QUESTIONS)]
        path = f"{IMAGE_DIR}/{i:04d}.png"
        draw(colour, shape, count, rng).save(out / path, optimize=True)
        question = QUESTIONS[kind]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer(kind, colour, shape, count)}]},
                ],
                "images": [path],
            }
        )
    return rows


HEDGES = ("I am not sure what the picture shows.", "It is hard to say from here.", "Maybe, I cannot tell.")


def hedge(number: int) -> str:
    """The answer the pairs teach against: a hedge that reads nothing from the picture."""
    return HEDGES[number % len(HEDGES)]


def shapes_pairs(rows: list[dict]) -> list[dict]:
    """The same questions as preference pairs (DPO's form with images): the answer chosen over a
    hedge (as the text DPO example prefers the crisp answer): a tiny model learns this in a few
    dozen steps, where telling a right colour from a wrong one takes SFT first."""
    return [
        {
            "prompt": row["messages"][:1],
            "chosen": row["messages"][1:],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": hedge(i)}]}],
            "images": row["images"],
        }
        for i, row in enumerate(rows)
    ]


def write_examples(out: Path = EXAMPLES_DIR) -> None:
    rows = shapes_rows(out)
    for name, written in (("shapes_vqa.jsonl", rows), ("shapes_pairs.jsonl", shapes_pairs(rows))):
        with (out / name).open("w") as f:
            for row in written:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write_examples()
