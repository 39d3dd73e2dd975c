"""python -m trainer.prepare --images=DIR --output=DIR_OR_GS: image folder -> TFRecord shards.

Writes the format of trainer/records.py: per split, `<split>-00000-of-000NN.tfrecord` shards,
`<split>-index.json` (each record's source path and label, in record order), `labels.txt`,
and last `dataset_info.json`: counts per split and class, shards, the image policy and the
files skipped with reasons. `--data=OUTPUT` then
trains from the shards. Images are stored as they are, or with --max_side=N re-encoded as
JPEG with the longer side at most N, so that training decodes less.

TensorFlow is loaded once the flags are known to be good (in main, and by the functions that
need it), so that --help and a flag error answer at once.
"""

import concurrent.futures
import io
import math
import os

from absl import flags
import numpy as np
from PIL import Image

from trainer import config as config_lib
from trainer.config import Config
from trainer.cli import loading_tensorflow, run_main
from trainer.errors import UserError, first_line

flags.DEFINE_string("images", None, "Image folder ROOT with train/<class>/ (and optionally "
                    "validation/<class>/), local or gs://.")
flags.DEFINE_string("output", None, "Where the shards go, local or gs://.")
flags.DEFINE_integer("shard_size_mb", 100, "Target size of one shard.")
flags.DEFINE_integer("min_shards", 8, "At least this many shards per split (when it has that "
                     "many images), so that each input pipeline can read its own files.")
flags.DEFINE_integer("max_side", 0, "Downscale images whose longer side exceeds this, keeping "
                     "the aspect ratio (0: store images as they are).")
flags.DEFINE_float("validation_split", 0.2, "Held out of train/ when there is no validation/.")
flags.DEFINE_integer("seed", 42, "Seed for the validation split and the record order.")
flags.DEFINE_integer("workers", 0, "Threads reading and encoding images (0: one per CPU).")
flags.DEFINE_bool("overwrite", False, "Replace a prepared dataset already at --output.")
flags.DEFINE_integer("max_image_pixels", Config.max_image_pixels, "Images with more pixels "
                     "are skipped and counted, never decoded.")
FLAGS = flags.FLAGS


def encode(path, max_side):
    """The bytes to store: the file itself, or a downscaled JPEG of it; None, with the reason,
    for an image that cannot be read, decoded or re-encoded (one image never stops the
    conversion). Each image is read once, here."""
    from trainer import sources
    content, why = sources.read_checked(path, FLAGS.max_image_pixels,
                                        Config.storage_retry_seconds)
    if not max_side or why:
        return content, why
    try:
        image = Image.open(io.BytesIO(content))
        if max(image.size) <= max_side:
            return content, None
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return None, f"cannot be re-encoded ({first_line(error)})"
    return buffer.getvalue(), None


def write_split(name, split, num_classes, output, pool):
    """Shards one split in a seeded order, streaming: a window of images in memory at a time.
    Returns its dataset_info entry and the images it had to leave out, as (path, reason)."""
    import tensorflow as tf
    from trainer import files, progress, records, sources
    order = np.random.default_rng(FLAGS.seed).permutation(len(split))
    # The listing's sizes: the shards' count is known before any image is read.
    listed = sum(int(stamp.partition(":")[0]) for stamp in split.stamps if stamp[0].isdigit())
    count = max(min(FLAGS.min_shards, len(order)),
                math.ceil(listed / (FLAGS.shard_size_mb * 2**20)))
    bounds = np.linspace(0, len(order), count + 1).astype(int)
    kept, skipped, total, shards, per_shard = [], [], 0, [], []
    report = progress.Report(f"{name} images prepared", len(order))
    for shard in range(count):
        shard_name = f"{name}-{shard:05d}-of-{count:05d}.tfrecord"
        part = order[bounds[shard]:bounds[shard + 1]]
        with tf.io.TFRecordWriter(files.join(output, shard_name)) as writer:
            encoded = sources.in_windows(pool, lambda i: encode(split.paths[i], FLAGS.max_side),
                                         part)
            for index, (content, why) in zip(part, encoded):
                if why:
                    skipped.append((str(split.paths[index]), why))
                    continue
                writer.write(records.serialize(content, int(split.labels[index]), len(kept)))
                kept.append(index)
                total += len(content)
                report.update(len(kept) + len(skipped))
        shards.append(shard_name)
        per_shard.append(len(kept) - sum(per_shard))
        print(f"{name}: shard {shard + 1}/{count} written ({per_shard[-1]} images)", flush=True)
    report.done()
    files.write_json(files.join(output, f"{name}-index.json"), {
        "paths": [str(split.paths[i]) for i in kept],
        "labels": [int(split.labels[i]) for i in kept]})
    return {"count": len(kept), "bytes": total, "shards": shards,
            "records_per_shard": per_shard,
            "per_class": np.bincount(split.labels[np.array(kept, dtype=int)],
                                     minlength=num_classes)}, skipped


