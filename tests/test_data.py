import os

import numpy as np
import pytest
import tensorflow as tf

from tests import images
from trainer import cache
from trainer import caching
from trainer import pipelines
from trainer import sources
from trainer.config import Config
from trainer.errors import UserError

CHECKS = ["read up front", "in the pass"]


def checked(source, how, max_pixels=Config.max_image_pixels):
    """The source without its bad images, found by reading them all first (sources.check), or
    by the pass that decodes them once (caching.decode_once)."""
    assert not source.checked and not source.skipped  # listing reads no image
    if how == "read up front":
        return sources.check(source, max_pixels, 5)
    config = Config(image_size=8, batch_size=2, max_image_pixels=max_pixels)
    image_pass = caching.ImagePass(config, tf.distribute.get_strategy(), cache.Store(2**30),
                                   lambda: None)
    decoded, source = caching.decode_once(config, image_pass, source)
    assert [len(images) for [images] in decoded] == [len(source.train), len(source.validation)]
    return source


@pytest.mark.parametrize("kind", ["jpeg", "png", "bmp", "gif", "gray", "rgba", "cmyk", "png16"])
def test_every_format_decodes_to_8bit_rgb(tmp_path, kind):
    path = images.save(str(tmp_path / f"image.{kind}"), colour=(200, 30, 30), size=40, kind=kind)
    image = pipelines.decode_and_resize(tf.io.read_file(path), 32).numpy()
    assert image.shape == (32, 32, 3) and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 255
    if kind in ("jpeg", "png", "bmp", "gif", "rgba", "cmyk"):  # colour survives: red dominates
        mean = image.mean(axis=(0, 1))
        assert mean[0] > 150 and mean[1] < 90, (kind, mean)
    if kind in ("gray", "png16"):  # grey replicated over three channels, full 8-bit range used
        assert np.allclose(image[..., 0], image[..., 1]) and image.max() > 40


def test_a_batch_decodes_to_the_same_pixels_as_each_image_alone(tmp_path):
    paths = [images.save(str(tmp_path / f"image.{kind}"), colour=colour, size=40, kind=kind)
             for kind, colour in (("jpeg", (200, 30, 30)), ("png", (30, 200, 30)),
                                  ("gray", (90, 90, 90)), ("gif", (30, 30, 200)))]
    alone = np.stack([pipelines.decode_and_resize(tf.io.read_file(path), 32).numpy() for path in paths])
    from_paths = pipelines.decode_batch(tf.constant(paths), 32, read_files=True)
    from_bytes = pipelines.decode_batch(tf.stack([tf.io.read_file(path) for path in paths]), 32,
                                   read_files=False)
    assert from_paths.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(from_paths.numpy(), alone)
    np.testing.assert_array_equal(from_bytes.numpy(), alone)


@pytest.mark.parametrize("how", CHECKS)
def test_unreadable_files_are_skipped_and_counted(tmp_path, how):
    # Held out of train/ as listed, before the bad images are found: enough that some good
    # ones of each class are held out.
    root = images.folder(str(tmp_path), per_class=10)
    bad = [images.save_corrupt(str(tmp_path / "train" / "red" / f"bad_{kind}.jpg"), kind)
           for kind in ("truncated", "empty", "text")]
    (tmp_path / "train" / "red" / "notes.txt").write_text("ignored: not an image extension")
    extensions = {"png": "png", "gray": "jpg", "cmyk": "jpeg", "gif": "gif", "bmp": "BMP",
                  "rgba": "png", "png16": "png"}
    for kind, extension in extensions.items():
        images.save(str(tmp_path / "train" / "green" / f"odd_{kind}.{extension}"), kind=kind)
    folder = checked(sources.scan(root, validation_split=0.2, seed=1), how)
    assert sorted(folder.skipped) == sorted(bad)
    assert len(folder.train) + len(folder.validation) == 10 + 10 + 7
    assert folder.class_names == ["green", "red"]


