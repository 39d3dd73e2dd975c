import os

import pytest

from tests import images
from trainer import config as config_lib
from trainer import outputs
from trainer import sources
from trainer.errors import UserError


def _run(tmp_path, **values):
    config = config_lib.Config(data="x", model_dir=str(tmp_path / "run"), **values)
    layout = outputs.Layout.of(config.model_dir, environ={})
    return config, layout


def test_check_only_reads_and_wipe_deletes(tmp_path):
    config, layout = _run(tmp_path)
    assert outputs.check(layout, config, overwrite=False) == "fresh"
    outputs.write_start(layout, config, ["a", "b"], {})
    assert outputs.check(layout, config, overwrite=False) == "resume"
    other, _ = _run(tmp_path, epochs=3)
    with pytest.raises(UserError, match=r"holds a run with a different config \(epochs: 10 -> 3\)"):
        outputs.check(layout, other, overwrite=False)
    assert outputs.check(layout, other, overwrite=True) == "overwrite"
    assert os.path.exists(layout.path("config.yaml"))  # checking deleted nothing
    outputs.wipe(layout)
    assert os.listdir(layout.model_dir) == []
    outputs.write_metrics(layout, {"status": "complete"})
    outputs.write_start(layout, config, ["a", "b"], {})
    assert outputs.check(layout, config, overwrite=False) == "complete"


def test_damaged_records_of_a_run_are_user_errors(tmp_path):
    config, layout = _run(tmp_path)
    outputs.write_start(layout, config, ["a", "b"], {})
    with open(layout.path("metrics.json"), "w") as handle:
        handle.write('{"status": "compl')
    with pytest.raises(UserError, match="holds a damaged metrics.json"):
        outputs.check(layout, config, overwrite=False)
    with open(layout.path("config.yaml"), "w") as handle:
        handle.write("epochs: [1\n")
    with pytest.raises(UserError, match="config.yaml is damaged"):
        outputs.check(layout, config, overwrite=False)


def test_a_run_resumes_only_on_the_data_it_started_with(tmp_path):
    root = images.folder(str(tmp_path / "data"), per_class=4, validation_per_class=2, size=16)
    config, layout = _run(tmp_path)
    started = outputs.data_record(sources.scan(root))
    outputs.write_start(layout, config, ["green", "red"], started)
    outputs.check_same_data(layout, outputs.data_record(sources.scan(root)), root)  # the same
    for index in range(3):  # images added to one class
        images.save(str(tmp_path / "data" / "train" / "red" / f"more_{index}.jpg"), seed=index)
    with pytest.raises(UserError, match=r"the data in --data=.* changed since the run in .* "
                                        r"started \(train: red 4 -> 7\): a run resumes only on "
                                        r"the data it started with; .* --overwrite"):
        outputs.check_same_data(layout, outputs.data_record(sources.scan(root)), root)
    for index in range(3):
        os.remove(tmp_path / "data" / "train" / "red" / f"more_{index}.jpg")
    # The same names and counts, one image's content changed.
    victim = sorted(os.listdir(tmp_path / "data" / "validation" / "green"))[0]
    images.save(str(tmp_path / "data" / "validation" / "green" / victim), seed=99)
    with pytest.raises(UserError, match=r"\(validation: the same counts per class, but other "
                                        r"files or contents\)"):
        outputs.check_same_data(layout, outputs.data_record(sources.scan(root)), root)
