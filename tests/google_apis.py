"""A stand-in for Google's APIs on 127.0.0.1, for the real gcloud CLI: records each request
gcloud sends and answers it as the service would, just enough for gcloud to finish.

gcloud goes through it as through an HTTPS proxy (its proxy/* properties): the stand-in
accepts CONNECT for *.googleapis.com only, terminates TLS with a throw-away CA that gcloud is
told to trust (core/custom_ca_certs_file), and never opens a connection anywhere.

Run as its own process:  python google_apis.py PORT CERT_PEM KEY_PEM RECORD_JSONL
"""

import base64
import hashlib
import json
import re
import sys
import urllib.parse

from tests.gcs_proxy import Intercepting, Server

OK = "200 OK"


def answer(method, host, path, body):
    """(status, reply) for one request: JSON, or the text of a build log."""
    request = json.loads(body or b"{}") if body[:1] in (b"{", b"") else {}
    job = re.fullmatch(r"/v1/(projects/[^/]+/locations/[^/]+)/(customJobs|hyperparameterTuningJobs)"
                       r"(\?.*)?", path)
    if method == "POST" and job:
        return OK, {**request, "name": f"{job[1]}/{job[2]}/1234", "state": "JOB_STATE_PENDING"}
    builds = re.fullmatch(r"/v1/(projects/([^/]+)/locations/[^/]+)/builds(/[^?]*)?(\?.*)?", path)
    if builds:
        build = {**request, "id": "build-1", "projectId": builds[2], "status": "SUCCESS",
                 "logsBucket": f"gs://{builds[2]}_cloudbuild/logs"}
        if method == "POST":
            return OK, {"name": f"{builds[1]}/operations/op-1", "done": True, "metadata": {
                "@type": "type.googleapis.com/google.devtools.cloudbuild.v1.BuildOperationMetadata",
                "build": build}, "response": {
                "@type": "type.googleapis.com/google.devtools.cloudbuild.v1.Build", **build}}
        return OK, build
    listing = re.fullmatch(r"/storage/v1/b\?.*prefix=([^&]+).*", path)
    if listing:  # the project's buckets: its Cloud Build staging bucket is one
        return OK, {"kind": "storage#buckets", "items": [
            {"kind": "storage#bucket", "id": listing[1], "name": listing[1], "location": "US"}]}
    bucket = re.fullmatch(r"/storage/v1/b/([^/?]+)(\?.*)?", path)
    if bucket:
        return OK, {"kind": "storage#bucket", "id": bucket[1], "name": bucket[1], "location": "US",
                    "projectNumber": "1"}
    upload = re.fullmatch(r"/upload/storage/v1/b/([^/?]+)/o\?.*", path)
    if upload:  # gcloud checks the object's hash against the file it sent
        content = _media(body)
        name = re.search(r"[?&]name=([^&]+)", path)
        return OK, {"kind": "storage#object", "bucket": upload[1],
                    "name": urllib.parse.unquote(name[1]) if name else "source.tgz",
                    "generation": "1", "size": str(len(content)),
                    "md5Hash": base64.b64encode(hashlib.md5(content).digest()).decode()}
    if host == "storage.googleapis.com" and not path.startswith(("/storage/", "/upload/")):
        return OK, "(the build log: this stand-in builds nothing)\n"
    if "/storage/v1/b" in path and "/o" in path:  # listing or reading objects: none there
        return "404 Not Found", {"error": {"code": 404, "message": "No such object"}}
    if host.startswith("cloudresourcemanager."):
        project = path.rsplit("/", 1)[-1].split("?")[0]
        return OK, {"projectId": project, "projectNumber": "1", "name": f"projects/{project}"}
    return OK, {}


def _media(body):
    """The file in a multipart/related upload: the part after the JSON metadata (gcloud ends
    its lines with \\n, other clients with \\r\\n)."""
    newline = b"\r\n" if body.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    boundary = body.split(newline, 1)[0]
    parts = body.split(boundary)
    if len(parts) < 3:
        return b""
    _, _, data = parts[2].partition(newline * 2)
    return data[:-len(newline)]


class Handler(Intercepting):
    def allowed(self, host):
        return host.endswith(".googleapis.com")

    def exchange(self, host, method, path, headers, body):
        with open(self.server.record, "a") as handle:
            handle.write(json.dumps({"method": method, "host": host, "path": path,
                                     "body": body.decode(errors="replace")}) + "\n")
        status, reply = answer(method, host, path, body)
        kind = "text/plain" if isinstance(reply, str) else "application/json"
        data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
        return status, [("Content-Type", kind), ("Content-Length", str(len(data)))], data


def main(port, cert, key, record):
    server = Server(port, Handler, cert, key)
    server.record = record
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:5])