@pytest.mark.parametrize("how", CHECKS)
def test_links_and_folders_that_cannot_be_read_are_skipped_with_their_reason(tmp_path, how):
    root = images.folder(str(tmp_path), per_class=3)
    red = tmp_path / "train" / "red"
    (red / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (red / "loop.jpg").symlink_to(red / "loop.jpg")
    (red / "adir.jpg").mkdir()
    folder = checked(sources.scan(root, validation_split=0.2, seed=1), how)
    assert folder.skip_reasons == {
        str(red / "dangling.jpg"): "cannot be read (No such file or directory)",
        str(red / "loop.jpg"): "cannot be read (Too many levels of symbolic links)",
        str(red / "adir.jpg"): "cannot be read (Is a directory)"}
    assert len(folder.train) + len(folder.validation) == 6


def test_validation_split_is_stratified_and_seeded(tmp_path):
    root = images.folder(str(tmp_path), per_class=10)
    first = sources.scan(root, validation_split=0.2, seed=7)
    assert [int(np.sum(first.validation.labels == label)) for label in (0, 1)] == [2, 2]
    assert list(sources.scan(root, 0.2, seed=7).validation.paths) == list(first.validation.paths)
    assert list(sources.scan(root, 0.2, seed=8).validation.paths) != list(first.validation.paths)
    assert not set(first.validation.paths) & set(first.train.paths)


def test_validation_folder_is_used_when_present(tmp_path):
    folder = sources.scan(images.folder(str(tmp_path), per_class=4, validation_per_class=2))
    assert (len(folder.train), len(folder.validation)) == (8, 4)
    assert folder.validation_source == "validation/"


def test_error_cases_name_the_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        sources.scan(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "flat")
    with pytest.raises(UserError, match="has no train/ folder"):
        sources.scan(str(tmp_path / "flat"))
    single = images.folder(str(tmp_path / "single"), classes=("red",))
    with pytest.raises(UserError, match=r"train holds 1 class folder\(s\) \['red'\]"):
        sources.scan(single)
    empty = images.folder(str(tmp_path / "empty"))
    os.makedirs(os.path.join(empty, "train", "blue"))
    with pytest.raises(UserError, match=r"class folder .*empty/train/blue holds no images"):
        sources.scan(empty)
    differ = images.folder(str(tmp_path / "differ"), validation_per_class=1)
    images.save(os.path.join(differ, "validation", "blue", "b.jpg"))
    with pytest.raises(UserError, match=r"validation has classes \['blue', 'green', 'red'\]"):
        sources.scan(differ)
    broken = images.folder(str(tmp_path / "broken"))
    images.save_corrupt(os.path.join(broken, "train", "blue", "x.jpg"), "text")
    for how in CHECKS:
        with pytest.raises(UserError, match="broken/train/blue holds no readable image"):
            checked(sources.scan(broken), how)


def test_train_order_resumes_mid_epoch_identically():
    whole = pipelines.train_order(10, 4, seed=3, start_step=0, end_step=9)
    assert len(whole) == 9 * 4
    epoch = whole[:12]
    assert sorted(set(epoch)) == list(range(10))  # every example each epoch, 2 repeated to pad
    assert not np.array_equal(whole[:12], whole[12:24])  # reshuffled every epoch
    assert np.array_equal(pipelines.train_order(10, 4, seed=3, start_step=4, end_step=9), whole[16:])


def test_training_padding_has_weight_zero_so_each_image_counts_once_an_epoch():
    # 10 examples, batch 4: 3 steps an epoch, the last with 2 of padding.
    weights = pipelines.train_weights(10, 4, start_step=0, end_step=6)
    assert list(weights) == ([1] * 10 + [0] * 2) * 2
    assert list(pipelines.train_weights(10, 4, start_step=2, end_step=4)) == [1, 1, 0, 0] + [1] * 4


def test_evaluation_order_pads_with_zero_weight():
    order, weights = pipelines.evaluation_order(10, 4)
    assert len(order) == 12 and list(order[:10]) == list(range(10))
    assert weights.sum() == 10 and list(weights[10:]) == [0, 0]


def test_two_input_pipelines_read_every_example_exactly_once(tmp_path):
    """What each worker of a two-worker job reads: together the order, with no overlap."""
    root = images.folder(str(tmp_path), per_class=6, size=16)
    folder = sources.scan(root, validation_split=0.5)
    order = pipelines.train_order(len(folder.train), 4, seed=0, start_step=0, end_step=3)
    weights = np.arange(len(order), dtype=np.float32)  # weights tag each position in order
    positions = []
    for index in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index,
                                             num_replicas_in_sync=2)
        batches = list(pipelines.pipeline(folder.train, order, weights, 4, 16, context))
        assert len(batches) == 3 and all(batch[1].shape == (2,) for batch in batches)
        for _, labels, tags in batches:
            assert list(labels.numpy()) == list(folder.train.labels[order[tags.numpy().astype(int)]])
            positions += list(tags.numpy().astype(int))
    assert sorted(positions) == list(range(len(order)))


