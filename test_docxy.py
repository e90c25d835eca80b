"""Test suite for docxy.py, the standard-library Docker registry mirror.

Every test drives the real server (``python docxy.py --listen 127.0.0.1:0 ...``)
as a subprocess over real loopback sockets, against fakes that behave like
Docker Hub's registry, its token service and its blob CDN.  The fakes record
every request they see so tests can assert on what really went upstream.

Order: fakes and helpers, fixtures, then tests grouped as
configuration/start-up -> name validation -> upstream client (auth,
redirects, streaming, errors) -> request handler (routes, HEAD, errors) ->
server (keep-alive, TLS, limits, signals) -> real clients (skopeo,
docker-registry).

Only pytest and the standard library are used.  Addresses are loopback only
(127.0.0.1, 127.0.0.2 for the "other host" CDN, ::1).
"""

import base64
import gzip
import hashlib
import html
import http.client
import http.server
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
DOCXY = os.path.join(HERE, "docxy.py")

KIB = 1024
MIB = 1024 * KIB

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# The Accept list dockerd sends for a manifest, one header per value.  The
# index type comes last: a proxy that forwards only the first Accept header
# gets a 404 from the fake registry, like from Docker Hub.
DOCKERD_ACCEPT = [
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    MT_MANIFEST,
    MT_INDEX,
]
SERVICE = "registry.docker.io"
ALICE = ("alice", "s3cret")
ALICE_B64 = base64.b64encode(b"alice:s3cret").decode()
PRIVATE_REPOS = {"acme/private"}
RATE_HEADERS = [
    ("RateLimit-Limit", "100;w=21600"),
    ("RateLimit-Remaining", "76;w=21600"),
    ("Docker-RateLimit-Source", "127.0.0.1"),
]
DIGEST_RE = r"sha256:[0-9a-f]{64}"
COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
SCOPE_RE = re.compile(r"^repository:(%s(?:/%s)*):(pull|push|pull,push|\*)$" % (COMPONENT, COMPONENT))
LISTEN_RE = re.compile(r"docxy: listening on (https?)://(\[[^\]]+\]|[^\s:/\[\]]+):(\d+)")
REDIRECT_RE = re.compile(r"docxy: redirecting http://(\[[^\]]+\]|[^\s:/\[\]]+):(\d+) to https")
HOP_BY_HOP_KEEP_ALIVE = "timeout=99, max=7"


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def registry_error(code, message, detail=None):
    return {"errors": [{"code": code, "message": message, "detail": detail}]}


# --------------------------------------------------------------------------
# Image content shared by all fakes
# --------------------------------------------------------------------------


