import os

import pytest

from trainer import config as config_lib
from trainer import outputs
from trainer.errors import UserError


def _run(tmp_path, **values):
    config = config_lib.Config(data="x", model_dir=str(tmp_path / "run"), **values)
    layout = outputs.Layout.of(config.model_dir, environ={})
    return config, layout


def test_check_only_reads_and_wipe_deletes(tmp_path):
    config, layout = _run(tmp_path)
    assert outputs.check(layout, config, overwrite=False) == "fresh"
    outputs.write_start(layout, config, ["a", "b"])
    assert outputs.check(layout, config, overwrite=False) == "resume"
    other, _ = _run(tmp_path, epochs=3)
    with pytest.raises(UserError, match=r"holds a run with a different config \(epochs: 10 -> 3\)"):
        outputs.check(layout, other, overwrite=False)
    assert outputs.check(layout, other, overwrite=True) == "overwrite"
    assert os.path.exists(layout.path("config.yaml"))  # checking deleted nothing
    outputs.wipe(layout)
    assert os.listdir(layout.model_dir) == []
    outputs.write_metrics(layout, {"status": "complete"})
    outputs.write_start(layout, config, ["a", "b"])
    assert outputs.check(layout, config, overwrite=False) == "complete"


def test_damaged_records_of_a_run_are_user_errors(tmp_path):
    config, layout = _run(tmp_path)
    outputs.write_start(layout, config, ["a", "b"])
    with open(layout.path("metrics.json"), "w") as handle:
        handle.write('{"status": "compl')
    with pytest.raises(UserError, match="holds a damaged metrics.json"):
        outputs.check(layout, config, overwrite=False)
    with open(layout.path("config.yaml"), "w") as handle:
        handle.write("epochs: [1\n")
    with pytest.raises(UserError, match="config.yaml is damaged"):
        outputs.check(layout, config, overwrite=False)
