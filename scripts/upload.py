"""python scripts/upload.py LOCAL_FILE gs://BUCKET/NAME: copies a file with google-cloud-storage,
for machines without gcloud. Credentials come from Application Default Credentials."""

import sys

from google.cloud import storage


def main(source, target):
    if not target.startswith("gs://"):
        sys.exit("error: the target must be gs://BUCKET/NAME")
    bucket, _, name = target[len("gs://"):].partition("/")
    storage.Client().bucket(bucket).blob(name).upload_from_filename(source)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip())
    main(*sys.argv[1:])