class Content:
    """Repositories, manifests and blobs served by the fakes.

    ``library/busybox`` holds a multi-arch OCI index (tags ``latest`` and
    ``1.36``) with linux/amd64 and linux/arm64 manifests, their configs and
    random-byte layers, an 8 MiB blob, a manifest whose served bytes do not
    match its digest, and "special" blobs with misbehaviour knobs (see
    RegistryHandler.serve_special).  ``acme/private`` needs alice's
    credentials.
    """

    def __init__(self):
        self.repos = {}
        self.blobs = {}  # digest -> bytes, everything the CDN can serve
        self.special = {}  # kind -> (digest, bytes), served by the registry itself
        self.special_by_digest = {}
        self.served_instead = {}  # manifest digest -> (wrong) bytes actually served
        self.slow_halfway = threading.Event()  # set by the registry half-way through the slow blob
        self.slow_gate = threading.Event()  # ... which then waits (<= 10 s) for this before the rest
        busybox = self._repo("library/busybox")
        self.platform = {}
        entries = []
        for arch, sizes in (("amd64", (300 * KIB, 200 * KIB)), ("arm64", (250 * KIB,))):
            layers = [self.add_blob(busybox, os.urandom(n)) for n in sizes]
            config = self.add_blob(busybox, self.config_json(arch, layers), MT_CONFIG)
            desc = self.add_manifest(busybox, {
                "schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config, "layers": layers})
            desc["platform"] = {"architecture": arch, "os": "linux"}
            entries.append(desc)
            self.platform[arch] = {
                "manifest": desc["digest"], "config": config["digest"],
                "layers": [layer["digest"] for layer in layers]}
        index = self.add_manifest(busybox, {
            "schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}, tags=("latest", "1.36"))
        self.index_digest = index["digest"]
        self.index_bytes = busybox["manifests"][self.index_digest][1]

        self.big = os.urandom(8 * MIB)
        self.big_digest = self.add_blob(busybox, self.big)["digest"]

        amd = self.platform["amd64"]
        bad = self.add_manifest(busybox, {
            "schemaVersion": 2, "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": amd["config"],
                       "size": len(self.blobs[amd["config"]])},
            "layers": [], "annotations": {"fake": "served bytes do not match digest"}})
        good = busybox["manifests"][bad["digest"]][1]
        self.bad_manifest_digest = bad["digest"]
        self.served_instead[bad["digest"]] = good[:-1] + b" "

        # Tag "truncated": the registry closes the connection half-way through this manifest.
        big_manifest = self.add_manifest(busybox, {
            "schemaVersion": 2, "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": amd["config"], "size": len(self.blobs[amd["config"]])},
            "layers": [], "annotations": {"padding": "x" * 128 * KIB}}, tags=("truncated",))
        self.truncated_manifest = busybox["manifests"][big_manifest["digest"]][1]

        for kind, size in (("truncate", 256 * KIB), ("corrupt", 200 * KIB), ("slow", 2 * MIB),
                           ("chain5", 64 * KIB), ("chain6", 64 * KIB), ("loop", 16 * KIB)):
            data = os.urandom(size)
            self.special[kind] = (sha256_digest(data), data)
            self.special_by_digest[sha256_digest(data)] = (kind, data)

        self.referrers_bytes = json.dumps({
            "schemaVersion": 2, "mediaType": MT_INDEX,
            "manifests": [{"mediaType": MT_MANIFEST, "artifactType": "application/vnd.example.sbom+json",
                           "digest": sha256_digest(b"sbom"), "size": 4}]}).encode()

        private = self._repo("acme/private")
        layer = self.add_blob(private, os.urandom(64 * KIB))
        config = self.add_blob(private, self.config_json("amd64", [layer]), MT_CONFIG)
        desc = self.add_manifest(private, {
            "schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config, "layers": [layer]},
            tags=("latest",))
        self.private = {"manifest": desc["digest"], "config": config["digest"], "layers": [layer["digest"]]}

    def _repo(self, name):
        self.repos[name] = {"tags": {}, "manifests": {}, "blobs": {}}
        return self.repos[name]

    @staticmethod
    def config_json(arch, layers):
        return json.dumps({
            "architecture": arch, "os": "linux", "created": "2024-01-01T00:00:00Z",
            "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
        }).encode()

    def add_blob(self, repo, data, media_type=MT_LAYER):
        digest = sha256_digest(data)
        repo["blobs"][digest] = data
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_manifest(self, repo, obj, tags=()):
        data = json.dumps(obj, indent=3).encode()
        digest = sha256_digest(data)
        repo["manifests"][digest] = (obj["mediaType"], data)
        for tag in tags:
            repo["tags"][tag] = digest
        return {"mediaType": obj["mediaType"], "digest": digest, "size": len(data)}


class TokenStore:
    """Tokens issued by the fake token server and the repositories each grants."""

    def __init__(self):
        self.grants = {}
        self.lock = threading.Lock()

    def issue(self, names):
        token = "tok-" + os.urandom(16).hex()
        with self.lock:
            self.grants[token] = set(names)
        return token

    def allows(self, authorization, name):
        if not authorization or not authorization.startswith("Bearer "):
            return False
        with self.lock:
            return name in self.grants.get(authorization[len("Bearer "):], ())

    def all_tokens(self):
        with self.lock:
            return list(self.grants)


# --------------------------------------------------------------------------
# Fake servers
# --------------------------------------------------------------------------


class Rec:
    """One request as a fake saw it."""

    def __init__(self, handler, body):
        split = urllib.parse.urlsplit(handler.path)
        self.method = handler.command
        self.path = split.path
        self.query = split.query
        self.headers = list(handler.headers.items())
        self.body = body
        self.client_port = handler.client_address[1]
        self.response = None

    def header(self, name):
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def params(self):
        return urllib.parse.parse_qs(self.query, keep_blank_values=True)

    def __repr__(self):
        return "<%s %s%s>" % (self.method, self.path, "?" + self.query if self.query else "")


ALL_FAKES = []


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler that records each request, then calls handle_request()."""

    protocol_version = "HTTP/1.1"
    timeout = 20
    fake = None  # the FakeServer, set per server

    def setup(self):
        ctx = self.fake.tls
        if ctx is not None:
            self.request.settimeout(self.timeout)
            self.request = ctx.wrap_socket(self.request, server_side=True)
        super().setup()

    def log_message(self, *args):
        pass

    def _dispatch(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = self._read_chunked()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
        self.rec = Rec(self, body)
        self.fake.record(self.rec)
        try:
            self.handle_request()
        except (OSError, ssl.SSLError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def _read_chunked(self):
        body = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return body
            body += self.rfile.read(size)
            self.rfile.readline()

    def send_bytes(self, status, body, ctype=None, headers=()):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_json(self, status, obj, headers=()):
        body = json.dumps(obj).encode()
        self.rec.response = body
        self.send_bytes(status, body, "application/json", headers)


class FakeServer:
    """A ThreadingHTTPServer in a daemon thread; keyword attributes are shared with the handler."""

    def __init__(self, handler, host="127.0.0.1", tls=None, **attrs):
        self.__dict__.update(attrs)
        self.tls = tls
        cls = type(handler.__name__, (handler,), {"fake": self})
        self.httpd = http.server.ThreadingHTTPServer((host, 0), cls)
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self.url = "%s://%s:%d" % ("https" if tls else "http", host, self.port)
        self.requests = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()
        ALL_FAKES.append(self)

    def record(self, rec):
        with self.lock:
            self.requests.append(rec)

    def clear(self):
        with self.lock:
            del self.requests[:]

    def reqs(self, method=None, path=None, prefix=None):
        with self.lock:
            found = list(self.requests)
        return [r for r in found if (method is None or r.method == method)
                and (path is None or r.path == path)
                and (prefix is None or r.path.startswith(prefix))]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        if self in ALL_FAKES:
            ALL_FAKES.remove(self)


class RegistryHandler(RecordingHandler):
    """Fake Docker Hub registry (registry-1.docker.io).

    ``GET /v2/`` answers a Bearer challenge pointing at the fake token server
    (or 200 when the server was made with auth=False).  Repository routes need
    a token granting the repository (else 401 with a scope in the challenge).
    Manifests by tag or digest carry Content-Type, Docker-Content-Digest,
    ETag, rate-limit headers and, to be stripped, hop-by-hop headers; an OCI
    index is only served when the Accept list allows it; If-None-Match gives
    304.  Normal blob GET/HEAD answer 307 to the CDN on 127.0.0.2 (with the
    CDN URL in the HTML body too).  tags/list is sent chunked.  Special blobs
    misbehave: truncate, corrupt, slow, chain5/chain6 (that many redirects)
    and loop.
    """

    def end_headers(self):
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        super().end_headers()

    def handle_request(self):
        fake, path = self.fake, self.rec.path
        if self.command not in ("GET", "HEAD"):
            return self.send_json(405, registry_error("UNSUPPORTED", "the operation is unsupported"))
        m = re.match(r"^/chain/(\d+)/(%s)$" % DIGEST_RE, path)
        if m:
            return self.chain(int(m.group(1)), m.group(2))
        if re.match(r"^/loop/%s$" % DIGEST_RE, path):
            return self.redirect(302, fake.url + path)
        if path == "/v2/":
            if fake.auth:
                return self.challenge(None)
            return self.send_json(200, {})
        m = (re.match(r"^/v2/(?P<name>.+)/(?P<kind>tags)/list$", path)
             or re.match(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)$", path))
        if not m:
            return self.send_json(404, registry_error("NOT_FOUND", "page not found"))
        name, kind = m.group("name"), m.group("kind")
        if fake.auth and not fake.store.allows(self.headers.get("Authorization"), name):
            return self.challenge(name)
        repo = fake.content.repos.get(name)
        if repo is None:
            return self.send_json(404, registry_error(
                "NAME_UNKNOWN", "repository name not known to registry", {"name": name}))
        if kind == "tags":
            return self.tags(name, repo)
        if kind == "manifests":
            return self.manifest(repo, m.group("ref"))
        if kind == "referrers":
            return self.send_bytes(200, fake.content.referrers_bytes, MT_INDEX)
        return self.blob(repo, m.group("ref"))

    def challenge(self, name):
        value = 'Bearer realm="%s",service="%s"' % (self.fake.token_url, SERVICE)
        if name:
            value += ',scope="repository:%s:pull"' % name
        self.send_json(401, registry_error("UNAUTHORIZED", "authentication required"),
                       [("WWW-Authenticate", value)])

    def redirect(self, status, location):
        body = ('<a href="%s">Redirect</a>.\n' % html.escape(location)).encode()
        self.send_bytes(status, body, "text/html; charset=utf-8", [("Location", location)])

    def tags(self, name, repo):
        body = json.dumps({"name": name, "tags": sorted(repo["tags"])}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        half = len(body) // 2
        for chunk in (body[:half], body[half:], b""):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    def manifest(self, repo, ref):
        digest = ref if ref.startswith("sha256:") else repo["tags"].get(ref)
        if digest not in repo["manifests"]:
            return self.send_json(404, registry_error("MANIFEST_UNKNOWN", "manifest unknown", {"ref": ref}))
        media_type, data = repo["manifests"][digest]
        accept = set()
        for value in self.headers.get_all("Accept") or []:
            accept.update(v.split(";")[0].strip() for v in value.split(","))
        if accept and media_type not in accept and "*/*" not in accept:
            return self.send_json(404, registry_error(
                "MANIFEST_UNKNOWN", "OCI index found, but accept header does not support OCI indexes"))
        etag = '"%s"' % digest
        common = [("Docker-Content-Digest", digest), ("ETag", etag)] + RATE_HEADERS
        if ref == "truncated":
            self.send_response(200)
            for key, value in common + [("Content-Type", media_type), ("Content-Length", str(len(data)))]:
                self.send_header(key, value)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            for key, value in common:
                self.send_header(key, value)
            self.end_headers()
            return
        hop_by_hop = [("Keep-Alive", HOP_BY_HOP_KEEP_ALIVE),
                      ("Proxy-Authenticate", 'Basic realm="upstream-proxy"')]
        self.send_bytes(200, self.fake.content.served_instead.get(digest, data), media_type,
                        common + hop_by_hop)

    def blob(self, repo, digest):
        special = self.fake.content.special_by_digest.get(digest)
        if special:
            return self.serve_special(special[0], digest, special[1])
        if digest not in repo["blobs"]:
            return self.send_json(404, registry_error("BLOB_UNKNOWN", "blob unknown to registry"))
        sig = hashlib.sha1(digest.encode()).hexdigest()
        self.redirect(307, "%s/blobs/%s?sig=%s&expires=4102444800" % (self.fake.cdn.url, digest, sig))

    def serve_special(self, kind, digest, data):
        if kind in ("chain5", "chain6"):
            hops = int(kind[-1])
            return self.redirect(307, "%s/chain/%d/%s" % (self.fake.url, hops - 1, digest))
        if kind == "loop":
            return self.redirect(307, "%s/loop/%s" % (self.fake.url, digest))
        if kind == "corrupt":
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Docker-Content-Digest", digest)
        self.end_headers()
        if self.command == "HEAD":
            return
        if kind == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif kind == "slow":  # half, then a pause until the test opens the gate, then the rest
            half = len(data) // 2
            for i in range(0, len(data), 64 * KIB):
                if i == half:
                    self.fake.content.slow_halfway.set()
                    self.fake.content.slow_gate.wait(10)
                self.wfile.write(data[i:i + 64 * KIB])
                self.wfile.flush()
                time.sleep(0.02)
        else:
            self.wfile.write(data)

    def chain(self, n, digest):
        kind_data = self.fake.content.special_by_digest.get(digest)
        if kind_data is None:
            return self.send_json(404, registry_error("BLOB_UNKNOWN", "blob unknown"))
        if n == 0:
            return self.send_bytes(200, kind_data[1], "application/octet-stream",
                                   [("Docker-Content-Digest", digest)])
        status = (301, 302, 303, 307, 308)[n % 5]
        self.redirect(status, "%s/chain/%d/%s" % (self.fake.url, n - 1, digest))


class TokenHandler(RecordingHandler):
    """Fake auth.docker.io.

    ``GET /token?service=registry.docker.io&scope=repository:NAME:pull`` (Basic
    credentials optional) and ``POST /token`` with an OAuth password-grant
    form.  Bad scope/service -> 400, wrong credentials -> 401.  Private
    repositories are only granted to alice:s3cret.  The response body is kept
    in rec.response so tests can compare it byte for byte.
    """

    def handle_request(self):
        if self.rec.path != "/token":
            return self.send_json(404, {"details": "not found"})
        if self.command == "GET":
            params = self.rec.params()
            scopes = params.get("scope", [])
            creds = None
            auth = self.headers.get("Authorization") or ""
            if auth.startswith("Basic "):
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                creds = (user, password)
        elif self.command == "POST":
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != \
                    "application/x-www-form-urlencoded":
                return self.send_json(400, {"details": "form body expected"})
            params = urllib.parse.parse_qs(self.rec.body.decode(), keep_blank_values=True)
            if params.get("grant_type") != ["password"]:
                return self.send_json(400, {"error": "unsupported_grant_type"})
            creds = (params.get("username", [""])[0], params.get("password", [""])[0])
            scopes = " ".join(params.get("scope", [])).split()
        else:
            return self.send_json(405, {"details": "method not allowed"})
        if params.get("service") != [SERVICE]:
            return self.send_json(400, {"details": "invalid service"})
        names = []
        for scope in scopes:
            m = SCOPE_RE.match(scope)
            if not m:
                return self.send_json(400, {"details": "invalid scope: %s" % scope})
            names.append(m.group(1))
        if creds is not None and creds != ALICE:
            return self.send_json(401, {"details": "incorrect username or password"})
        token = self.fake.store.issue(n for n in names if n not in PRIVATE_REPOS or creds == ALICE)
        if self.command == "GET":
            body = {"token": token, "access_token": token, "expires_in": 300,
                    "issued_at": "2024-01-01T00:00:00Z"}
        else:
            body = {"access_token": token, "scope": " ".join(scopes), "expires_in": 300,
                    "token_type": "Bearer"}
        self.send_json(200, body)


class CdnHandler(RecordingHandler):
    """Fake blob CDN on 127.0.0.2 (S3/Cloudflare-like).

    Serves ``/blobs/<digest>?sig=...``; any Authorization header -> 400 (as
    S3 does), missing signature -> 403; ``Range: bytes=a-b`` -> 206 with
    Content-Range.
    """

    def handle_request(self):
        m = re.match(r"^/blobs/(%s)$" % DIGEST_RE, self.rec.path)
        if not m or self.command not in ("GET", "HEAD"):
            return self.send_bytes(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
        if self.headers.get("Authorization") is not None:
            return self.send_bytes(400, b"<Error><Code>InvalidArgument</Code><Message>Only one auth "
                                        b"mechanism allowed</Message></Error>", "application/xml")
        if "sig" not in self.rec.params():
            return self.send_bytes(403, b"<Error><Code>AccessDenied</Code></Error>", "application/xml")
        data = self.fake.content.blobs.get(m.group(1))
        if data is None:
            return self.send_bytes(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
        headers = [("ETag", '"%s"' % hashlib.md5(data).hexdigest()), ("Accept-Ranges", "bytes")]
        status = 200
        rng = self.headers.get("Range")
        if rng:
            rm = re.match(r"^bytes=(\d+)-(\d*)$", rng)
            if not rm or int(rm.group(1)) >= len(data):
                return self.send_bytes(416, b"", None, [("Content-Range", "bytes */%d" % len(data))])
            start = int(rm.group(1))
            end = min(int(rm.group(2)) if rm.group(2) else len(data) - 1, len(data) - 1)
            headers.append(("Content-Range", "bytes %d-%d/%d" % (start, end, len(data))))
            data, status = data[start:end + 1], 206
        self.send_bytes(status, data, "application/octet-stream", headers)


class Blackhole:
    """TCP listener that accepts connections and never answers (an upstream that hangs)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.conns = []
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def close(self):
        self.stopped = True
        self.thread.join(2)
        for conn in self.conns:
            conn.close()
        self.sock.close()


# --------------------------------------------------------------------------
# docxy process and client helpers
# --------------------------------------------------------------------------


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DOCXY_") and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Docxy:
    """docxy.py as a subprocess; stdout/stderr lines are collected by background threads."""

    def __init__(self, args, env=None, listeners=1, redirects=0):
        if not os.path.exists(DOCXY):
            pytest.fail("docxy.py not found at %s" % DOCXY)
        self.args = list(args)
        self.proc = subprocess.Popen([sys.executable, DOCXY] + self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=clean_env(env), cwd=HERE)
        self.lines, self.out = [], []
        self.cond = threading.Condition()
        self.open_pipes = 2
        self.readers = [threading.Thread(target=self._read, args=(pipe, dest), daemon=True)
                        for pipe, dest in ((self.proc.stderr, self.lines), (self.proc.stdout, self.out))]
        for t in self.readers:
            t.start()
        self.urls = []
        if listeners:
            for m in self.wait_for(LISTEN_RE, listeners):
                self.urls.append((m.group(1), m.group(2).strip("[]"), int(m.group(3))))
        self.redirect_ports = [int(m.group(2)) for m in self.wait_for(REDIRECT_RE, redirects)]

    def _read(self, pipe, dest):
        for raw in iter(pipe.readline, b""):
            with self.cond:
                dest.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self.cond.notify_all()
        with self.cond:
            self.open_pipes -= 1
            self.cond.notify_all()

    def wait_for(self, pattern, count=1, timeout=15):
        """Wait until `count` stderr lines match `pattern`; fail if docxy exits first."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in (regex.search(line) for line in self.lines) if m]
                if len(found) >= count:
                    return found[:count]
                if self.open_pipes == 0 or time.monotonic() > deadline:
                    break
                self.cond.wait(0.1)
        pytest.fail("docxy did not log %r (exit code %r); stderr:\n%s"
                    % (regex.pattern, self.proc.poll(), self.log()))

    def log(self):
        with self.cond:
            return "\n".join(self.lines)

    @property
    def port(self):
        return self.urls[0][2]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        finally:
            for t in self.readers:
                t.join(5)
            self.proc.stderr.close()
            self.proc.stdout.close()


def run_to_exit(args, env=None, timeout=15):
    """Run docxy expecting it to exit by itself; returns (code, stdout, stderr)."""
    if not os.path.exists(DOCXY):
        pytest.fail("docxy.py not found at %s" % DOCXY)
    proc = subprocess.Popen([sys.executable, DOCXY] + list(args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(env), cwd=HERE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail("docxy %s did not exit within %ss; stderr:\n%s" % (args, timeout, err.decode()))
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<Resp %s %r>" % (self.status, self.body[:300])


def call(port, method, path, headers=(), body=None, host="127.0.0.1", tls=None, timeout=20):
    """One request with http.client; headers is a list of (name, value), repeats allowed."""
    cls = http.client.HTTPSConnection if tls else http.client.HTTPConnection
    kwargs = {"context": tls} if tls else {}
    conn = cls(host, port, timeout=timeout, **kwargs)
    try:
        conn.putrequest(method, path, skip_host=any(k.lower() == "host" for k, _ in headers),
                        skip_accept_encoding=True)
        for key, value in headers:
            conn.putheader(key, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return Resp(resp.status, resp.msg, resp.read())
    finally:
        conn.close()


def raw_request(port, target, method="GET", headers=None, body=b"", host="127.0.0.1", timeout=15):
    """Send a hand-written request (no client normalisation of the target); parse the reply."""
    lines = ["Host: 127.0.0.1:%d" % port] if headers is None else list(headers)
    data = ("%s %s HTTP/1.1\r\n" % (method, target)).encode("latin-1")
    for line in lines + ["Connection: close"] + (["Content-Length: %d" % len(body)] if body else []):
        data += line.encode("latin-1") + b"\r\n"
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(data + b"\r\n" + body)
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        return Resp(resp.status, resp.msg, resp.read())
    finally:
        sock.close()


def read_until_eof(sock, limit=64 * MIB):
    chunks = []
    while sum(map(len, chunks)) < limit:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def assert_error(resp, status, codes):
    """A docxy error: given status, JSON {"errors":[{"code","message","detail"}]} with a code in codes."""
    codes = {codes} if isinstance(codes, str) else set(codes)
    assert resp.status == status, resp
    assert "application/json" in (resp.headers.get("Content-Type") or ""), resp.headers
    body = resp.json()
    assert isinstance(body["errors"], list) and body["errors"], body
    for err in body["errors"]:
        assert {"code", "message", "detail"} <= set(err), err
    assert body["errors"][0]["code"] in codes, body
    assert b"Traceback" not in resp.body
    return body


def parse_challenge(value):
    scheme, _, rest = value.partition(" ")
    return scheme, dict(re.findall(r'(\w+)="([^"]*)"', rest))


def accept_values(rec):
    values = set()
    for value in rec.header_all("Accept"):
        values.update(v.strip() for v in value.split(",") if v.strip())
    return values


def get_token(port, scope, basic=None, tls=None):
    """The client token dance through docxy: GET /v2/, then the realm it advertises."""
    r = call(port, "GET", "/v2/", tls=tls)
    assert r.status == 401, r
    _, params = parse_challenge(r.headers["WWW-Authenticate"])
    realm = urllib.parse.urlsplit(params["realm"])
    query = urllib.parse.urlencode([("scope", scope), ("service", params["service"])])
    headers = [("Authorization", "Basic " + basic)] if basic else []
    r = call(port, "GET", realm.path + "?" + query, headers, tls=tls)
    assert r.status == 200, r
    return r.json()["token"]


def bearer(token):
    return [("Authorization", "Bearer " + token)]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def has_ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


def pull_like_dockerd(port, tls=None, repo="library/busybox", arch="amd64"):
    """Pull `repo:latest` the way dockerd does, verifying every digest; returns blobs by digest."""
    scheme = "https" if tls else "http"
    r = call(port, "GET", "/v2/", tls=tls)
    assert r.status == 401, r
    auth_scheme, params = parse_challenge(r.headers["WWW-Authenticate"])
    assert auth_scheme == "Bearer"
    assert params["realm"] == "%s://127.0.0.1:%d/auth/token" % (scheme, port)
    query = urllib.parse.urlencode([("scope", "repository:%s:pull" % repo), ("service", params["service"])])
    r = call(port, "GET", "/auth/token?" + query, tls=tls)
    assert r.status == 200, r
    auth = bearer(r.json()["token"])
    accept = [("Accept", a) for a in DOCKERD_ACCEPT]

    r = call(port, "HEAD", "/v2/%s/manifests/latest" % repo, auth + accept, tls=tls)
    assert r.status == 200 and r.body == b"", r
    index_digest = r.headers["Docker-Content-Digest"]
    assert r.headers["Content-Type"] == MT_INDEX

    fetched = {}

    def get(kind, digest):
        resp = call(port, "GET", "/v2/%s/%s/%s" % (repo, kind, digest), auth + accept, tls=tls)
        assert resp.status == 200, resp
        assert sha256_digest(resp.body) == digest
        fetched[digest] = resp.body
        return resp.body

    index = json.loads(get("manifests", index_digest))
    chosen = [m for m in index["manifests"]
              if m["platform"] == {"architecture": arch, "os": "linux"}]
    assert len(chosen) == 1
    manifest = json.loads(get("manifests", chosen[0]["digest"]))
    get("blobs", manifest["config"]["digest"])
    for layer in manifest["layers"]:
        assert len(get("blobs", layer["digest"])) == layer["size"]
    return index_digest, fetched


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clear_fakes():
    """Each test starts with empty request logs on every fake."""
    for fake in list(ALL_FAKES):
        fake.clear()
    yield


@pytest.fixture(scope="module")
def content():
    return Content()


@pytest.fixture(scope="module")
def store():
    return TokenStore()


@pytest.fixture(scope="module")
def cdn(content):
    try:
        fake = FakeServer(CdnHandler, host="127.0.0.2", content=content)
    except OSError as exc:
        pytest.skip("cannot bind 127.0.0.2 for the fake CDN: %s" % exc)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def tokens(store):
    fake = FakeServer(TokenHandler, store=store)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def registry(content, cdn, tokens, store):
    fake = FakeServer(RegistryHandler, content=content, cdn=cdn, store=store,
                      token_url=tokens.url + "/token", auth=True)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def open_registry(content, cdn, store):
    """The same registry without authentication (/v2/ answers 200)."""
    fake = FakeServer(RegistryHandler, content=content, cdn=cdn, store=store, token_url=None, auth=False)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Test CA; RSA (PKCS#1), ECDSA (SEC1) and PKCS#8 keys; full-chain certs for 127.0.0.1/::1/localhost."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl CLI not installed; cannot create test certificates")
    d = tmp_path_factory.mktemp("certs")

    def run(*args):
        subprocess.run([openssl] + list(args), cwd=str(d), check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=docxy test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    run("genrsa", "-out", "rsa-any.key", "2048")
    try:
        run("rsa", "-in", "rsa-any.key", "-out", "rsa.key", "-traditional")
    except subprocess.CalledProcessError:  # OpenSSL 1.1 writes PKCS#1 by default
        run("rsa", "-in", "rsa-any.key", "-out", "rsa.key")
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ec.key")
    run("pkcs8", "-topk8", "-nocrypt", "-in", "rsa.key", "-out", "pkcs8.key")
    for name in ("rsa", "ec"):
        run("req", "-new", "-key", name + ".key", "-subj", "/CN=127.0.0.1", "-out", name + ".csr")
        run("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", name + ".crt", "-extfile", "ext.cnf")
        (d / (name + "-chain.pem")).write_bytes((d / (name + ".crt")).read_bytes() + (d / "ca.pem").read_bytes())
    (d / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    headers = {"rsa.key": "RSA PRIVATE KEY", "ec.key": "EC PRIVATE KEY", "pkcs8.key": "PRIVATE KEY"}
    for fname, kind in headers.items():
        assert (d / fname).read_text().startswith("-----BEGIN %s-----" % kind), fname
    paths = {p.name: str(p) for p in d.iterdir()}
    paths["client"] = ssl.create_default_context(cafile=paths["ca.pem"])
    return paths


@pytest.fixture(scope="module")
def tls_registry(content, cdn, store, certs):
    """The registry over HTTPS (no auth); its blob redirects point at the plain-http CDN."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs["rsa-chain.pem"], certs["rsa.key"])
    fake = FakeServer(RegistryHandler, tls=ctx, content=content, cdn=cdn, store=store,
                      token_url=None, auth=False)
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def docxy(registry):
    """The shared mirror: plain HTTP in front of the fake Docker Hub, library/ rule on."""
    d = Docxy(["--listen", "127.0.0.1:0", "--upstream", registry.url, "--library-prefix", "on",
               "--upstream-timeout", "5"])
    yield d
    d.stop()


@pytest.fixture(scope="module")
def tls_docxy(registry, certs):
    """The mirror over HTTPS (RSA full chain) in front of the fake Docker Hub."""
    d = Docxy(["--listen", "127.0.0.1:0", "--upstream", registry.url, "--library-prefix", "on",
               "--cert", certs["rsa-chain.pem"], "--key", certs["rsa.key"]])
    yield d
    d.stop()


@pytest.fixture
def start_docxy():
    """Factory for extra docxy processes with their own flags; all killed at teardown."""
    started = []

    def start(*args, **kwargs):
        d = Docxy(list(args), **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(scope="module")
def token(docxy, registry):
    """A pull token for library/busybox, fetched through the shared mirror."""
    return get_token(docxy.port, "repository:library/busybox:pull")


# ==========================================================================
# Configuration and start-up
# ==========================================================================


def test_version_flag_prints_version():
    code, out, err = run_to_exit(["--version"])
    assert code == 0
    assert re.search(r"^docxy \d+\.\d+\.\d+$", (out + err).strip(), re.M), (out, err)


def test_help_exits_zero_and_documents_flags():
    code, out, err = run_to_exit(["--help"])
    assert code == 0
    for flag in ("--listen", "--upstream", "--cert", "--key", "--public-url", "--http-redirect",
                 "--upstream-timeout", "--client-timeout", "--max-connections", "--drain-seconds",
                 "--library-prefix"):
        assert flag in out + err, flag


def test_each_listener_logs_its_real_port(start_docxy, registry):
    d = start_docxy("--listen", "127.0.0.1:0", "--listen", "127.0.0.2:0", "--upstream", registry.url,
                    listeners=2)
    assert sorted(host for _, host, _ in d.urls) == ["127.0.0.1", "127.0.0.2"]
    for scheme, host, port in d.urls:
        assert scheme == "http" and port != 0
        r = call(port, "GET", "/health", host=host)
        assert r.status == 200 and r.json() == {"status": "ok"}
    assert len(LISTEN_RE.findall(d.log())) == 2


def test_startup_output_contains_daemon_json_snippet(start_docxy, registry):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", registry.url)
    d.wait_for(r'"registry-mirrors"')
    assert "http://127.0.0.1:%d" % d.port in d.log()


def assert_config_error(args):
    if "--listen" not in args:
        args = ["--listen", "127.0.0.1:0"] + args
    code, out, err = run_to_exit(args)
    assert code == 2, (code, err)
    assert any(line.startswith("docxy: error:") for line in err.splitlines()), err
    assert "listening on" not in out + err
    assert "Traceback" not in err


@pytest.mark.parametrize("args", [
    ["--listen", "127.0.0.1:notaport"],
    ["--listen", "127.0.0.1:70000"],
    ["--listen", "[::1:0"],
    ["--upstream", "ftp://127.0.0.1:21"],
    ["--upstream", "http://"],
    ["--library-prefix", "sometimes"],
    ["--max-connections", "zero"],
], ids=lambda a: " ".join(a))
def test_bad_configuration_exits_2_without_listener(args):
    assert_config_error(args)


@pytest.mark.parametrize("case", ["missing-cert", "garbage-cert", "mismatched-key", "missing-key"])
def test_bad_certificate_or_key_exits_2_without_listener(case, certs, tmp_path):
    assert_config_error({
        "missing-cert": ["--cert", str(tmp_path / "nope.pem"), "--key", certs["rsa.key"]],
        "garbage-cert": ["--cert", certs["garbage.pem"], "--key", certs["rsa.key"]],
        "mismatched-key": ["--cert", certs["rsa-chain.pem"], "--key", certs["ec.key"]],
        "missing-key": ["--cert", certs["rsa-chain.pem"], "--key", str(tmp_path / "nope.key")],
    }[case])


@pytest.mark.parametrize("key", ["rsa.key", "ec.key", "pkcs8.key"])
def test_https_listener_accepts_key_format(key, certs, start_docxy, registry):
    chain = "ec-chain.pem" if key == "ec.key" else "rsa-chain.pem"
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", registry.url,
                    "--cert", certs[chain], "--key", certs[key])
    assert d.urls[0][0] == "https"
    r = call(d.port, "GET", "/health", tls=certs["client"])
    assert r.status == 200 and r.json() == {"status": "ok"}


def test_cert_and_key_paths_from_environment(certs, start_docxy, registry):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", registry.url,
                    env={"DOCXY_CERT_PATH": certs["ec-chain.pem"], "DOCXY_KEY_PATH": certs["ec.key"]})
    assert d.urls[0][0] == "https"
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as raw:
        with certs["client"].wrap_socket(raw, server_hostname="127.0.0.1") as tls_sock:
            with open(certs["ec.crt"]) as f:
                assert tls_sock.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(f.read())


def test_upstream_from_environment_and_flag_overrides_it(start_docxy, open_registry):
    d = start_docxy("--listen", "127.0.0.1:0", env={"DOCXY_UPSTREAM": open_registry.url})
    r = call(d.port, "GET", "/v2/")
    assert r.status == 200
    assert len(open_registry.reqs("GET", "/v2/")) == 1

    dead = "http://127.0.0.1:%d" % free_port()
    d2 = start_docxy("--listen", "127.0.0.1:0", "--upstream", open_registry.url,
                     env={"DOCXY_UPSTREAM": dead})
    assert call(d2.port, "GET", "/v2/").status == 200
    assert len(open_registry.reqs("GET", "/v2/")) == 2


def test_listen_addresses_from_environment(start_docxy, open_registry):
    d = start_docxy("--upstream", open_registry.url,
                    env={"DOCXY_LISTEN": "127.0.0.1:0,127.0.0.2:0"}, listeners=2)
    assert sorted(host for _, host, _ in d.urls) == ["127.0.0.1", "127.0.0.2"]
    for _, host, port in d.urls:
        assert call(port, "GET", "/health", host=host).status == 200


def test_http_redirect_listener_answers_301_to_https(certs, start_docxy, registry):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", registry.url,
                    "--cert", certs["rsa-chain.pem"], "--key", certs["rsa.key"],
                    "--public-url", "https://mirror.example.com", "--http-redirect", "127.0.0.1:0",
                    redirects=1)
    port = d.redirect_ports[0]
    r = call(port, "GET", "/v2/library/busybox/manifests/latest")
    assert r.status == 301, r
    assert r.headers["Location"] == "https://mirror.example.com/v2/library/busybox/manifests/latest"
    assert registry.reqs() == []


def test_ipv6_loopback_listener(start_docxy, registry):
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this host")
    d = start_docxy("--listen", "[::1]:0", "--upstream", registry.url)
    assert d.urls[0][1] == "::1"
    r = call(d.port, "GET", "/health", host="::1")
    assert r.status == 200 and r.json() == {"status": "ok"}


# ==========================================================================
# Name, tag and digest validation (raw request lines, nothing goes upstream)
# ==========================================================================

GOOD_DIGEST = "sha256:" + "ab" * 32

INVALID_TARGETS = [
    ("/v2/library/../busybox/manifests/latest", "NAME_INVALID"),
    ("/v2/../v2/busybox/manifests/latest", "NAME_INVALID"),
    ("/v2/library/./busybox/manifests/latest", "NAME_INVALID"),
    ("/v2/%2e%2e/busybox/manifests/latest", "NAME_INVALID"),
    ("/v2/library%2fbusybox/manifests/latest", "NAME_INVALID"),
    ("/v2/busy%3fbox/manifests/latest", "NAME_INVALID"),
    ("/v2/busy%23box/manifests/latest", "NAME_INVALID"),
    ("/v2/library/BusyBox/manifests/latest", "NAME_INVALID"),
    ("/v2/Library/busybox/blobs/" + GOOD_DIGEST, "NAME_INVALID"),
    ("/v2/library//busybox/manifests/latest", "NAME_INVALID"),
    ("/v2/-busybox/manifests/latest", "NAME_INVALID"),
    ("/v2/busybox-/tags/list", "NAME_INVALID"),
    ("/v2/" + "a" * 127 + "/" + "b" * 128 + "/manifests/latest", "NAME_INVALID"),
    ("/v2/busybox/manifests/-x", "TAG_INVALID"),
    ("/v2/busybox/manifests/.hidden", "TAG_INVALID"),
    ("/v2/busybox/manifests/" + "a" * 129, "TAG_INVALID"),
    ("/v2/busybox/blobs/sha256:xyz", "DIGEST_INVALID"),
    ("/v2/busybox/blobs/sha256:abc123", "DIGEST_INVALID"),
    ("/v2/busybox/blobs/sha256:" + "AB" * 32, "DIGEST_INVALID"),
    ("/v2/busybox/blobs/latest", "DIGEST_INVALID"),
    ("/v2/busybox/manifests/sha256:xyz", "DIGEST_INVALID"),
    ("/v2/busybox/referrers/sha256:abc", "DIGEST_INVALID"),
]


@pytest.mark.parametrize("target,code", INVALID_TARGETS, ids=[t[:60] for t, _ in INVALID_TARGETS])
def test_invalid_reference_rejected_before_upstream(target, code, docxy, registry, tokens, cdn):
    for method in ("GET", "HEAD"):
        r = raw_request(docxy.port, target, method)
        assert r.status == 400, (method, r)
        if method == "GET":
            assert_error(r, 400, code)
    assert registry.reqs() == [] and tokens.reqs() == [] and cdn.reqs() == []


def test_percent_in_reference_position_rejected(docxy, registry):
    r = raw_request(docxy.port, "/v2/busybox/manifests/lat%65st")
    assert_error(r, 400, {"NAME_INVALID", "TAG_INVALID"})
    r = raw_request(docxy.port, "/v2/busybox/blobs/sha256%3a" + "ab" * 32)
    assert_error(r, 400, {"NAME_INVALID", "DIGEST_INVALID"})
    assert registry.reqs() == []


def test_longest_valid_name_and_tag_are_forwarded(docxy, registry):
    name = "a" * 127 + "/" + "b" * 127  # 255 characters
    tag = "t" * 128
    r = raw_request(docxy.port, "/v2/%s/manifests/%s" % (name, tag),
                    headers=["Host: 127.0.0.1:%d" % docxy.port, "Authorization: Bearer not-a-token"])
    assert r.status == 401  # the fake registry's answer: not a token it issued
    assert [q.path for q in registry.reqs()] == ["/v2/%s/manifests/%s" % (name, tag)]


# ==========================================================================
# Upstream client: auth challenge and token endpoint
# ==========================================================================


def test_v2_challenge_realm_rewritten_to_mirror(docxy, registry):
    r = call(docxy.port, "GET", "/v2/")
    assert r.status == 401
    scheme, params = parse_challenge(r.headers["WWW-Authenticate"])
    assert scheme == "Bearer"
    assert params == {"realm": "http://127.0.0.1:%d/auth/token" % docxy.port, "service": SERVICE}
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert len(registry.reqs("GET", "/v2/")) == 1


@pytest.mark.parametrize("host,realm_base", [
    ("mirror.local:5000", "http://mirror.local:5000"),
    ("Mirror.Example.com", "http://Mirror.Example.com"),
    ("[::1]:5000", "http://[::1]:5000"),
    ("10.1.2.3", "http://10.1.2.3"),
])
def test_v2_challenge_realm_uses_valid_host_header(host, realm_base, docxy):
    r = raw_request(docxy.port, "/v2/", headers=["Host: " + host])
    assert r.status == 401
    _, params = parse_challenge(r.headers["WWW-Authenticate"])
    assert params["realm"].lower() == (realm_base + "/auth/token").lower()


BAD_HOSTS = ['evil.com/"x', "a b", "host:1:2", "alice@evil.com", 'evil.com"', "evil.com,other.com",
             "[::1", "evil.com:port", "evil.com/path", ""]


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_malicious_host_header_never_reaches_realm(host, docxy):
    r = raw_request(docxy.port, "/v2/", headers=["Host: " + host])
    assert r.status == 400, r
    challenge = r.headers.get("WWW-Authenticate") or ""
    assert "realm" not in challenge
    if host:
        assert host not in challenge


def test_missing_host_header_is_rejected_for_challenge(docxy):
    r = raw_request(docxy.port, "/v2/", headers=[])
    assert r.status == 400, r
    assert "realm" not in (r.headers.get("WWW-Authenticate") or "")


def test_v2_challenge_realm_uses_public_url(start_docxy, registry):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", registry.url, "--library-prefix", "on",
                    "--public-url", "https://mirror.example.com")
    for host in ("127.0.0.1:%d" % d.port, "evil.com"):
        r = raw_request(d.port, "/v2/", headers=["Host: " + host])
        assert r.status == 401, r
        _, params = parse_challenge(r.headers["WWW-Authenticate"])
        assert params["realm"] == "https://mirror.example.com/auth/token"
        assert params["service"] == SERVICE


