"""Image files of every kind the data pipeline must take, and a few it must skip."""

import io
import os

import numpy as np
from PIL import Image


def _pixels(colour, size, seed):
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float32)
    return np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)


def save(path, colour=(200, 30, 30), size=48, kind="jpeg", seed=0):
    """Writes one image as `kind`: jpeg, png, bmp, gif, gray, rgba, cmyk or png16."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(_pixels(colour, size, seed))
    if kind == "jpeg":
        image.save(path, format="JPEG", quality=90)
    elif kind == "png":
        image.save(path, format="PNG")
    elif kind == "bmp":
        image.save(path, format="BMP")
    elif kind == "gif":
        frames = [image, Image.fromarray(_pixels((0, 0, 0), size, seed + 1))]
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:])
    elif kind == "gray":
        image.convert("L").save(path, format="JPEG")
    elif kind == "rgba":
        image.convert("RGBA").save(path, format="PNG")
    elif kind == "cmyk":
        image.convert("CMYK").save(path, format="JPEG")
    elif kind == "png16":
        gray = (np.asarray(image.convert("L")).astype(np.uint16) * 257)
        Image.fromarray(gray).save(path, format="PNG")  # PIL writes mode I;16 as 16-bit PNG
    else:
        raise ValueError(kind)
    return path


def save_corrupt(path, kind):
    """truncated (half a JPEG), empty (zero bytes) or text (a text file named .jpg)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(_pixels((10, 200, 10), 64, 3)).save(buffer, format="JPEG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    elif kind == "empty":
        content = b""
    else:
        content = b"this is not an image\n"
    with open(path, "wb") as handle:
        handle.write(content)
    return path


COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def folder(root, classes=("red", "green"), per_class=6, validation_per_class=0, size=48):
    """An image folder in the seed's layout: root/train/<class>/ (+ root/validation/<class>/)."""
    for split, count in (("train", per_class), ("validation", validation_per_class)):
        for name in classes if count else ():
            for index in range(count):
                save(os.path.join(root, split, name, f"{name}_{index}.jpg"), COLOURS[name], size,
                     seed=index + (1000 if split == "validation" else 0))
    return root
