"""python -m trainer.preflight: what scripts/submit_job.sh and hptune.sh run before any gcloud
call, so that a job that cannot start is never submitted (its machines are billed from the
moment they start, a typo or not).

The trainer flags after `--` go through the job's own parser and are resolved into a Config as
the job will resolve them on Vertex AI, with $AIP_MODEL_DIR under the job's base output
directory and the preset read from its bucket. Then every path the job reads or writes must be
one Vertex AI can reach: gs://, or /gcs/BUCKET/..., where it mounts buckets. For a tuning job,
each tuned parameter must be a trainer flag, and its range's ends valid values of it. Nothing
here loads TensorFlow: the check takes a fraction of a second.

    python -m trainer.preflight --base_output_dir=gs://B/jobs/NAME [--tune=NAME=MIN,MAX ...]
        -- TRAINER FLAGS
"""

import argparse
import os
import sys

from absl import flags

from trainer import buckets
from trainer import config as config_lib
from trainer import task
from trainer.errors import UserError, first_line

# Config fields naming a path the job reads or writes, with what a local value would be.
PATHS = ("data", "model_dir", "feature_cache", "tfds_data_dir", "base_weights")
# Values of those fields that are not paths.
NOT_PATHS = ("", "demo", "imagenet", "none")


def _reachable_from_vertex(path):
    return path.startswith(("gs://", "/gcs/", "tfds:")) or path in NOT_PATHS


def _read_preset(path):
    """The preset's text (None where it does not exist), read where the job will read it. A
    local preset is refused first; without credentials here, its values are left to the job."""
    import requests
    from google.api_core import exceptions
    from google.auth import exceptions as auth_exceptions
    if not buckets.credentials_at_hand():
        print(f"warning: no application-default credentials here to read --config={path}: its "
              "values are checked when the job starts (gcloud auth application-default login "
              "lets this check read it)", file=sys.stderr)
        return ""
    bucket, name = buckets.gcs_bucket(path, "--config")
    try:
        return bucket.blob(name).download_as_text(timeout=20, retry=None)
    except exceptions.NotFound:
        return None
    except (exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError, OSError,
            requests.RequestException) as error:
        raise UserError(f"cannot read --config={path} ({first_line(error)}): check the path, "
                        "the network and your access to the bucket") from None


def _check_preset_path(path):
    if not path or _reachable_from_vertex(path):
        return
    if not os.path.exists(path):
        raise UserError(f"config file {path} not found: check the --config path")
    raise UserError(f"--config={path} is a local file, which the job on Vertex AI cannot read: "
                    f"copy it to your bucket (gcloud storage cp {path} $BUCKET/configs/) and "
                    "pass its gs:// path")


def resolve(trainer_args, base_output_dir):
    """The Config the job would run with; UserError where it would stop at once."""
    flag_values = flags.FLAGS
    flag_values.unparse_flags()
    try:
        argv = flag_values(["trainer.task", *trainer_args])
    except flags.Error as error:
        raise UserError(f"{error}; see python -m trainer.task --helpfull") from None
    task.check_no_arguments(argv)
    _check_preset_path(flag_values["config"].value or "")
    environ = {"AIP_MODEL_DIR": f"{base_output_dir.rstrip('/')}/model"}
    config = config_lib.resolve(flag_values, environ, read_text=_read_preset)
    for name in PATHS:
        value = getattr(config, name)
        if not _reachable_from_vertex(value):
            raise UserError(f"--{name}={value} is a local path, which the job on Vertex AI cannot "
                            "reach: use a gs:// path (or /gcs/BUCKET/..., where Vertex AI mounts "
                            "buckets)")
    return config


def check_tuned(trainer_args, base_output_dir, tuned):
    """Each (name, low, high) a tuning job appends as --name=value to a trial's flags."""
    for name, low, high in tuned:
        if name not in config_lib.Config.__dataclass_fields__:
            raise UserError(f"tuned parameter {name} is not a trainer flag (see python -m "
                            "trainer.task --helpfull)")
        try:
            ends = float(low), float(high)
        except ValueError:
            raise UserError(f"tuned parameter {name}: range {low},{high} is not MIN,MAX "
                            "numbers") from None
        if ends[0] > ends[1]:
            raise UserError(f"tuned parameter {name}: range {low},{high} has MIN above MAX")
        for value in (low, high):
            try:
                resolve([*trainer_args, f"--{name}={value}"], base_output_dir)
            except UserError as error:
                raise UserError(f"tuned parameter {name}={value}, an end of its range: "
                                f"{error}") from None


def _tune(text):
    name, equals, bounds = text.partition("=")
    low, comma, high = bounds.partition(",")
    if not (equals and comma):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=MIN,MAX")
    return name, low, high


def main(argv):
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m trainer.preflight",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_output_dir", required=True,
                        help="the job's baseOutputDirectory (gs://B/jobs/NAME)")
    parser.add_argument("--tune", type=_tune, action="append", default=[],
                        help="NAME=MIN,MAX: a parameter a tuning job sets in each trial")
    options = parser.parse_args(argv[:split])
    trainer_args = argv[split + 1:]
    try:
        resolve(trainer_args, options.base_output_dir)
        check_tuned(trainer_args, options.base_output_dir, options.tune)
    except UserError as error:
        sys.stderr.write(f"error: trainer flags after --: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