def test_v2_upstream_200_passed_through(start_docxy, open_registry):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", open_registry.url)
    r = call(d.port, "GET", "/v2/")
    assert r.status == 200 and r.json() == {}
    assert "WWW-Authenticate" not in r.headers
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert len(open_registry.reqs("GET", "/v2/")) == 1


def test_token_request_forwarded_with_library_scope(docxy, tokens):
    call(docxy.port, "GET", "/v2/")
    r = call(docxy.port, "GET", "/auth/token?service=registry.docker.io&scope=repository%3Abusybox%3Apull"
                                "&scope=repository:acme/private:pull")
    assert r.status == 200
    seen = tokens.reqs("GET", "/token")
    assert len(seen) == 1
    assert seen[0].params()["scope"] == ["repository:library/busybox:pull", "repository:acme/private:pull"]
    assert seen[0].params()["service"] == [SERVICE]
    assert r.body == seen[0].response
    assert r.headers["Content-Type"] == "application/json"


def test_token_request_before_v2_learns_realm(start_docxy, registry, tokens):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", registry.url, "--library-prefix", "on")
    r = call(d.port, "GET", "/auth/token?scope=repository:busybox:pull&service=registry.docker.io")
    assert r.status == 200, r
    assert len(registry.reqs("GET", "/v2/")) >= 1
    seen = tokens.reqs("GET", "/token")
    assert len(seen) == 1 and seen[0].params()["scope"] == ["repository:library/busybox:pull"]
    assert r.body == seen[0].response
    token = r.json()["token"]
    assert call(d.port, "GET", "/v2/busybox/manifests/latest", bearer(token)).status == 200


