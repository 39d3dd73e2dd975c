"""Classifying images with an exported model: what `python -m trainer.predict` prints and what
`trainer.load(model_dir).predict(...)` returns, one row per image."""

from trainer.config import Config
from trainer.errors import UserError


def export_dir(model_dir):
    """The export/ folder of a run's model_dir, or the folder itself when it is an export."""
    from trainer import files
    for candidate in (model_dir, files.join(model_dir, "export")):
        if files.exists(files.join(candidate, "saved_model.pb")):
            return candidate
    raise UserError(f"no exported model in {model_dir}: pass the --model_dir of a finished "
                    "training run, or its export/ folder")


def expand(paths):
    """Files as given; folders (local or gs://) to the images anywhere beneath them."""
    import tensorflow as tf
    from trainer import files, sources
    images = []
    for path in paths:
        if not files.exists(path):
            raise UserError(f"{path} not found")
        if files.isdir(path):
            found = sorted(files.join(folder, name) for folder, _, names in tf.io.gfile.walk(path)
                           for name in names if name.lower().endswith(sources.IMAGE_EXTENSIONS))
            if not found:
                raise UserError(f"folder {path} holds no images ({', '.join(sources.IMAGE_EXTENSIONS)})")
            images += found
        else:
            images.append(path)
    return images


class Predictor:
    """An exported model, loaded once. Loading runs the SavedModel's graph: load only models
    you trust."""

    def __init__(self, model_dir, max_image_pixels=Config.max_image_pixels):
        from trainer import export
        self.export_dir = export_dir(model_dir)
        self.max_image_pixels = max_image_pixels
        self._serve = export.load(self.export_dir)

    def predict(self, paths, top_k=3):
        """One row per image of `paths` (a path, a folder, or a list of them), in the form of
        `trainer.predict --json`: {"path", "top": [{"class", "probability"}, ...]} best first,
        or {"path", "error"} for an image that could not be classified."""
        if top_k < 1:
            raise UserError(f"top_k={top_k}: give how many classes to return, 1 or more")
        paths = [paths] if isinstance(paths, str) else list(paths)
        if not paths:
            raise UserError("name one or more image files or folders to classify")
        return [self.row(path, top_k) for path in expand(paths)]

    def row(self, path, top_k):
        top, why = self._classify(path, top_k)
        if top is None:
            return {"path": path, "error": why}
        return {"path": path, "top": [{"class": name, "probability": round(probability, 6)}
                                      for name, probability in top]}

    def _classify(self, path, top_k):
        """([(class, probability)] best first, None) or (None, why the image was refused)."""
        import tensorflow as tf
        from trainer import files, sources
        content = files.read_bytes(path)
        pixels = sources.header_pixels(content)
        if pixels is not None and pixels > self.max_image_pixels:
            return None, f"more than --max_image_pixels={self.max_image_pixels} pixels"
        try:
            result = self._serve(image_bytes=tf.constant([content]))
        except tf.errors.InvalidArgumentError:
            return None, "cannot decode image"
        probabilities = result["probabilities"].numpy()[0]
        classes = [name.decode() for name in result["classes"].numpy()[0]]
        best = probabilities.argsort()[::-1][:top_k]
        return [(classes[index], float(probabilities[index])) for index in best], None
