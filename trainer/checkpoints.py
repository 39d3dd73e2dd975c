"""A run's checkpoints: the last KEEP are kept, and a run resumes from the newest one that can
be read. One that cannot (cut short, missing its index, overwritten) is set aside, renamed
rather than deleted, with a warning; if none can be read, the job stops rather than start
from zero."""

import os
import time

from absl import logging
import tensorflow as tf

from trainer import errors
from trainer.errors import UserError

# At least two, so that when the newest cannot be read the one before it can be.
KEEP = 2


class Checkpoints:
    def __init__(self, checkpoint, directory, save_directory):
        """checkpoint: the tf.train.Checkpoint of the run; directory: the run's checkpoints,
        which every worker restores from; save_directory: where this process's saves go (the
        chief's: directory; another worker's: a scratch folder, since every worker must take
        part in saving but only the chief's copy is kept)."""
        self.checkpoint = checkpoint
        self.directory = directory
        self.save_directory = save_directory
        self.manager = tf.train.CheckpointManager(checkpoint, save_directory, max_to_keep=KEEP)

    def save(self, step):
        self.manager.save(checkpoint_number=step)

    @property
    def latest(self):
        """The newest checkpoint of this process's, or None before the first."""
        return self.manager.latest_checkpoint

    def restore(self):
        """Restores the newest checkpoint that can be read; False when there is none."""
        damaged = []
        for prefix in _prefixes(self.directory):
            try:
                self.checkpoint.restore(prefix).assert_existing_objects_matched()
            except (AssertionError, ValueError) as error:  # another model or optimizer
                raise UserError(f"checkpoint {prefix} does not fit this job "
                                f"({errors.first_line(error)}); use another --model_dir or "
                                "--overwrite") from None
            except (tf.errors.OpError, IndexError) as error:  # IndexError: a file cut short
                reason = (errors.op_reason(error) if isinstance(error, tf.errors.OpError)
                          else errors.first_line(error))
                logging.warning("checkpoint %s cannot be read (%s); trying the one before it",
                                prefix, reason)
                damaged.append(prefix)
                continue
            if damaged and self.save_directory == self.directory:
                self._set_aside(damaged)
            return True
        if damaged:
            raise UserError(f"none of the {len(damaged)} checkpoint(s) in {self.directory} "
                            "can be read (see the warnings above): move them away to start "
                            "afresh, or use --overwrite")
        return False

    def _set_aside(self, prefixes):
        """Renames damaged checkpoints' files to damaged-ckpt-N.*, out of the manager's sight,
        so that they are neither restored nor counted among the checkpoints it keeps."""
        for prefix in prefixes:
            for path in tf.io.gfile.glob(f"{prefix}.*"):
                folder, name = os.path.split(path)
                tf.io.gfile.rename(path, os.path.join(folder, f"damaged-{name}"), overwrite=True)
            logging.warning("moved the files of %s to damaged-%s.*", prefix,
                            os.path.basename(prefix))
        kept = _prefixes(self.directory)
        # With timestamps later than the last preserved one, or the manager would take the
        # kept checkpoints for preserved ones and never delete them.
        now = time.time()
        tf.compat.v1.train.update_checkpoint_state(
            self.directory, kept[0], all_model_checkpoint_paths=kept[::-1],
            all_model_checkpoint_timestamps=[now] * len(kept), last_preserved_timestamp=now - 1)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory,
                                                  max_to_keep=KEEP)


def newest_step(directory):
    """The global step of the newest checkpoint in directory, from its name (saves are numbered
    by step), without reading it; None when there is none."""
    prefixes = _prefixes(directory)
    return int(prefixes[0].rsplit("-", 1)[1]) if prefixes else None


def _prefixes(directory):
    """Prefixes of the checkpoints in directory, newest first: those the state file lists and
    those with files, so that one missing a file is still seen (and found damaged)."""
    names = set()
    state = tf.train.get_checkpoint_state(directory)
    for path in state.all_model_checkpoint_paths if state else ():
        names.add(os.path.basename(path))
    for path in tf.io.gfile.glob(os.path.join(directory, "ckpt-*")):
        names.add(os.path.basename(path).split(".")[0])
    numbers = sorted(int(name[len("ckpt-"):]) for name in names
                     if name[len("ckpt-"):].isdigit())
    return [os.path.join(directory, f"ckpt-{number}") for number in reversed(numbers)]