def test_private_repository_token_requires_client_credentials(docxy, tokens, content):
    path = "/v2/acme/private/manifests/latest"
    anonymous = get_token(docxy.port, "repository:acme/private:pull")
    assert call(docxy.port, "GET", path, bearer(anonymous)).status == 401

    tokens.clear()
    token = get_token(docxy.port, "repository:acme/private:pull", basic=ALICE_B64)
    seen = tokens.reqs("GET", "/token")
    assert len(seen) == 1 and seen[0].header("Authorization") == "Basic " + ALICE_B64
    r = call(docxy.port, "GET", path, bearer(token) + [("Accept", MT_MANIFEST)])
    assert r.status == 200 and sha256_digest(r.body) == content.private["manifest"]

    wrong = base64.b64encode(b"alice:wrong").decode()
    r = call(docxy.port, "GET", "/auth/token?service=registry.docker.io&scope=repository:acme/private:pull",
             [("Authorization", "Basic " + wrong)])
    assert r.status == 401
    assert r.body == tokens.reqs("GET", "/token")[-1].response


def test_post_token_forwarded_with_form_body(docxy, tokens, content):
    call(docxy.port, "GET", "/v2/")
    form = urllib.parse.urlencode([("grant_type", "password"), ("username", "alice"), ("password", "s3cret"),
                                   ("scope", "repository:acme/private:pull"), ("service", SERVICE),
                                   ("client_id", "docker")]).encode()
    r = call(docxy.port, "POST", "/auth/token", [("Content-Type", "application/x-www-form-urlencoded")],
             body=form)
    assert r.status == 200, r
    seen = tokens.reqs("POST", "/token")
    assert len(seen) == 1
    assert urllib.parse.parse_qs(seen[0].body.decode()) == urllib.parse.parse_qs(form.decode())
    assert r.body == seen[0].response
    token = r.json()["access_token"]
    r = call(docxy.port, "GET", "/v2/acme/private/manifests/latest", bearer(token))
    assert r.status == 200 and sha256_digest(r.body) == content.private["manifest"]


