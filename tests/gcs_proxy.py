"""A CONNECT proxy through which TensorFlow's own gs:// filesystem reaches fake-gcs-server.

TensorFlow's GCS client always calls https://www.googleapis.com and storage.googleapis.com;
it honours libcurl's HTTPS_PROXY and CURL_CA_BUNDLE but has no endpoint setting. This proxy
accepts CONNECT for those two hosts only, terminates TLS with a throw-away certificate, and
forwards plain HTTP to the emulator, smoothing three gaps between them:
  1. TF sends `Transfer-Encoding: identity` on empty POST/PUT; the emulator answers 501.
  2. The emulator builds resumable-upload URLs from the Host header: Host becomes its own.
  3. TF asks GET /storage/v1/b/<bucket>/storageLayout before renaming folders; the emulator
     has no such call, so it is answered from GET /storage/v1/b/<bucket>.

For outage tests, while the file OUTAGE exists, every request whose "METHOD PATH" matches
the regular expression it holds (an empty file: every request) is answered 503, as a storage
service that is down answers. A file of "N PATTERN" fails each matching request the first N
times it is made, then lets it through: an outage that the job's own reads start and end,
however fast or slow the machine is. When PATTERN has a group, requests count together by
what the group matched: TensorFlow names each try's temporary upload anew.

Run as its own process (TF blocks in C++ holding the GIL, which would deadlock a thread):
    python gcs_proxy.py PORT EMULATOR_PORT CERT_PEM KEY_PEM OUTAGE
"""

import http.client
import json
import re
import socket
import socketserver
import ssl
import sys
import threading

GOOGLE_HOSTS = {"www.googleapis.com", "storage.googleapis.com"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
              "content-length", "upgrade"}


def read_head(stream):
    """(request or status line, [(name, value)]) or None at end of stream."""
    line = stream.readline()
    if not line:
        return None
    headers = []
    while True:
        header = stream.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return line.decode("latin-1").strip(), headers


def read_body(stream, headers):
    values = {name.lower(): value for name, value in headers}
    if "content-length" in values:
        return stream.read(int(values["content-length"]))
    if values.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(stream.readline().split(b";")[0], 16)
            if size == 0:
                stream.readline()
                return body
            body += stream.read(size)
            stream.readline()
    return b""


class Intercepting(socketserver.StreamRequestHandler):
    """Takes CONNECT for the hosts allowed(host) accepts, terminates TLS with the server's
    certificate, and answers each request inside with exchange(); opens no connection out."""

    def handle(self):
        head = read_head(self.rfile)
        if head is None:
            return
        method, target, _ = head[0].split(" ", 2)
        host = target.rsplit(":", 1)[0]
        if method != "CONNECT" or not self.allowed(host):
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        # Replies go out in several writes; with Nagle's algorithm each later one waits for
        # the client's delayed ACK of the first, 40 ms a request (TF opens a connection a request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()
        secure = self.server.tls.wrap_socket(self.connection, server_side=True)
        reader, writer = secure.makefile("rb"), secure.makefile("wb")
        while True:
            head = read_head(reader)
            if head is None:
                break
            method, path, _ = head[0].split(" ", 2)
            headers = head[1]
            body = read_body(reader, headers)
            status, reply_headers, reply = self.exchange(host, method, path, headers, body)
            writer.write(f"HTTP/1.1 {status}\r\n".encode())
            for name, value in reply_headers:
                writer.write(f"{name}: {value}\r\n".encode("latin-1"))
            writer.write(b"\r\n" + reply)
            writer.flush()


class Handler(Intercepting):
    upstream = None

    def allowed(self, host):
        return host in GOOGLE_HOSTS

    def exchange(self, host, method, path, headers, body):
        if self.upstream is None:  # one connection to the emulator per client connection
            self.upstream = http.client.HTTPConnection("127.0.0.1", self.server.emulator_port,
                                                       timeout=60)
            self.upstream.connect()
            self.upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.forward(self.upstream, host, method, path, headers, body)

    def forward(self, upstream, host, method, path, headers, body):
        if self.server.failing(f"{method} {path}"):
            reply = b'{"error": {"code": 503, "message": "Service Unavailable (test outage)"}}'
            return "503 Service Unavailable", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(reply)))], reply
        layout = re.fullmatch(r"/storage/v1/b/([^/?]+)/storageLayout(\?.*)?", path)
        if method == "GET" and layout:
            status, _, reply = self.forward(upstream, host, "GET", f"/storage/v1/b/{layout[1]}",
                                            headers, b"")
            if status.startswith("200"):
                reply = json.dumps({"kind": "storage#storageLayout", "bucket": layout[1],
                                    "hierarchicalNamespace": {"enabled": False}}).encode()
            return status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(reply)))], reply
        upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            if name.lower() == "host":
                # Resumable-upload URLs are built from it: point them at the emulator itself.
                value = (f"127.0.0.1:{self.server.emulator_port}"
                         if host == "www.googleapis.com" else value)
            elif name.lower() in HOP_BY_HOP:
                continue  # drops `Transfer-Encoding: identity` too
            upstream.putheader(name, value)
        upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body)
        response = upstream.getresponse()
        reply = response.read()
        reply_headers = [(name, value) for name, value in response.getheaders()
                         if name.lower() not in HOP_BY_HOP]
        length = response.getheader("Content-Length") if method == "HEAD" else str(len(reply))
        if length is not None:
            reply_headers.append(("Content-Length", length))
        return f"{response.status} {response.reason}", reply_headers, reply


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port, handler, cert, key):
        super().__init__(("127.0.0.1", int(port)), handler)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)


class Proxy(Server):
    failures = None  # request: how many times it was failed, for "N PATTERN" outages

    def failing(self, request):
        """Whether the outage (see the module's docstring) fails this request."""
        try:
            with open(self.outage_file) as handle:
                outage = handle.read().strip()
        except OSError:
            return False
        times, _, pattern = outage.partition(" ") if outage[:1].isdigit() else ("", "", outage)
        match = re.search(pattern, request)
        if not match:
            return False
        if not times:
            return True
        key = match.group(1) if match.re.groups else request
        with self.lock:
            self.failures[key] = self.failures.get(key, 0) + 1
            return self.failures[key] <= int(times)


def main(port, emulator_port, cert, key, outage_file):
    server = Proxy(port, Handler, cert, key)
    server.outage_file = outage_file
    server.lock, server.failures = threading.Lock(), {}
    server.emulator_port = int(emulator_port)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:6])
