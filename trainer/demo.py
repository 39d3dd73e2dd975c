"""The demo dataset: real image files, generated deterministically, that need no network.

Three classes of shapes (circles, squares, triangles) with class-typical colours on grey
noise, written as JPEG and PNG files in the same train/<class>/ and validation/<class>/ layout
as user data, so the smoke job reads them through the real pipeline. The benchmarks ask for
photos instead: the same shapes on smooth random scenes, all JPEG.
"""

import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circles", "squares", "triangles")
_COLOURS = ((220, 40, 40), (40, 200, 40), (40, 60, 220))
VERSION = 1


def _scene(rng, width, height):
    """A random colour scene whose spectrum falls off like a photograph's (amplitude ~ 1/f^1.5).

    JPEG then compresses it to a photo's size (about 40 KB at 500x375, quality 90) and spends
    a photo's decode work on it; pixel noise would not compress at all."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    falloff = np.maximum(np.hypot(fx, fy), 1 / max(width, height)) ** 1.5
    shape = (3, height, fx.shape[1])
    spectrum = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / falloff
    scene = np.fft.irfft2(spectrum, s=(height, width), axes=(1, 2))
    scene = rng.uniform(90, 160) + 45 * (scene - scene.mean()) / scene.std()
    return Image.fromarray(np.clip(np.moveaxis(scene, 0, -1), 0, 255).astype(np.uint8))


def _draw(kind, rng, width, height, photo=False):
    if photo:
        image = _scene(rng, width, height)
    else:
        grey = int(rng.integers(60, 200))
        image = Image.new("RGB", (width, height), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(np.clip(c + rng.normal(0, 25), 0, 255)) for c in _COLOURS[kind])
    size = min(width, height)
    radius = int(rng.integers(size // 4, int(size / 2.5)))
    cx = int(rng.integers(radius, width - radius))
    cy = int(rng.integers(radius, height - radius))
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if kind == 0:
        draw.ellipse(box, fill=colour)
    elif kind == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                     fill=colour)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 2 if photo else 10,
                                                              (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write(root, train_per_class=120, validation_per_class=30, size=(128, 128), seed=0,
          classes=CLASSES, photos=False):
    """Writes the dataset under root (split/class/file); same arguments, same bytes.
    size is (width, height); classes a prefix of CLASSES; photos: JPEGs of shapes on scenes
    that compress like photographs (see _scene), for the benchmarks."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("validation", validation_per_class)):
        for kind, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for index in range(count):
                image = _draw(kind, rng, *size, photo=photos)
                # Every fifth file a PNG, so the demo exercises more than one decoder.
                if index % 5 == 4 and not photos:
                    image.save(os.path.join(folder, f"{name}_{index:04d}.png"))
                else:
                    image.save(os.path.join(folder, f"{name}_{index:04d}.jpg"), quality=90)
    return root


def default_root():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "trainer", f"demo_v{VERSION}")


def ensure(root=None):
    """The demo folder, written once; concurrent workers each write aside and one rename wins."""
    root = root or default_root()
    if os.path.isdir(root):
        return root
    os.makedirs(os.path.dirname(root), exist_ok=True)
    staging = tempfile.mkdtemp(prefix="demo-", dir=os.path.dirname(root))
    write(staging)
    try:
        os.rename(staging, root)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return root