# ==========================================================================
# Upstream client: forwarding of requests and responses
# ==========================================================================


def test_manifest_request_forwards_authorization_and_every_accept_value(docxy, registry, token, content):
    accept = [("Accept", a) for a in DOCKERD_ACCEPT]
    r = call(docxy.port, "GET", "/v2/busybox/manifests/latest", bearer(token) + accept)
    assert r.status == 200, r
    assert r.body == content.index_bytes
    seen = registry.reqs("GET", "/v2/library/busybox/manifests/latest")
    assert len(seen) == 1
    assert seen[0].header("Authorization") == "Bearer " + token
    assert accept_values(seen[0]) == set(DOCKERD_ACCEPT)


def test_if_none_match_forwarded_and_304_passed_through(docxy, registry, token, content):
    etag = '"%s"' % content.index_digest
    r = call(docxy.port, "GET", "/v2/busybox/manifests/latest",
             bearer(token) + [("Accept", MT_INDEX), ("If-None-Match", etag)])
    assert r.status == 304 and r.body == b""
    assert r.headers["ETag"] == etag
    seen = registry.reqs("GET", "/v2/library/busybox/manifests/latest")
    assert len(seen) == 1 and seen[0].header("If-None-Match") == etag


def test_manifest_response_headers_kept_and_hop_by_hop_dropped(docxy, token, content):
    r = call(docxy.port, "GET", "/v2/busybox/manifests/" + content.index_digest,
             bearer(token) + [("Accept", MT_INDEX)])
    assert r.status == 200
    assert r.headers["Content-Type"] == MT_INDEX
    assert r.headers["Content-Length"] == str(len(content.index_bytes))
    assert r.headers["Docker-Content-Digest"] == content.index_digest
    assert r.headers["ETag"] == '"%s"' % content.index_digest
    for key, value in RATE_HEADERS:
        assert r.headers[key] == value, key
    assert HOP_BY_HOP_KEEP_ALIVE not in (r.headers.get_all("Keep-Alive") or [])
    assert not [k for k in r.headers if k.lower().startswith("proxy-")], r.headers.items()
    assert r.body == content.index_bytes


def test_upstream_error_status_and_body_passed_through(docxy, registry, token):
    r = call(docxy.port, "GET", "/v2/busybox/manifests/nosuchtag", bearer(token) + [("Accept", MT_INDEX)])
    assert r.status == 404
    assert r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert r.json() == json.loads(registry.reqs("GET", "/v2/library/busybox/manifests/nosuchtag")[0].response)


def test_repository_401_challenge_realm_rewritten_scope_kept(docxy):
    # A client that brings its own (here: bad) token gets the upstream's challenge, re-pointed.
    r = call(docxy.port, "GET", "/v2/busybox/manifests/latest", [("Authorization", "Bearer not-a-token-of-this-registry")])
    assert r.status == 401
    _, params = parse_challenge(r.headers["WWW-Authenticate"])
    assert params == {"realm": "http://127.0.0.1:%d/auth/token" % docxy.port, "service": SERVICE,
                      "scope": "repository:library/busybox:pull"}


