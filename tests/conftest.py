import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(items):
    """The fast tier first: a broken unit fails in the first minutes, before the end-to-end
    runs (marked slow) take their ten."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


# The backbone CLI tests train: small, and needs no weights download.
TINY_MODEL = ["--backbone=small_cnn", "--base_weights=none"]

CLOUD_VARIABLES = ("AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR", "AIP_TENSORBOARD_LOG_DIR", "TF_CONFIG",
                   "CLUSTER_SPEC", "TPU_NAME")


@pytest.fixture(scope="session", autouse=True)
def cache_home(tmp_path_factory):
    """One demo dataset for the whole session, outside the user's ~/.cache; no cloud settings
    of the machine running the tests leak in."""
    with pytest.MonkeyPatch.context() as patch:
        home = str(tmp_path_factory.mktemp("cache"))
        patch.setenv("XDG_CACHE_HOME", home)
        for name in CLOUD_VARIABLES:
            patch.delenv(name, raising=False)
        yield home


def unavailable(reason):
    """A test that cannot run here skips, and says why; under CI (CI=true) it fails instead,
    since there a missing tool or permission is a defect of the set-up, not of the machine."""
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"{reason} (CI=true: CI must provide it)")
    pytest.skip(reason)


def cli_env(**extra):
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    env.update(extra)
    return env


def run_module(module, *args, timeout=300, env=None, cwd=None):
    """Runs `python -m module args` as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env(), cwd=cwd or REPO)


def error_line(process):
    """The stderr line a user error ends with; asserts there is exactly one and no traceback."""
    assert "Traceback" not in process.stderr, process.stderr
    lines = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, process.stderr
    return lines[0]


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A real GCS emulator; its .env makes a subprocess's TensorFlow and Python client use it."""
    from tests.gcs import Emulator
    emulator = Emulator(str(tmp_path_factory.mktemp("gcs")))
    yield emulator
    emulator.stop()
