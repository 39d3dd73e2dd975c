"""gs:// through google-cloud-storage, without TensorFlow: for the writes that need generation
preconditions TensorFlow's GCS filesystem lacks (the lease, the feature cache), and for what
runs before a job is submitted (trainer.preflight), where loading TensorFlow would cost
seconds."""

import os

from trainer.errors import UserError, first_line


def gcs_bucket(path, what):
    """(google-cloud-storage Bucket, object name) of a gs:// path; `what` names it in errors."""
    from google.auth import exceptions
    from google.cloud import storage
    bucket, _, name = path[len("gs://"):].partition("/")
    try:
        # Objects need no project; without one the client would refuse to start.
        client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "none")
    except exceptions.DefaultCredentialsError as error:
        raise UserError(f"no Google Cloud credentials for {what} {path} ({first_line(error)}): run "
                        "`gcloud auth application-default login`, or run where credentials "
                        "are set (Vertex AI)") from None
    return client.bucket(bucket), name


def credentials_at_hand():
    """Whether google-cloud-storage will find credentials without asking the GCE metadata
    server, which off Google Cloud can take seconds to not answer."""
    from google.auth import _cloud_sdk
    return bool(os.environ.get("STORAGE_EMULATOR_HOST")
                or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
                or os.path.exists(_cloud_sdk.get_application_default_credentials_path()))
