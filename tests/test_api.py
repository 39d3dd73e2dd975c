"""trainer.fit, Run and trainer.load: the CLI's job from Python, in this process."""

import io
import json
import random
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import trainer
from tests import images
from tests.conftest import TINY_MODEL, cli_env, error_line, run_module

SETTINGS = dict(backbone="small_cnn", base_weights="none", image_size=32, batch_size=8,
                epochs=2, fine_tune_epochs=1, learning_rate=1e-2)
FLAGS = [*TINY_MODEL, "--image_size=32", "--batch_size=8", "--epochs=2",
         "--fine_tune_epochs=1", "--learning_rate=1e-2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return images.folder(str(root / "images"), per_class=12, validation_per_class=4)


def losses(history):
    assert history, "no epochs recorded"
    return [(epoch["loss"], epoch["val_loss"], epoch["val_accuracy"]) for epoch in history]


def test_import_trainer_loads_no_tensorflow():
    process = subprocess.run([sys.executable, "-c", "import sys, trainer; "
                              "print(sorted({'tensorflow', 'keras', 'absl.flags._flagvalues'} & "
                              "set(sys.modules)))"], capture_output=True, text=True,
                             env=cli_env(), check=True)
    # absl's flag module comes with the config's flag definitions; TensorFlow does not.
    assert process.stdout.strip() == "['absl.flags._flagvalues']"


@pytest.mark.parametrize("given, expected", [(None, "8"), ("16", "16")])
def test_import_trainer_sets_the_gs_read_buffer_unless_set(given, expected):
    """TensorFlow reads GCS_READ_CACHE_BLOCK_SIZE_MB once, when it loads: `import trainer`
    sets it first (64 MB cleared for every file opened cost 30 ms an image), keeping a user's."""
    env = {name: value for name, value in cli_env().items()
           if name != "GCS_READ_CACHE_BLOCK_SIZE_MB"}
    if given:
        env["GCS_READ_CACHE_BLOCK_SIZE_MB"] = given
    process = subprocess.run([sys.executable, "-c", "import os, trainer; "
                              "print(os.environ['GCS_READ_CACHE_BLOCK_SIZE_MB'])"],
                             capture_output=True, text=True, env=env, check=True)
    assert process.stdout.strip() == expected


def test_two_fits_in_one_process_equal_two_processes(data, tmp_path):
    """A second call in the same kernel, after the first changed seeds, the dtype policy and
    the signal handlers, trains exactly as a job in a process of its own."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    random.seed(7)
    np.random.seed(7)
    before = (random.random(), np.random.random())
    random.seed(7)
    np.random.seed(7)
    first = trainer.fit(data=data, model_dir=str(tmp_path / "first"), **SETTINGS)
    keras.mixed_precision.set_global_policy("mixed_float16")  # as a user's cell might
    second = trainer.fit(data=data, model_dir=str(tmp_path / "second"), **SETTINGS)
    assert keras.mixed_precision.global_policy().name == "mixed_float16"  # put back
    keras.mixed_precision.set_global_policy("float32")
    assert (random.random(), np.random.random()) == before
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers

    process = run_module("trainer.task", f"--data={data}", f"--model_dir={tmp_path / 'cli'}",
                         *FLAGS)
    assert process.returncode == 0, process.stderr[-2000:]
    with open(tmp_path / "cli" / "metrics.json") as handle:
        separate = json.load(handle)
    assert losses(first.history) == losses(second.history) == losses(separate["history"])
    assert len(first.history) == 3
    assert first.metrics["val_accuracy"] == separate["val_accuracy"]


def test_run_holds_the_outputs_and_predicts_as_the_cli(data, tmp_path):
    run = trainer.fit(trainer.Config(data=data, model_dir=str(tmp_path / "run"), **SETTINGS))
    assert run.model_dir == str(tmp_path / "run")
    assert run.export_dir == str(tmp_path / "run" / "export")
    assert run.report_png == str(tmp_path / "run" / "report.png")
    with open(tmp_path / "run" / "metrics.json") as handle:
        assert run.metrics == json.load(handle)
    assert run.history == run.metrics["history"] and len(run.history) == 3
    assert repr(run) == (f"Run(model_dir={run.model_dir!r}, val_accuracy="
                         f"{run.metrics['val_accuracy']:.4f}, epochs=3, "
                         f"export_dir={run.export_dir!r})")

    folder = f"{data}/validation"
    process = run_module("trainer.predict", f"--model_dir={run.model_dir}", "--json",
                         "--top_k=2", folder)
    assert process.returncode == 0, process.stderr
    printed = [json.loads(line) for line in process.stdout.splitlines()]
    assert len(printed) == 8
    assert run.predict(folder, top_k=2) == printed
    assert trainer.load(run.export_dir).predict([folder], top_k=2) == printed
    # The images' true classes, from their folders, agree with most predictions.
    right = [row["top"][0]["class"] in row["path"] for row in printed]
    assert sum(right) >= 6, printed


def test_a_user_error_raises_the_cli_message(data, tmp_path):
    missing = str(tmp_path / "missing")
    process = run_module("trainer.task", f"--data={missing}", f"--model_dir={tmp_path / 'c'}",
                         *FLAGS)
    with pytest.raises(trainer.UserError) as raised:
        trainer.fit(data=missing, model_dir=str(tmp_path / "p"), **SETTINGS)
    assert f"error: {raised.value}" == error_line(process)
    assert raised.value.__context__ is None  # nothing of the job's frames held
    with pytest.raises(trainer.UserError, match=r"unknown setting epoch=3 \(did you mean "
                                                r"epochs\?\)"):
        trainer.fit(data=data, epoch=3)
    with pytest.raises(trainer.UserError, match="trainer.fit: epochs should be int, got 'x'"):
        trainer.fit(data=data, epochs="x")


def test_dry_run_returns_the_plan_it_prints(data, tmp_path, capsys):
    plan = trainer.fit(data=data, model_dir=str(tmp_path / "run"), dry_run=True, **SETTINGS)
    assert "phase head" in plan and "phase fine_tune" in plan
    assert plan in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


class _StopAtFirstEpoch(io.TextIOBase):
    """stdout that presses Ctrl-C (a notebook's stop button sends SIGINT) when the job prints
    its first epoch line: the job stops after the next step."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text
        if "epoch 1/" in text:
            signal.raise_signal(signal.SIGINT)
        return len(text)


def test_ctrl_c_raises_stopped_and_fit_again_resumes(data, tmp_path, monkeypatch):
    model_dir = str(tmp_path / "run")
    output = _StopAtFirstEpoch()
    monkeypatch.setattr(sys, "stdout", output)
    with pytest.raises(trainer.Stopped, match=r"stopped by SIGINT at step 4: checkpoint saved; "
                                              r"call trainer.fit again with the same settings "
                                              r"to resume"):
        trainer.fit(data=data, model_dir=model_dir, **SETTINGS)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    run = trainer.fit(data=data, model_dir=model_dir, **SETTINGS)
    assert "resuming at step 4 of 9: epoch 2/3, 1 of its 3 steps done" in sys.stdout.getvalue()
    assert run.metrics["resumed_from_step"] == 4 and len(run.history) == 3
