"""The command line itself: help and flag errors without loading TensorFlow."""

import gc
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, cli_env, error_line
from trainer import config as config_lib


def _imports(*args, module="trainer.task"):
    """Runs python -m module with args; returns (process, names of modules imported)."""
    process = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args],
                             capture_output=True, text=True, env=cli_env(), cwd=REPO,
                             timeout=60)
    imported = {line.split("|")[-1].strip() for line in process.stderr.splitlines()
                if line.startswith("import time:")}
    return process, imported


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["--helpfull"], 0),
                                        (["--strategy=quantum"], 2), (["--epochs=many"], 2),
                                        (["epochs=3"], 2)])
def test_help_and_flag_errors_answer_without_loading_tensorflow(args, code):
    process, imported = _imports(*args)
    assert process.returncode == code, process.stderr[-2000:]
    assert "absl.flags" in imported and "yaml" in imported
    assert not {"tensorflow", "keras", "numpy"} & imported


@pytest.mark.parametrize("version, warned", [("2.17.1", True), ("2.20.0", False),
                                             ("2.21.0rc1", False)])
def test_the_job_names_its_tensorflow_and_warns_below_the_oldest_tested(
        monkeypatch, caplog, capsys, version, warned):
    import tensorflow as tf
    from trainer import sources, task
    monkeypatch.setattr(tf, "__version__", version)
    source = sources.Source("d", ["a", "b"], sources.Split(np.array(["x", "y"]), np.array([0, 1])),
                            sources.Split(np.array(["z"]), np.array([1])), "validation/", [])
    run = task._Run(None, "cpu", True, source, None, None, "strategy cpu")
    task._announce(config_lib.Config(data="d"), run)
    assert capsys.readouterr().out.startswith(f"TensorFlow {version}, Keras 3.")
    assert ("older than 2.20, the oldest this trainer is tested with" in caplog.text) is warned


def test_an_argument_that_is_not_a_flag_is_refused():
    """absl hands back `epochs=3`; a job that ignored it would train with the default."""
    process, _ = _imports("--data=demo", "epochs=3")
    assert process.returncode == 2
    assert error_line(process) == ("error: unexpected argument 'epochs=3': give flags as "
                                   "--name=value (see --helpfull)")


def test_a_flagfile_that_is_not_utf8_is_one_line(tmp_path):
    flagfile = tmp_path / "flags.txt"
    flagfile.write_bytes(b"--epochs=2\n--data=caf\xe9\n")
    process, imported = _imports(f"--flagfile={flagfile}")
    assert process.returncode == 2 and "tensorflow" not in imported
    assert error_line(process).startswith("error: a --flagfile is not UTF-8 text")


@pytest.mark.parametrize("module, args, code", [
    ("trainer.predict", ["--help"], 0),
    ("trainer.predict", ["--model_dir=runs/x", "--top_k=0", "a.jpg"], 2),
    ("trainer.predict", ["--model_dir=runs/x", "--top_k=-1", "a.jpg"], 2),
    ("trainer.prepare", ["--help"], 0),
    ("trainer.prepare", ["--images=x"], 2),
])
def test_predict_and_prepare_answer_help_and_errors_without_loading_tensorflow(module, args,
                                                                               code):
    process, imported = _imports(*args, module=module)
    assert process.returncode == code, process.stderr[-2000:]
    assert not {"tensorflow", "keras"} & imported
    if code:
        assert error_line(process)


@pytest.mark.parametrize("collecting", [True, False])
def test_loading_tensorflow_pauses_the_garbage_collector_and_puts_it_back(collecting):
    from trainer import cli
    was = gc.isenabled()
    (gc.enable if collecting else gc.disable)()
    try:
        with cli.loading_tensorflow():
            paused = not gc.isenabled()
        assert paused and gc.isenabled() == collecting
        with pytest.raises(ValueError):  # put back however the load ends
            with cli.loading_tensorflow():
                raise ValueError
        assert gc.isenabled() == collecting
    finally:
        (gc.enable if was else gc.disable)()