def test_no_held_out_validation_needs_a_validation_folder(tmp_path):
    with_folder = images.folder(str(tmp_path / "with"), per_class=4, validation_per_class=2)
    assert len(sources.scan(with_folder, validation_split=0).validation) == 4
    without = images.folder(str(tmp_path / "without"), per_class=4)
    with pytest.raises(UserError, match="has no validation/ folder, and --validation_split=0 "
                                        "holds nothing out"):
        sources.scan(without, validation_split=0)


def test_an_unfinished_prepare_output_says_to_prepare_again(tmp_path):
    (tmp_path / "train-00000-of-00004.tfrecord").write_bytes(b"")
    (tmp_path / "notes-00000-of-00004.tfrecord").write_bytes(b"")
    with pytest.raises(UserError, match="is an incomplete trainer.prepare output .*: run "
                                        "prepare again"):
        sources.scan(str(tmp_path))


@pytest.mark.parametrize("kind", ["jpeg", "png", "bmp", "gif"])
def test_pixels_are_read_from_the_header(tmp_path, kind):
    path = images.save(str(tmp_path / f"image.{kind}"), size=40, kind=kind)
    with open(path, "rb") as handle:
        assert sources.header_pixels(handle.read()) == 40 * 40


@pytest.mark.parametrize("how", CHECKS)
def test_images_over_the_pixel_limit_are_skipped_and_counted(tmp_path, how):
    root = images.folder(str(tmp_path), per_class=3, size=40)
    big = images.save(str(tmp_path / "train" / "red" / "big.png"), size=300, kind="png")
    source = checked(sources.scan(root, validation_split=0.3), how, max_pixels=100 * 100)
    assert source.skipped == [big]
    assert source.skip_reasons == {big: "more than --max_image_pixels=10000 pixels"}
    assert len(source.train) + len(source.validation) == 6


def test_each_worker_pass_reads_only_its_share_of_an_image_folder(tmp_path):
    """Under MultiWorkerMirroredStrategy each worker runs one input pipeline: the pass's
    pipelines read disjoint shares of the images, together all of them, and no file twice."""
    root = images.folder(str(tmp_path / "data"), per_class=9, validation_per_class=1, size=16)
    split = sources.scan(root).train
    rows = np.arange(len(split))
    given = []
    for index in range(2):
        context = tf.distribute.InputContext(2, index, 2)
        batches = pipelines.image_pass(split, rows, 4, 8, Config.max_image_pixels, context)
        given.append([int(row) for batch_rows, _ in batches for row in batch_rows if row >= 0])
    assert sorted(given[0] + given[1]) == list(rows)  # 18 images, each read once in all
    assert abs(len(given[0]) - len(given[1])) <= 2  # half each, to within a batch slice
