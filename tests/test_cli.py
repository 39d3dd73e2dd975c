"""The command line itself: help and flag errors without loading TensorFlow."""

import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env


def _imports(*args):
    """Runs python -m trainer.task with args; returns (process, names of modules imported)."""
    process = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainer.task", *args],
                             capture_output=True, text=True, env=cli_env(), cwd=REPO,
                             timeout=60)
    imported = {line.split("|")[-1].strip() for line in process.stderr.splitlines()
                if line.startswith("import time:")}
    return process, imported


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["--helpfull"], 0),
                                        (["--strategy=quantum"], 2), (["--epochs=many"], 2)])
def test_help_and_flag_errors_answer_without_loading_tensorflow(args, code):
    process, imported = _imports(*args)
    assert process.returncode == code, process.stderr[-2000:]
    assert "absl.flags" in imported and "yaml" in imported
    assert not {"tensorflow", "keras", "numpy"} & imported