def test_chunked_tags_list_delivered_intact(docxy, registry, token):
    r = call(docxy.port, "GET", "/v2/busybox/tags/list", bearer(token))
    assert r.status == 200
    assert r.json() == {"name": "library/busybox", "tags": ["1.36", "latest", "truncated"]}
    if r.headers.get("Content-Length") is not None:
        assert int(r.headers["Content-Length"]) == len(r.body)
    assert len(registry.reqs("GET", "/v2/library/busybox/tags/list")) == 1


def test_referrers_forwarded(docxy, registry, token, content):
    digest = content.platform["amd64"]["manifest"]
    r = call(docxy.port, "GET", "/v2/busybox/referrers/" + digest, bearer(token) + [("Accept", MT_INDEX)])
    assert r.status == 200
    assert r.headers["Content-Type"] == MT_INDEX
    assert r.body == content.referrers_bytes
    seen = registry.reqs("GET", "/v2/library/busybox/referrers/" + digest)
    assert len(seen) == 1 and seen[0].header("Authorization") == "Bearer " + token


def test_library_prefix_added_for_one_component_names(docxy, registry, token):
    call(docxy.port, "GET", "/v2/busybox/manifests/latest", bearer(token))
    call(docxy.port, "GET", "/v2/library/busybox/manifests/1.36", bearer(token))
    paths = [r.path for r in registry.reqs()]
    assert paths == ["/v2/library/busybox/manifests/latest", "/v2/library/busybox/manifests/1.36"]


def test_containerd_ns_for_docker_hub_is_served_when_library_rule_is_on(docxy, registry, token, content):
    r = call(docxy.port, "HEAD", "/v2/library/busybox/manifests/latest?ns=docker.io", bearer(token))
    assert r.status == 200
    assert r.headers["Docker-Content-Digest"] == content.index_digest
    assert [q.path for q in registry.reqs()] == ["/v2/library/busybox/manifests/latest"]


@pytest.mark.parametrize("ns", ["internal.host", "evil.example", "127.0.0.1:1", "169.254.169.254"])
def test_containerd_ns_for_another_registry_is_404_without_upstream_contact(ns, docxy, registry, tokens):
    r = call(docxy.port, "GET", "/v2/library/busybox/manifests/latest?ns=" + ns)
    assert_error(r, 404, "NAME_UNKNOWN")
    assert registry.reqs() == [] and tokens.reqs() == []


def test_two_component_names_untouched(docxy, registry):
    r = call(docxy.port, "GET", "/v2/acme/private/manifests/latest", [("Authorization", "Bearer not-a-token-of-this-registry")])
    assert r.status == 401
    assert [q.path for q in registry.reqs()] == ["/v2/acme/private/manifests/latest"]


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_library_prefix_off_or_auto_with_non_hub_upstream_does_not_rewrite(mode, start_docxy, registry, tokens):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", registry.url, "--library-prefix", mode)
    r = call(d.port, "GET", "/v2/busybox/manifests/latest", [("Authorization", "Bearer not-a-token-of-this-registry")])
    assert r.status == 401
    assert [q.path for q in registry.reqs(prefix="/v2/busybox")] == ["/v2/busybox/manifests/latest"]
    assert registry.reqs(prefix="/v2/library/") == []
    _, params = parse_challenge(r.headers["WWW-Authenticate"])
    assert params["scope"] == "repository:busybox:pull"
    r = call(d.port, "GET", "/auth/token?service=registry.docker.io&scope=repository:busybox:pull")
    assert r.status == 200
    assert tokens.reqs("GET", "/token")[-1].params()["scope"] == ["repository:busybox:pull"]


# ==========================================================================
# Upstream client: redirects
# ==========================================================================


def assert_no_cdn_trace(resp):
    assert "Location" not in resp.headers
    for key, value in resp.headers.items():
        assert "127.0.0.2" not in value and "sig=" not in value, (key, value)
    assert b"127.0.0.2" not in resp.body[:4096]


def test_blob_redirect_followed_without_leaking_authorization_or_cookie(docxy, registry, cdn, token, content):
    digest = content.platform["amd64"]["layers"][0]
    r = call(docxy.port, "GET", "/v2/busybox/blobs/" + digest,
             bearer(token) + [("Cookie", "session=abc123")])
    assert r.status == 200, r
    assert sha256_digest(r.body) == digest
    assert r.headers["Content-Length"] == str(len(content.blobs[digest]))
    assert_no_cdn_trace(r)
    seen = registry.reqs("GET", "/v2/library/busybox/blobs/" + digest)
    assert len(seen) == 1 and seen[0].header("Authorization") == "Bearer " + token
    hits = cdn.reqs("GET", "/blobs/" + digest)
    assert len(hits) == 1
    assert hits[0].header("Authorization") is None
    assert hits[0].header("Cookie") is None
    assert "sig" in hits[0].params()


def test_blob_range_and_if_range_forwarded_through_redirect(docxy, registry, cdn, token, content):
    digest = content.platform["amd64"]["layers"][1]
    data = content.blobs[digest]
    validator = '"%s"' % hashlib.md5(data).hexdigest()
    r = call(docxy.port, "GET", "/v2/busybox/blobs/" + digest,
             bearer(token) + [("Range", "bytes=100-1099"), ("If-Range", validator)])
    assert r.status == 206, r
    assert r.headers["Content-Range"] == "bytes 100-1099/%d" % len(data)
    assert r.headers["Content-Length"] == "1000"
    assert r.body == data[100:1100]
    assert_no_cdn_trace(r)
    up = registry.reqs("GET", "/v2/library/busybox/blobs/" + digest)
    assert up[0].header("Range") == "bytes=100-1099" and up[0].header("If-Range") == validator
    hit = cdn.reqs("GET", "/blobs/" + digest)
    assert len(hit) == 1 and hit[0].header("Range") == "bytes=100-1099"


def test_redirect_chain_of_five_hops_is_followed(docxy, registry, token, content):
    digest, data = content.special["chain5"]
    r = call(docxy.port, "GET", "/v2/busybox/blobs/" + digest, bearer(token))
    assert r.status == 200, r
    assert r.body == data
    assert len(registry.reqs(prefix="/chain/")) == 5
    assert_no_cdn_trace(r)


def test_redirect_chain_of_six_hops_is_502(docxy, registry, token, content):
    digest, _ = content.special["chain6"]
    r = call(docxy.port, "GET", "/v2/busybox/blobs/" + digest, bearer(token))
    assert_error(r, 502, {"UNAVAILABLE", "TOO_MANY_REDIRECTS", "UNKNOWN"})
    assert registry.reqs(path="/chain/0/" + digest) == []
    assert "Location" not in r.headers


def test_redirect_loop_is_502_after_bounded_hops(docxy, registry, token, content):
    digest, _ = content.special["loop"]
    r = call(docxy.port, "GET", "/v2/busybox/blobs/" + digest, bearer(token))
    assert_error(r, 502, {"UNAVAILABLE", "TOO_MANY_REDIRECTS", "UNKNOWN"})
    assert 1 <= len(registry.reqs(prefix="/loop/")) <= 5


def test_https_to_http_redirect_is_refused(start_docxy, tls_registry, cdn, certs, content):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", tls_registry.url,
                    env={"SSL_CERT_FILE": certs["ca.pem"]})
    r = call(d.port, "GET", "/v2/library/busybox/manifests/latest", [("Accept", MT_INDEX)])
    assert r.status == 200 and r.body == content.index_bytes  # the TLS upstream itself is trusted
    digest = content.platform["arm64"]["layers"][0]
    r = call(d.port, "GET", "/v2/library/busybox/blobs/" + digest)
    assert_error(r, 502, {"UNAVAILABLE", "UNKNOWN"})
    assert len(tls_registry.reqs("GET", "/v2/library/busybox/blobs/" + digest)) == 1
    assert cdn.reqs() == []
    assert_no_cdn_trace(r)


# ==========================================================================
# Upstream client: streaming and integrity
# ==========================================================================


def test_large_blob_streams_intact_with_content_length(docxy, cdn, token, content):
    conn = http.client.HTTPConnection("127.0.0.1", docxy.port, timeout=30)
    try:
        conn.request("GET", "/v2/busybox/blobs/" + content.big_digest, headers=dict(bearer(token)))
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Length") == str(8 * MIB)
        h = hashlib.sha256()
        total = 0
        while True:
            chunk = resp.read(256 * KIB)
            if not chunk:
                break
            h.update(chunk)
            total += len(chunk)
    finally:
        conn.close()
    assert total == 8 * MIB
    assert "sha256:" + h.hexdigest() == content.big_digest
    assert len(cdn.reqs("GET", "/blobs/" + content.big_digest)) == 1


def read_expecting_incomplete(port, path, headers, full_length):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=dict(headers))
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Length") == str(full_length)
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
        return info.value.partial
    finally:
        conn.close()


def test_truncated_upstream_body_never_looks_complete(docxy, token, content):
    digest, data = content.special["truncate"]
    partial = read_expecting_incomplete(docxy.port, "/v2/busybox/blobs/" + digest, bearer(token), len(data))
    assert len(partial) < len(data)
    assert data.startswith(partial)


def test_truncated_manifest_by_tag_never_looks_complete(docxy, token, content):
    """No digest to verify here: only the early end of the upstream body can be noticed."""
    data = content.truncated_manifest
    partial = read_expecting_incomplete(docxy.port, "/v2/busybox/manifests/truncated",
                                        bearer(token) + [("Accept", MT_MANIFEST)], len(data))
    assert len(partial) < len(data)
    assert data.startswith(partial)


def test_blob_not_matching_its_digest_never_delivered_complete(docxy, token, content):
    digest, data = content.special["corrupt"]
    partial = read_expecting_incomplete(docxy.port, "/v2/busybox/blobs/" + digest, bearer(token), len(data))
    assert len(partial) < len(data)