def _remove_earlier_output(output):
    """Removes what an earlier prepare wrote to output: a dataset --overwrite replaces, or the
    shards of one that was stopped before it finished (it has no dataset_info.json)."""
    from trainer import files, records
    if not files.exists(output):
        return
    earlier = [name for name in files.listdir(output) if records.written_first(name)
               or name in (records.DATASET_INFO, "labels.txt")]
    for name in earlier:
        files.remove_tree(files.join(output, name))
    if earlier:
        print(f"removed {len(earlier)} file(s) of an earlier prepare from {output}", flush=True)


def main(argv):
    del argv
    if not FLAGS.images or not FLAGS.output:
        raise UserError("pass --images=ROOT (an image folder) and --output=DIR (local or gs://)")
    with loading_tensorflow():
        import tensorflow as tf
        from trainer import files, records, sources
    tf.get_logger().setLevel("ERROR")
    output = FLAGS.output.rstrip("/")
    info_path = files.join(output, records.DATASET_INFO)
    if files.exists(info_path) and not FLAGS.overwrite:
        raise UserError(f"{output} already holds a prepared dataset: use another --output, "
                        "or --overwrite to replace it")
    _remove_earlier_output(output)
    source = sources.scan(config_lib.data_root(FLAGS.images), FLAGS.validation_split, FLAGS.seed)
    print(sources.describe(source), flush=True)
    tf.io.gfile.makedirs(output)
    splits, skipped = {}, []
    with concurrent.futures.ThreadPoolExecutor(FLAGS.workers or os.cpu_count()) as pool:
        for name, split in (("train", source.train), ("validation", source.validation)):
            splits[name], left_out = write_split(name, split, len(source.class_names), output,
                                                 pool)
            skipped += left_out
            empty = [class_name for class_name, count in zip(source.class_names,
                                                             splits[name]["per_class"])
                     if not count]
            if empty:
                raise UserError(f"{name} has no readable image of class(es) "
                                f"{', '.join(empty)}: fix or remove their folders, then run "
                                "prepare again")
            splits[name]["per_class"] = {class_name: int(count) for class_name, count in
                                         zip(source.class_names, splits[name]["per_class"])}
    files.write_lines(files.join(output, "labels.txt"), source.class_names)
    files.write_json(info_path, {
        "format": records.FORMAT,
        "source": source.root,
        "class_names": source.class_names,
        "validation_source": source.validation_source,
        "image_policy": {"max_side": FLAGS.max_side or None,
                         "encoding": "JPEG quality 90 when downscaled, else the original file"},
        "splits": splits,
        "skipped": [{"path": path, "reason": why} for path, why in skipped],
    })
    print(f"prepared {output}: {splits['train']['count']} train and "
          f"{splits['validation']['count']} validation images in "
          f"{len(splits['train']['shards'])} + {len(splits['validation']['shards'])} shards; "
          f"{len(skipped)} skipped", flush=True)


if __name__ == "__main__":
    run_main(main)
