"""Transfer learning on images: train a new head on a pretrained backbone, then fine-tune.

From Python: trainer.fit(data=..., epochs=...) -> Run; trainer.load(model_dir).predict(...).
`import trainer` loads no TensorFlow: fit and load do, when they run."""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) would bury the job's own lines. Set
# here, before any of our modules imports TensorFlow; a value the user set is kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow retries a failing gs:// call 10 times, up to 32 s apart: nearly two minutes before
# an unreachable bucket is reported. Five (about 30 s) is enough for a blip; longer outages
# are retried by the job itself, within --storage_retry_seconds (files.Backoff).
os.environ.setdefault("GCS_RETRY_CONFIG_MAX_RETRIES", "5")
# Each gs:// file TensorFlow opens gets a read buffer of this many MB, allocated and cleared
# whole: at its default of 64 MB, reading one 20 KB image took 30 ms of CPU, at 8 MB 1.3 ms.
# 8 is what Model Garden's training images set. Shards are read in 8 MB requests then.
os.environ.setdefault("GCS_READ_CACHE_BLOCK_SIZE_MB", "8")

from trainer.api import Run, fit, load  # noqa: E402  (after the environment above)
from trainer.config import Config  # noqa: E402
from trainer.errors import Stopped, UserError  # noqa: E402

__all__ = ["Config", "Run", "Stopped", "UserError", "fit", "load"]