def test_manifest_not_matching_its_digest_never_delivered_complete(docxy, token, content):
    digest = content.bad_manifest_digest
    served = content.served_instead[digest]
    partial = read_expecting_incomplete(docxy.port, "/v2/busybox/manifests/" + digest,
                                        bearer(token) + [("Accept", MT_MANIFEST)], len(served))
    assert len(partial) < len(served)


# ==========================================================================
# Upstream client: unreachable and silent upstreams
# ==========================================================================


def test_unreachable_upstream_gives_502_quickly(start_docxy):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:%d" % free_port(),
                    "--library-prefix", "on")
    for path in ("/v2/", "/v2/busybox/manifests/latest"):
        start = time.monotonic()
        r = call(d.port, "GET", path, timeout=15)
        assert time.monotonic() - start < 8
        body = assert_error(r, 502, "UNAVAILABLE")
        assert "Traceback" not in json.dumps(body)


def test_silent_upstream_gives_504_within_upstream_timeout():
    hole = Blackhole()
    d = None
    try:
        d = Docxy(["--listen", "127.0.0.1:0", "--upstream", hole.url, "--upstream-timeout", "1"])
        for path in ("/v2/", "/v2/library/busybox/manifests/latest"):
            start = time.monotonic()
            r = call(d.port, "GET", path, timeout=15)
            assert time.monotonic() - start < 8
            assert_error(r, 504, "UNAVAILABLE")
        assert hole.conns, "docxy never connected to the silent upstream"
    finally:
        if d:
            d.stop()
        hole.close()


# ==========================================================================
# Request handler: routes, HEAD, errors
# ==========================================================================


def test_health_returns_ok_without_upstream_contact(docxy, registry, tokens, cdn):
    r = call(docxy.port, "GET", "/health")
    assert r.status == 200
    assert r.json() == {"status": "ok"}
    assert registry.reqs() == [] and tokens.reqs() == [] and cdn.reqs() == []


def test_head_manifest_stays_head_and_sends_no_body(docxy, registry, token, content):
    req = ("HEAD /v2/busybox/manifests/latest HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
           "Accept: %s\r\nConnection: close\r\n\r\n" % (docxy.port, token, ", ".join(DOCKERD_ACCEPT)))
    with socket.create_connection(("127.0.0.1", docxy.port), timeout=15) as sock:
        sock.sendall(req.encode())
        raw = read_until_eof(sock)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert rest == b""
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["content-length"] == str(len(content.index_bytes))
    assert lower["docker-content-digest"] == content.index_digest
    assert [r.method for r in registry.reqs(prefix="/v2/library/busybox/manifests/")] == ["HEAD"]


def test_head_blob_stays_head_through_redirect(docxy, registry, cdn, token, content):
    digest = content.platform["arm64"]["config"]
    r = call(docxy.port, "HEAD", "/v2/busybox/blobs/" + digest, bearer(token))
    assert r.status == 200 and r.body == b""
    assert r.headers["Content-Length"] == str(len(content.blobs[digest]))
    assert [q.method for q in registry.reqs()] == ["HEAD"]
    assert [q.method for q in cdn.reqs()] == ["HEAD"]
    assert_no_cdn_trace(r)


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize("target", ["/v2/busybox/manifests/latest", "/v2/busybox/blobs/uploads/",
                                    "/v2/library/busybox/blobs/" + GOOD_DIGEST])
def test_write_methods_rejected_405(method, target, docxy, registry):
    r = raw_request(docxy.port, target, method, body=b"{}")
    assert_error(r, 405, "UNSUPPORTED")
    assert registry.reqs() == []


@pytest.mark.parametrize("target", ["/", "/nope", "/v3/", "/v2/busybox/foo/bar", "/healthz", "/auth/other"])
def test_unknown_paths_404_json(target, docxy, registry, tokens):
    assert_error(raw_request(docxy.port, target), 404, "NOT_FOUND")
    assert registry.reqs() == [] and tokens.reqs() == []


def test_pull_multiarch_image_like_dockerd_over_http(docxy, registry, cdn, content):
    index_digest, fetched = pull_like_dockerd(docxy.port)
    amd = content.platform["amd64"]
    assert index_digest == content.index_digest
    assert set(fetched) == {content.index_digest, amd["manifest"], amd["config"]} | set(amd["layers"])
    assert len(registry.reqs("HEAD", "/v2/library/busybox/manifests/latest")) == 1
    assert registry.reqs("GET", "/v2/library/busybox/manifests/latest") == []
    assert len(registry.reqs("GET", "/v2/library/busybox/manifests/" + content.index_digest)) == 1
    assert sorted(r.path for r in cdn.reqs()) == sorted("/blobs/" + d for d in [amd["config"]] + amd["layers"])


def test_pull_multiarch_image_like_dockerd_over_https(tls_docxy, registry, content, certs):
    index_digest, fetched = pull_like_dockerd(tls_docxy.port, tls=certs["client"], arch="arm64")
    arm = content.platform["arm64"]
    assert index_digest == content.index_digest
    assert set(fetched) == {content.index_digest, arm["manifest"], arm["config"]} | set(arm["layers"])
    assert len(registry.reqs("HEAD", "/v2/library/busybox/manifests/latest")) == 1
    assert registry.reqs("GET", "/v2/library/busybox/manifests/latest") == []


# ==========================================================================
# Server: keep-alive, idle and slow clients, limits, signals, logging
# ==========================================================================


def send_and_read(sock, request, method="GET"):
    sock.sendall(request)
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    body = resp.read()
    return resp, body


def test_keep_alive_serves_two_requests_on_one_connection(docxy, token, content):
    with socket.create_connection(("127.0.0.1", docxy.port), timeout=15) as sock:
        resp, body = send_and_read(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert resp.status == 200 and json.loads(body) == {"status": "ok"}
        assert not resp.will_close
        req = ("GET /v2/busybox/manifests/latest HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
               "Accept: %s\r\n\r\n" % (token, MT_INDEX)).encode()
        resp, body = send_and_read(sock, req)
        assert resp.status == 200 and body == content.index_bytes
        resp, body = send_and_read(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert resp.status == 200


def test_upstream_connection_reused_across_requests(docxy, registry, token, content):
    for _ in range(2):
        r = call(docxy.port, "GET", "/v2/busybox/manifests/1.36", bearer(token) + [("Accept", MT_INDEX)])
        assert r.status == 200 and r.body == content.index_bytes
    seen = registry.reqs("GET", "/v2/library/busybox/manifests/1.36")
    assert len(seen) == 2
    assert seen[0].client_port == seen[1].client_port


def test_idle_client_does_not_block_other_clients(docxy):
    idle = socket.create_connection(("127.0.0.1", docxy.port), timeout=10)
    partial = socket.create_connection(("127.0.0.1", docxy.port), timeout=10)
    try:
        partial.sendall(b"GET /health HTTP/1.1\r\nHo")
        r = call(docxy.port, "GET", "/health", timeout=5)
        assert r.status == 200
    finally:
        idle.close()
        partial.close()


def test_idle_tls_client_does_not_block_handshakes(tls_docxy, certs):
    idle = socket.create_connection(("127.0.0.1", tls_docxy.port), timeout=10)
    half_hello = socket.create_connection(("127.0.0.1", tls_docxy.port), timeout=10)
    try:
        half_hello.sendall(b"\x16\x03\x01\x02\x00\x01")
        r = call(tls_docxy.port, "GET", "/health", tls=certs["client"], timeout=5)
        assert r.status == 200 and r.json() == {"status": "ok"}
    finally:
        idle.close()
        half_hello.close()


def test_tls_probe_on_plain_port_gets_an_http_answer(docxy, registry):
    # Go clients recognise "server gave HTTP response to HTTPS client" and fall back to http://.
    with socket.create_connection(("127.0.0.1", docxy.port), timeout=15) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(32) + b"\r\n")
        raw = read_until_eof(sock)
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert b'"errors"' in raw and b"plain HTTP" in raw
    assert registry.reqs() == []
    docxy.wait_for(r"TLS handshake on the plain-HTTP port")


def test_slow_header_client_is_cut_off_after_client_timeout(start_docxy, registry):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", registry.url, "--client-timeout", "2")
    # A client that finishes its request in time is served normally.
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        for piece in (b"GET /health HT", b"TP/1.1\r\nHost: 127.0.0.1\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(0.3)
        resp = http.client.HTTPResponse(sock, method="GET")
        resp.begin()
        assert resp.status == 200
        resp.read()
    # One byte every 0.3 s would need a minute for this request.
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    start = time.monotonic()
    reply = None
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                reply = b""
                break
            readable, _, _ = select.select([sock], [], [], 0.3)
            if readable:
                try:
                    reply = sock.recv(4096)
                except OSError:
                    reply = b""
                break
            assert time.monotonic() - start < 15, "slow client was never cut off"
    elapsed = time.monotonic() - start
    assert reply is not None, "the whole slow request was accepted"
    assert not reply.startswith(b"HTTP/1.1 200"), reply
    assert 1.0 < elapsed < 12, elapsed


def test_max_connections_holds_extra_client_until_a_slot_frees(start_docxy, registry):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", registry.url, "--max-connections", "2",
                    "--client-timeout", "30")
    health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    first = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    second = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    third = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    try:
        for sock in (first, second):
            resp, _ = send_and_read(sock, health)
            assert resp.status == 200 and not resp.will_close
        third.sendall(health)
        third.settimeout(1.5)
        with pytest.raises(socket.timeout):
            third.recv(1)
        first.close()
        third.settimeout(10)
        resp = http.client.HTTPResponse(third, method="GET")
        resp.begin()
        assert resp.status == 200
        assert json.loads(resp.read()) == {"status": "ok"}
    finally:
        for sock in (first, second, third):
            sock.close()


def not_served(port):
    """True when a new connection is refused or gets no HTTP answer."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=1)
    except OSError:
        return True
    try:
        sock.settimeout(1)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return not sock.recv(16).startswith(b"HTTP/")
    except OSError:
        return True
    finally:
        sock.close()


def test_sigterm_drains_inflight_transfer_and_exits_zero(start_docxy, registry, content):
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", registry.url, "--library-prefix", "on",
                    "--drain-seconds", "20")
    token = get_token(d.port, "repository:library/busybox:pull")
    digest, data = content.special["slow"]
    result = {}
    started = threading.Event()

    def download():
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
        try:
            conn.request("GET", "/v2/busybox/blobs/" + digest, headers=dict(bearer(token)))
            resp = conn.getresponse()
            result["status"] = resp.status
            started.set()
            result["body"] = resp.read()
        except Exception as exc:  # reported by the assertions below
            result["error"] = repr(exc)
        finally:
            started.set()
            conn.close()

    content.slow_halfway.clear()
    content.slow_gate.clear()
    worker = threading.Thread(target=download, daemon=True)
    worker.start()
    try:
        assert started.wait(15), "download never started"
        assert "error" not in result, result.get("error")
        assert content.slow_halfway.wait(15), "the fake registry never got half-way"
        d.proc.send_signal(signal.SIGTERM)
        # The transfer is held open by the fake; docxy must stop accepting meanwhile.
        deadline = time.monotonic() + 6
        while not not_served(d.port):
            assert time.monotonic() < deadline, "docxy kept accepting after SIGTERM"
            time.sleep(0.1)
        assert d.proc.poll() is None, "docxy exited with a transfer in flight"
    finally:
        content.slow_gate.set()
    worker.join(30)
    assert not worker.is_alive(), "in-flight download did not finish"
    assert "error" not in result, result.get("error")
    assert result["status"] == 200
    assert sha256_digest(result["body"]) == digest
    assert d.proc.wait(25) == 0


def test_access_log_line_per_request(docxy, token, content):
    line = re.compile(r'^docxy: 127\.0\.0\.1 "GET /v2/library/busybox/manifests/latest" 200 (\d+)B '
                      r'\d+(\.\d+)?s upstream=200$')
    before = len([x for x in docxy.log().splitlines() if line.search(x)])
    r = call(docxy.port, "GET", "/v2/library/busybox/manifests/latest", bearer(token) + [("Accept", MT_INDEX)])
    assert r.status == 200
    m = docxy.wait_for(line, before + 1)[-1]
    assert int(m.group(1)) == len(content.index_bytes)
    call(docxy.port, "GET", "/nope-logged")
    docxy.wait_for(r'^docxy: 127\.0\.0\.1 "GET /nope-logged" 404 \d+B ')
    assert "Traceback" not in docxy.log()


def test_credentials_never_appear_in_log(docxy, store, tokens):
    marker_password = "s3cret"
    token = get_token(docxy.port, "repository:acme/private:pull", basic=ALICE_B64)
    call(docxy.port, "GET", "/v2/acme/private/manifests/latest", bearer(token))
    form = urllib.parse.urlencode([("grant_type", "password"), ("username", "alice"),
                                   ("password", marker_password), ("service", SERVICE),
                                   ("scope", "repository:acme/private:pull")]).encode()
    call(docxy.port, "POST", "/auth/token", [("Content-Type", "application/x-www-form-urlencoded")], form)
    call(docxy.port, "GET", "/auth/token?service=registry.docker.io&scope=repository:acme/private:pull"
                            "&account=alice", [("Authorization", "Basic " + ALICE_B64)])
    docxy.wait_for(r'"POST /auth/token[^"]*" 200')
    docxy.wait_for(r'"GET /v2/acme/private/manifests/latest" 200')
    log = docxy.log()
    assert marker_password not in log
    assert ALICE_B64 not in log
    assert "Bearer" not in log and "Basic " not in log
    for issued in store.all_tokens():
        assert issued not in log
    assert "scope=" not in log and "account=alice" not in log
    assert "Traceback" not in log


# ==========================================================================
# Real clients: skopeo and the CNCF distribution registry
# ==========================================================================


def need_tool(name, binary=None):
    if not shutil.which(binary or name):
        pytest.skip("%s not installed" % name)


def layer_tar_gz(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0), sha256_digest(raw)


def build_oci_layout(root, tag):
    """A two-platform OCI image layout; returns {arch: {"manifest","config","layers"}} and the index digest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data, media_type):
        digest = sha256_digest(data)
        (blobs / digest.split(":")[1]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    info, entries = {}, []
    for arch in ("amd64", "arm64"):
        gz, diff_id = layer_tar_gz({"hello-%s.txt" % arch: ("hello from %s\n" % arch).encode(),
                                    "noise.bin": os.urandom(40 * KIB)})
        layer = put(gz, MT_LAYER)
        config = put(json.dumps({"architecture": arch, "os": "linux", "config": {"Cmd": ["/hello"]},
                                 "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode(), MT_CONFIG)
        manifest = put(json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config,
                                   "layers": [layer]}).encode(), MT_MANIFEST)
        manifest["platform"] = {"architecture": arch, "os": "linux"}
        entries.append(manifest)
        info[arch] = {"manifest": manifest["digest"], "config": config["digest"], "layers": [layer["digest"]]}
    index = put(json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}).encode(), MT_INDEX)
    index["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [index]}))
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return info, index["digest"]


def verify_oci_layout(root):
    """Every blob's sha256 matches its file name; returns the set of blob digests."""
    digests = set()
    for path in (root / "blobs" / "sha256").iterdir():
        digest = "sha256:" + path.name
        assert sha256_digest(path.read_bytes()) == digest, path
        digests.add(digest)
    return digests


class Skopeo:
    """Runs skopeo with a permissive policy, private HOME/TMPDIR and bounded time."""

    def __init__(self, tmp):
        self.tmp = tmp
        (tmp / "home").mkdir()
        (tmp / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        (tmp / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.env = dict(os.environ, HOME=str(tmp / "home"), TMPDIR=str(tmp), XDG_RUNTIME_DIR=str(tmp / "home"),
                        CONTAINERS_REGISTRIES_CONF=str(tmp / "registries.conf"))
        self.env.pop("SSL_CERT_FILE", None)

    def __call__(self, *args, check=True, timeout=90):
        cmd = ["skopeo", "--policy", str(self.tmp / "policy.json"), "--command-timeout", "80s"] + list(args)
        proc = subprocess.run(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout)
        if check:
            assert proc.returncode == 0, (cmd, proc.stderr.decode())
        return proc


class DistributionRegistry:
    """`docker-registry serve` with filesystem storage; optionally a pull-through cache."""

    def __init__(self, tmp, name, remote=None):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        root = tmp / name
        root.mkdir()
        config = ("version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                  "storage:\n  filesystem:\n    rootdirectory: %s\n"
                  "http:\n  addr: 127.0.0.1:%d\n" % (root / "data", self.port))
        if remote:
            config += "proxy:\n  remoteurl: %s\n" % remote
        (root / "config.yml").write_text(config)
        self.log = open(str(root / "registry.log"), "wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                if call(self.port, "GET", "/v2/", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("docker-registry did not start: %s" % (root / "registry.log").read_text())
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A real distribution registry holding library/demo:1 (two platforms), pushed with skopeo."""
    need_tool("skopeo")
    need_tool("docker-registry")
    tmp = tmp_path_factory.mktemp("origin")
    reg = DistributionRegistry(tmp, "origin")
    skopeo = Skopeo(tmp)
    info, index_digest = build_oci_layout(tmp / "layout", "1")
    skopeo("copy", "--all", "--dest-tls-verify=false", "oci:%s:1" % (tmp / "layout"),
           "docker://127.0.0.1:%d/library/demo:1" % reg.port)
    yield reg, skopeo, info, index_digest
    reg.stop()


def test_skopeo_copies_multiarch_image_through_docxy(origin, start_docxy, tmp_path):
    reg, skopeo, info, index_digest = origin
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", reg.url, "--library-prefix", "on")
    src = "docker://127.0.0.1:%d/demo:1" % d.port
    out = tmp_path / "out"
    skopeo("copy", "--all", "--src-tls-verify=false", src, "oci:%s:1" % out)
    got = verify_oci_layout(out)
    for arch in ("amd64", "arm64"):
        assert {info[arch]["manifest"], info[arch]["config"]} | set(info[arch]["layers"]) <= got
    assert json.loads((out / "index.json").read_text())["manifests"][0]["digest"] == index_digest

    proc = skopeo("--override-arch", "arm64", "--override-os", "linux", "inspect", "--tls-verify=false", src)
    inspected = json.loads(proc.stdout.decode())
    assert inspected["Architecture"] == "arm64"
    assert inspected["Layers"] == info["arm64"]["layers"]


def test_skopeo_inspect_through_docxy_uses_token_auth(docxy, registry, tokens, content, tmp_path):
    need_tool("skopeo")
    skopeo = Skopeo(tmp_path)
    proc = skopeo("--override-arch", "amd64", "--override-os", "linux", "inspect", "--tls-verify=false",
                  "docker://127.0.0.1:%d/busybox:latest" % docxy.port)
    inspected = json.loads(proc.stdout.decode())
    assert inspected["Layers"] == content.platform["amd64"]["layers"]
    assert inspected["Architecture"] == "amd64"
    assert any(q.params().get("scope") == ["repository:library/busybox:pull"] for q in tokens.reqs("GET", "/token"))

    private = "docker://127.0.0.1:%d/acme/private:latest" % docxy.port
    denied = skopeo("inspect", "--tls-verify=false", private, check=False)
    assert denied.returncode != 0
    proc = skopeo("inspect", "--tls-verify=false", "--creds", "alice:s3cret", private)
    assert json.loads(proc.stdout.decode())["Layers"] == content.private["layers"]
    assert "s3cret" not in docxy.log()


def test_distribution_pull_through_cache_via_docxy(origin, start_docxy, tmp_path):
    reg, skopeo, info, index_digest = origin
    d = start_docxy("--listen", "127.0.0.1:0", "--upstream", reg.url, "--library-prefix", "on")
    cache = DistributionRegistry(tmp_path, "cache", remote="http://127.0.0.1:%d" % d.port)
    try:
        out = tmp_path / "out"
        skopeo("copy", "--all", "--src-tls-verify=false",
               "docker://127.0.0.1:%d/library/demo:1" % cache.port, "oci:%s:1" % out)
        got = verify_oci_layout(out)
        for arch in ("amd64", "arm64"):
            assert set(info[arch]["layers"]) | {info[arch]["config"]} <= got
        assert '/v2/library/demo/blobs/' in d.log()
    finally:
        cache.stop()
