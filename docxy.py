#!/usr/bin/env python3
"""docxy: a Docker registry mirror in one file, with no dependencies.

Copy this file onto a server that can reach Docker Hub (or any Registry-v2
upstream), run it, and point Docker, containerd, podman or Kubernetes nodes at
it. It speaks the registry protocol to clients and forwards every pull to the
upstream: token challenges are re-pointed at the mirror, blob redirects to the
upstream's CDN are followed by the mirror itself, and bodies are streamed in
fixed-size chunks, verified against the digest the client asked for.

    python3 docxy.py                                # Docker Hub mirror on http://0.0.0.0:5000
    python3 docxy.py --cert fullchain.pem --key privkey.pem   # HTTPS on :443
    python3 docxy.py --help                         # every flag (each also DOCXY_<FLAG>)

Then, on each Docker host, /etc/docker/daemon.json:

    {"registry-mirrors": ["https://mirror.example.com"]}

Python 3.8+, standard library only.
"""

import argparse
import hashlib
import http.client
import http.server
import io
import ipaddress
import json
import os
import re
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse
from collections import namedtuple

__version__ = "0.1.0"


# ---------------------------------------------------------------- configuration

DOCKER_HUB = "https://registry-1.docker.io"
DOCKER_HUB_HOSTS = ("registry-1.docker.io", "index.docker.io", "docker.io")
DEFAULTS = {
    "upstream": DOCKER_HUB,
    "upstream_timeout": 10.0,
    "client_timeout": 30.0,
    "max_connections": 512,
    "drain_seconds": 30.0,
    "library_prefix": "auto",
}
# The original docxy's variable names, kept so existing deployments carry over.
ENV_ALIASES = {"DOCXY_CERT_PATH": "cert", "DOCXY_KEY_PATH": "key"}

Origin = namedtuple("Origin", "scheme host port")


class ConfigError(Exception):
    """A configuration problem, reported as one line and exit status 2."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="docxy",
        description="A Docker registry mirror in one file.",
        epilog="Every flag can also be given as an environment variable DOCXY_<FLAG> "
        "(e.g. DOCXY_UPSTREAM, DOCXY_LISTEN=0.0.0.0:5000,[::]:5000); flags win. "
        "DOCXY_CERT_PATH and DOCXY_KEY_PATH are accepted too. "
        "SSL_CERT_FILE selects the trust store for upstream TLS.",
    )
    add = parser.add_argument
    add("--listen", action="append", metavar="HOST:PORT",
        help="address to serve on, repeatable (default 0.0.0.0:5000, or 0.0.0.0:443 with --cert)")
    add("--upstream", metavar="URL", help="registry to mirror (default %s)" % DOCKER_HUB)
    add("--cert", metavar="PATH", help="PEM certificate chain: serve HTTPS")
    add("--key", metavar="PATH", help="PEM private key (RSA, ECDSA or PKCS#8)")
    add("--public-url", metavar="URL",
        help="externally visible base URL, used in auth challenges (default: from the Host header)")
    add("--http-redirect", metavar="HOST:PORT",
        help="also listen here on plain HTTP and redirect every request to HTTPS")
    add("--upstream-timeout", type=float, metavar="SECONDS",
        help="connect and read timeout towards the upstream (default 10)")
    add("--client-timeout", type=float, metavar="SECONDS",
        help="time a client has to send a complete request, and idle keep-alive time (default 30)")
    add("--max-connections", type=int, metavar="N",
        help="client connections served at once; more wait in the backlog (default 512)")
    add("--drain-seconds", type=float, metavar="SECONDS",
        help="on SIGTERM, time given to transfers in flight (default 30)")
    add("--library-prefix", choices=("auto", "on", "off"),
        help="add library/ to one-component names (default auto: for Docker Hub only)")
    add("--version", action="version", version="docxy " + __version__)
    return parser


def env_arguments(environ):
    """Turn DOCXY_* variables into the flags they stand for, so one parser checks both."""
    argv = []
    for name, value in sorted(environ.items()):
        if not name.startswith("DOCXY_") or not value.strip():
            continue
        flag = "--" + ENV_ALIASES.get(name, name[len("DOCXY_"):].lower()).replace("_", "-")
        if flag == "--listen":
            for address in re.split(r"[\s,]+", value.strip()):
                argv += [flag, address]
        else:
            argv += [flag, value.strip()]
    return argv


def read_config(argv, environ):
    parser = build_parser()
    config = parser.parse_args(argv)
    from_env, unknown = parser.parse_known_args(env_arguments(environ))
    if unknown:
        print("docxy: ignoring unknown setting %s" % unknown[0], file=sys.stderr)
    for name, value in vars(from_env).items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    for name, value in DEFAULTS.items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    return check_config(config)


def check_config(config):
    """Validate and normalise the settings; every problem is a ConfigError."""
    config.upstream = parse_origin(config.upstream, "--upstream")
    if config.public_url:
        origin = parse_origin(config.public_url, "--public-url")
        config.public_url = origin_url(origin)
    if bool(config.cert) != bool(config.key):
        raise ConfigError("--cert and --key go together")
    config.tls = server_tls_context(config.cert, config.key) if config.cert else None
    default_listen = "0.0.0.0:443" if config.tls else "0.0.0.0:5000"
    config.listen = [parse_address(a, "--listen") for a in (config.listen or [default_listen])]
    if config.http_redirect:
        if not config.tls:
            raise ConfigError("--http-redirect needs --cert and --key (it redirects to HTTPS)")
        config.http_redirect = parse_address(config.http_redirect, "--http-redirect")
    for name in ("upstream_timeout", "client_timeout", "drain_seconds"):
        if not getattr(config, name) > 0:
            raise ConfigError("--%s must be positive" % name.replace("_", "-"))
    if config.max_connections < 1:
        raise ConfigError("--max-connections must be at least 1")
    if config.library_prefix == "auto":
        config.library_prefix = config.upstream.host in DOCKER_HUB_HOSTS
    else:
        config.library_prefix = config.library_prefix == "on"
    return config


def parse_origin(url, what):
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("%s must be an http:// or https:// URL, not %r" % (what, url))
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError("%s must be scheme://host[:port] only, not %r" % (what, url))
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError("%s has a bad port: %r" % (what, url))
    return Origin(parts.scheme, parts.hostname.lower(), port)


def origin_url(origin):
    host = "[%s]" % origin.host if ":" in origin.host else origin.host
    default = 443 if origin.scheme == "https" else 80
    port = "" if origin.port == default else ":%d" % origin.port
    return "%s://%s%s" % (origin.scheme, host, port)


def parse_address(text, what):
    """HOST:PORT or [IPV6]:PORT into a (host, port) pair."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]*):(\d{1,5})", text.strip())
    if not match:
        raise ConfigError("%s wants HOST:PORT or [IPV6]:PORT, not %r" % (what, text))
    host = match.group(1) or match.group(3) or "0.0.0.0"
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ConfigError("%s: port out of range in %r" % (what, text))
    return host, port


def server_tls_context(cert, key):
    """Load the certificate chain and key; a failure stops start-up, never a silent HTTP."""
    def no_passphrase():
        raise ConfigError("%s is encrypted; docxy needs an unencrypted key" % key)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError("cannot load certificate %s with key %s: %s"
                          % (cert, key, getattr(error, "strerror", None) or error))
    return context


# ---------------------------------------------------------------- registry names and validation

# The OCI distribution spec's grammar. Paths are matched raw, never unquoted: no
# legitimate name, tag or digest needs percent-encoding, so '%' is simply invalid.
NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME = re.compile(r"%s(?:/%s)*" % (NAME_COMPONENT, NAME_COMPONENT))
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")
MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
MAX_NAME = 255
ROUTE = re.compile(r"/v2/(?P<name>.+)/(?:(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]*)|tags/(?P<list>list))")
# Query parameters each route may carry upstream, with the grammar of their value.
QUERY_GRAMMAR = {
    "tags": {"n": re.compile(r"\d{1,5}"), "last": TAG},
    "referrers": {"artifactType": MEDIA_TYPE},
}


class RegistryError(Exception):
    """An answer docxy gives itself, as a registry-style JSON error."""

    def __init__(self, status, code, message, detail=None):
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail


def error_body(code, message, detail=None):
    return json.dumps({"errors": [{"code": code, "message": message,
                                   "detail": detail if detail is not None else {}}]}).encode()


def parse_registry_path(path, query, library_prefix):
    """Validate a /v2/<name>/... path; return (upstream path, kind, reference)."""
    match = ROUTE.fullmatch(path)
    if not match:
        raise RegistryError(404, "NOT_FOUND", "no such endpoint", path[:200])
    name, kind, ref = match.group("name"), match.group("kind") or "tags", match.group("ref")
    if len(name) > MAX_NAME or not NAME.fullmatch(name):
        raise RegistryError(400, "NAME_INVALID", "invalid repository name", name[:300])
    if kind == "manifests":
        if not (TAG.fullmatch(ref) or DIGEST.fullmatch(ref)):
            code = "DIGEST_INVALID" if ":" in ref else "TAG_INVALID"
            raise RegistryError(400, code, "invalid manifest reference", ref[:300])
    elif kind in ("blobs", "referrers") and not DIGEST.fullmatch(ref):
        raise RegistryError(400, "DIGEST_INVALID", "invalid digest", ref[:300])
    if library_prefix and "/" not in name:
        name = "library/" + name
    suffix = "tags/list" if kind == "tags" else "%s/%s" % (kind, ref)
    return "/v2/%s/%s%s" % (name, suffix, clean_query(query, QUERY_GRAMMAR.get(kind, {}))), kind, ref


def clean_query(query, grammar):
    """Keep only the parameters this route takes, each matching its grammar."""
    kept = [(key, value) for key, value in urllib.parse.parse_qsl(query)
            if key in grammar and grammar[key].fullmatch(value)]
    return "?" + urllib.parse.urlencode(kept) if kept else ""


def library_scope(scope, library_prefix):
    """repository:busybox:pull -> repository:library/busybox:pull, as Docker Hub expects."""
    parts = scope.split(":")
    if library_prefix and len(parts) == 3 and parts[0] == "repository" and "/" not in parts[1]:
        parts[1] = "library/" + parts[1]
    return ":".join(parts)


HOST_HEADER = re.compile(
    r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?")


def valid_host_header(value):
    """True for host[:port] and nothing else: the Host header ends up in auth realms."""
    match = HOST_HEADER.fullmatch(value or "")
    if not match or len(value) > 255 or (match.group("port") and int(match.group("port")) > 65535):
        return False
    if match.group("host").startswith("["):
        try:
            ipaddress.IPv6Address(match.group("host")[1:-1])
        except ValueError:
            return False
    return True


# ---------------------------------------------------------------- upstream client

CHUNK = 1 << 20             # 1 MiB reads: the copy loop's biggest lever (64 KiB reached ~0.45x nginx)
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
IDLE_PER_ORIGIN = 8
IDLE_TOTAL = 64
IDLE_SECONDS = 30.0         # shorter than common upstream keep-alive timeouts
# What a client may learn from upstream; everything else (cookies, CDN internals,
# Location, hop-by-hop headers) stays behind the mirror.
PASSED_HEADERS = frozenset((
    "content-type", "content-length", "content-range", "content-encoding", "accept-ranges",
    "docker-content-digest", "docker-distribution-api-version", "etag", "last-modified",
    "docker-ratelimit-source", "www-authenticate", "oci-filters-applied", "link", "retry-after",
))
# Registry headers that only the first hop carries when a blob redirects to a CDN.
REGISTRY_HEADERS = frozenset(("docker-content-digest", "docker-distribution-api-version",
                              "docker-ratelimit-source"))


class UpstreamError(Exception):
    """The upstream could not be reached or misbehaved: 502, or 504 for a timeout.
    The message is for the client; the detail, which may name hosts, for the log."""

    def __init__(self, status, message, detail=""):
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


def passes_header(name):
    name = name.lower()
    return name in PASSED_HEADERS or name.startswith("ratelimit-")


class ConnectionPool:
    """Idle upstream connections, reused so that a pull costs one TLS handshake, not dozens."""

    def __init__(self, timeout, tls_context):
        self.timeout, self.tls_context = timeout, tls_context
        self.idle = {}          # Origin -> [(connection, idle since)]
        self.lock = threading.Lock()

    def get(self, origin):
        """A connected connection to origin: a pooled one, or a new one. Says which."""
        with self.lock:
            stack = self.idle.get(origin, [])
            while stack:
                connection, since = stack.pop()
                if time.monotonic() - since < IDLE_SECONDS:
                    return connection, True
                connection.close()
        return self.connect(origin), False

    def connect(self, origin):
        if origin.scheme == "https":
            connection = http.client.HTTPSConnection(origin.host, origin.port, timeout=self.timeout,
                                                     context=self.tls_context)
        else:
            connection = http.client.HTTPConnection(origin.host, origin.port, timeout=self.timeout)
        try:
            connection.connect()
        except socket.timeout:
            raise UpstreamError(504, "upstream did not answer in time", "connect to %s" % origin.host)
        except ssl.SSLError as error:
            raise UpstreamError(502, "upstream TLS failed", "%s: %s" % (origin.host, error.reason))
        except OSError as error:
            raise UpstreamError(502, "upstream unreachable",
                                "%s: %s" % (origin.host, error.strerror or error))
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def put(self, origin, connection):
        with self.lock:
            stack = self.idle.setdefault(origin, [])
            if len(stack) < IDLE_PER_ORIGIN and sum(map(len, self.idle.values())) < IDLE_TOTAL:
                stack.append((connection, time.monotonic()))
                return
        connection.close()

    def release(self, origin, connection, response):
        """Pool the connection if the response was read to its end, else close it."""
        if response.length == 0 and not response.isclosed():
            response.read()     # HEAD and 304 answers end here; reading marks them done
        if response.isclosed() and not response.will_close:
            self.put(origin, connection)
        else:
            connection.close()


def send_once(pool, origin, method, target, headers, body):
    """One request/response exchange; a stale pooled connection is retried once on a new one."""
    while True:
        connection, reused = pool.get(origin)
        try:
            connection.request(method, target, body=body, headers=headers)
            return connection, connection.getresponse()
        except socket.timeout:
            connection.close()
            raise UpstreamError(504, "upstream did not answer in time", "%s %s" % (method, origin.host))
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            if not reused:
                raise UpstreamError(502, "upstream failed", "%s: %s" % (origin.host, error))


def fetch(pool, method, url, headers, body=None):
    """Send a request upstream and follow redirects the way a registry client must.

    Returns (origin, connection, response, first_hop_headers). Authorization and
    Cookie are only sent to the host they were meant for; the scheme never drops
    from https to http.
    """
    first_hop_headers = []
    headers = dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        origin = Origin(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        connection, response = send_once(pool, origin, method, target, headers, body)
        location = response.getheader("Location")
        if response.status not in REDIRECTS or not location:
            return origin, connection, response, first_hop_headers
        if not first_hop_headers:
            first_hop_headers = [(k, v) for k, v in response.getheaders() if k.lower() in REGISTRY_HEADERS]
        discard_body(pool, origin, connection, response)
        url = redirect_target(url, location)
        if urllib.parse.urlsplit(url)[:2] != parts[:2]:
            headers.pop("Authorization", None)   # S3-style CDNs reject it, and it is not theirs
            headers.pop("Cookie", None)
        body = None if response.status == 303 else body
        method = "GET" if response.status == 303 and method != "HEAD" else method
    raise UpstreamError(502, "upstream redirected too many times", "more than %d hops" % MAX_REDIRECTS)


def redirect_target(url, location):
    """Where a redirect leads, if docxy may follow it: http(s) only, never from https to http."""
    try:
        target = urllib.parse.urljoin(url, location)
        parts = urllib.parse.urlsplit(target)
        parts.port
    except ValueError:
        raise UpstreamError(502, "upstream sent a malformed redirect", "bad Location")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(502, "upstream redirected somewhere docxy will not go", "bad Location")
    if url.startswith("https:") and parts.scheme == "http":
        raise UpstreamError(502, "upstream redirected from https to http; refused", parts.hostname)
    return target


def discard_body(pool, origin, connection, response, limit=65536):
    """Read a small body (a redirect's) so the connection can be reused; close it if large."""
    try:
        if response.length is not None and response.length <= limit:
            response.read()
            pool.release(origin, connection, response)
            return
    except (OSError, http.client.HTTPException):
        pass
    connection.close()


def parse_challenge(value):
    """'Bearer realm="x",service="y"' -> ('Bearer', [('realm', 'x'), ('service', 'y')])."""
    scheme, _, rest = value.strip().partition(" ")
    params = re.findall(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?', rest)
    return scheme, [(key, quoted.replace('\\"', '"') if quoted else bare) for key, quoted, bare in params]


def format_challenge(scheme, params):
    return "%s %s" % (scheme, ",".join('%s="%s"' % (k, v.replace('"', '\\"')) for k, v in params))


# ---------------------------------------------------------------- shared state

class Mirror:
    """Everything the running server shares: its settings, what it learned, its connections."""

    def __init__(self, config):
        self.config = config
        self.upstream = config.upstream
        self.upstream_tls = ssl.create_default_context()   # system store; honours SSL_CERT_FILE
        self.pool = ConnectionPool(config.upstream_timeout, self.upstream_tls)
        self.realm = None                   # the upstream's token endpoint, learned from its challenge
        self.https_port = 443               # where --http-redirect sends clients
        self.slots = threading.BoundedSemaphore(config.max_connections)
        self.draining = threading.Event()
        self.connections = {}               # socket -> handler, to close idle ones when draining
        self.lock = threading.Lock()

    def learn_realm(self, challenge):
        """Remember the upstream's token realm; a realm may not be less secure than the upstream."""
        scheme, params = parse_challenge(challenge)
        realm = dict(params).get("realm", "")
        parts = urllib.parse.urlsplit(realm)
        if scheme.lower() == "bearer" and parts.scheme in ("http", "https") and parts.hostname and \
                not (self.upstream.scheme == "https" and parts.scheme == "http"):
            self.realm = realm

    def upstream_names(self):
        """The names containerd may pass as ?ns= for this upstream; with the library/ rule
        on, the upstream stands in for Docker Hub and answers to Docker Hub's names too."""
        names = {self.upstream.host, "%s:%d" % (self.upstream.host, self.upstream.port)}
        return names | set(DOCKER_HUB_HOSTS) if self.config.library_prefix else names


# ---------------------------------------------------------------- logging

LOG_LOCK = threading.Lock()
UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def log(message):
    line = "docxy: %s\n" % UNPRINTABLE.sub("?", message)
    with LOG_LOCK:
        sys.stderr.write(line)
        sys.stderr.flush()


# ---------------------------------------------------------------- request handler

class DeadlineReader(io.RawIOBase):
    """Socket reads that must all finish before a deadline: slow-header clients are cut off."""

    def __init__(self, sock, timeout):
        self.sock, self.timeout, self.deadline = sock, timeout, None

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("request not received in time")
            self.sock.settimeout(min(remaining, self.timeout))
        return self.sock.recv_into(buffer)


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    """One client connection: read requests, answer each from upstream or from docxy itself."""

    protocol_version = "HTTP/1.1"
    server_version = "docxy/" + __version__

    def version_string(self):
        return self.server_version

    def setup(self):
        self.mirror = self.server.mirror
        self.connection = self.request
        self.connection.settimeout(self.mirror.config.client_timeout)
        self.reader = DeadlineReader(self.connection, self.mirror.config.client_timeout)
        self.rfile = io.BufferedReader(self.reader, 65536)
        self.wfile = socketserver._SocketWriter(self.connection)
        self.idle = True
        with self.mirror.lock:
            self.mirror.connections[self.connection] = self

    def finish(self):
        with self.mirror.lock:
            self.mirror.connections.pop(self.connection, None)

    def handle_one_request(self):
        self.status, self.sent, self.upstream_status = None, 0, "-"
        self.reader.deadline = time.monotonic() + self.mirror.config.client_timeout
        self.idle = True
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except (socket.timeout, OSError):
            self.close_connection = True
            return
        self.idle = False
        if not self.raw_requestline:
            self.close_connection = True
            return
        self.started = time.monotonic()
        self.command, self.path, self.request_version = None, "-", "HTTP/1.0"
        try:
            if self.raw_requestline.startswith(b"\x16\x03") and not self.server.tls_context:
                # Docker, podman and skopeo try TLS first; an HTTP answer is what tells them
                # to fall back to http:// ("server gave HTTP response to HTTPS client").
                self.command, self.path = "-", "(TLS handshake on the plain-HTTP port)"
                self.send_error(400, "this port speaks plain HTTP, not TLS")
                return
            if len(self.raw_requestline) > 65536:
                self.send_error(414)
                return
            if not self.parse_request():
                return
            self.reader.deadline = None
            self.connection.settimeout(self.mirror.config.client_timeout)
            if self.mirror.draining.is_set():
                self.close_connection = True
            self.route()
        except socket.timeout:
            self.close_connection = True
        finally:
            if self.status is not None:
                self.log_access()

    # -- routing

    def route(self):
        path, _, query = self.path.partition("?")
        try:
            if self.command not in ("GET", "HEAD"):
                if self.command == "POST" and path == "/auth/token":
                    return self.proxy_token(query)
                self.close_connection = True    # a body we will not read may follow
                raise RegistryError(405, "UNSUPPORTED", "this mirror is read-only", self.command)
            if path == "/health":
                return self.send_json(200, {"status": "ok"})
            if path in ("/v2", "/v2/"):
                return self.proxy_base()
            if path == "/auth/token":
                return self.proxy_token(query)
            if path.startswith("/v2/"):
                return self.proxy_registry(path, query)
            raise RegistryError(404, "NOT_FOUND", "no such endpoint", path[:200])
        except RegistryError as error:
            self.send_registry_error(error.status, error.code, error.message, error.detail)
        except UpstreamError as error:
            log("upstream error: %s (%s)" % (error.message, error.detail))
            # The detail can name the CDN a redirect led to: it is for the operator's log only.
            self.send_registry_error(error.status, "UNAVAILABLE", error.message)

    # -- the routes

    def proxy_base(self):
        """GET /v2/: the version check, whose challenge tells clients where to get tokens."""
        self.relay(self.command, origin_url(self.mirror.upstream) + "/v2/", self.forward_headers())

    def proxy_registry(self, path, query):
        ns = dict(urllib.parse.parse_qsl(query)).get("ns")
        if ns is not None and ns not in self.mirror.upstream_names():
            raise RegistryError(404, "NAME_UNKNOWN", "this mirror does not serve that registry", ns[:200])
        upstream_path, kind, ref = parse_registry_path(path, query, self.mirror.config.library_prefix)
        verify = ref if kind in ("blobs", "manifests") and DIGEST.fullmatch(ref or "") else None
        self.relay(self.command, origin_url(self.mirror.upstream) + upstream_path,
                   self.forward_headers(), verify=verify)

    def proxy_token(self, query):
        """/auth/token: forward the token request to the realm the upstream named."""
        realm = self.mirror.realm or self.discover_realm()
        library = self.mirror.config.library_prefix
        params = [(key, library_scope(value, library) if key == "scope" else value)
                  for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True)]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(params) if params else realm
        headers = {key: value for key, value in self.forward_headers().items()
                   if key in ("Authorization", "User-Agent", "Accept")}
        body = None
        if self.command == "POST":
            body = self.read_form_body()
            form = [(key, library_scope(value, library) if key == "scope" else value)
                    for key, value in urllib.parse.parse_qsl(body.decode("latin-1"), keep_blank_values=True)]
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        self.relay(self.command, url, headers, body=body, rewrite_challenge=False)

    def discover_realm(self):
        """Ask the upstream's /v2/ for its challenge: a client may come for a token first."""
        origin, connection, response, _ = fetch(self.mirror.pool, "GET", origin_url(self.mirror.upstream) + "/v2/",
                                                {"User-Agent": self.server_version})
        challenge = response.getheader("WWW-Authenticate", "")
        discard_body(self.mirror.pool, origin, connection, response)
        self.mirror.learn_realm(challenge)
        if not self.mirror.realm:
            raise RegistryError(404, "NOT_FOUND", "the upstream does not use token authentication")
        return self.mirror.realm

    def read_form_body(self, limit=65536):
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > limit:
            self.close_connection = True
            raise RegistryError(400, "UNSUPPORTED", "token request body missing or too large")
        return self.rfile.read(int(length))

    # -- relaying an upstream response

    def forward_headers(self):
        """The client's headers that the upstream needs, and nothing else."""
        headers = {"User-Agent": "%s docxy/%s" % (self.headers.get("User-Agent", "-"), __version__)}
        for name in ("Authorization", "Range", "If-None-Match", "If-Range"):
            if self.headers.get(name):
                headers[name] = self.headers[name]
        accept = self.headers.get_all("Accept")
        if accept:
            headers["Accept"] = ", ".join(accept)
        return headers

    def relay(self, method, url, headers, body=None, verify=None, rewrite_challenge=True):
        """Fetch url upstream and stream the answer to the client."""
        origin, connection, response, first_hop = fetch(self.mirror.pool, method, url, headers, body)
        self.upstream_status = str(response.status)
        try:
            if response.status in REDIRECTS:
                raise UpstreamError(502, "upstream redirect without a usable Location")
            headers_out = self.response_headers(response, first_hop, origin, rewrite_challenge)
            has_body = method != "HEAD" and response.status not in (204, 304) and response.status >= 200
            if has_body and verify and (response.status != 200 or "Range" in headers):
                verify = None   # a partial body cannot be checked against the whole's digest
            chunked = has_body and response.length is None and response.getheader("Content-Length") is None
            if chunked:
                if self.request_version == "HTTP/1.1":
                    headers_out.append(("Transfer-Encoding", "chunked"))
                else:
                    self.close_connection = True
            self.send_response(response.status)
            for name, value in headers_out:
                self.send_header(name, value)
            self.end_headers()
            if has_body:
                self.stream_body(response, verify, chunked and self.request_version == "HTTP/1.1")
        finally:
            self.mirror.pool.release(origin, connection, response)

    def response_headers(self, response, first_hop, origin, rewrite_challenge):
        headers = [(k, v) for k, v in response.getheaders() if passes_header(k)]
        present = {k.lower() for k, _ in headers}
        headers += [(k, v) for k, v in first_hop if k.lower() not in present]
        result = []
        for name, value in headers:
            lower = name.lower()
            if lower == "www-authenticate":
                if not rewrite_challenge:
                    result.append((name, value))
                    continue
                if origin != self.mirror.upstream:
                    continue
                value = self.rewrite_challenge(value)
            elif lower == "link" and not value.startswith("</v2/"):
                continue
            result.append((name, value))
        return result

    def rewrite_challenge(self, value):
        """Point a Bearer challenge's realm at this mirror, keeping every other parameter."""
        scheme, params = parse_challenge(value)
        if scheme.lower() != "bearer":
            return value
        self.mirror.learn_realm(value)
        realm = self.public_base() + "/auth/token"
        return format_challenge(scheme, [(k, realm if k == "realm" else v) for k, v in params])

    def public_base(self):
        if self.mirror.config.public_url:
            return self.mirror.config.public_url
        host = self.headers.get("Host", "")
        if not valid_host_header(host):
            raise RegistryError(400, "UNSUPPORTED", "missing or invalid Host header; "
                                "set --public-url to serve clients that send none")
        return ("https://" if self.server.tls_context else "http://") + host

    def stream_body(self, response, verify, chunked):
        """Copy the body in fixed-size chunks through one buffer allocated for this transfer.

        When a digest is to be verified, the last byte is held back until the whole
        body hashed right: a mismatch, like a broken upstream, ends the connection
        before the body is complete, so the client can never take it for a good one.
        """
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        hasher = hashlib.new(verify.split(":")[0]) if verify else None
        held = 0
        write = self.write_chunk if chunked else self.wfile.write
        try:
            while True:
                n = response.readinto(view[held:])
                if not n:
                    break
                if hasher:
                    n += held
                    hasher.update(view[held:n])
                    write(view[:n - 1])
                    buffer[0] = buffer[n - 1]
                    held = 1
                else:
                    write(view[:n])
                self.sent += n - held
            if response.length:      # http.client counts down what Content-Length still promises
                raise UpstreamError(502, "upstream body ended early", "%d bytes missing" % response.length)
            if hasher and hasher.hexdigest() != verify.split(":")[1]:
                raise UpstreamError(502, "upstream body does not match its digest", verify)
            if held:
                write(view[:1])
                self.sent += 1
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (UpstreamError, OSError, http.client.HTTPException) as error:
            self.abort_transfer(error)

    def write_chunk(self, data):
        if len(data):
            self.wfile.write(b"%x\r\n" % len(data))
            self.wfile.write(data)
            self.wfile.write(b"\r\n")

    def abort_transfer(self, error):
        """End the connection mid-body: the client sees an error and retries."""
        self.close_connection = True
        self.upstream_status += "!"
        if isinstance(error, UpstreamError):
            log("transfer aborted: %s (%s)" % (error.message, error.detail))
        elif not isinstance(error, (BrokenPipeError, ConnectionResetError)):
            log("transfer aborted: %s" % (error,))
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- docxy's own answers

    def send_json(self, status, document, extra_headers=()):
        body = json.dumps(document).encode() if not isinstance(document, bytes) else document
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        for name, value in extra_headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.sent += len(body)

    def send_registry_error(self, status, code, message, detail=None):
        extra = [("Allow", "GET, HEAD")] if status == 405 else []
        self.send_json(status, error_body(code, message, detail), extra)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, huge headers) in registry JSON too."""
        self.close_connection = True
        codes = {404: "NOT_FOUND", 405: "UNSUPPORTED", 501: "UNSUPPORTED"}
        phrase = message or self.responses.get(code, ("error",))[0]
        self.send_registry_error(code, codes.get(code, "BAD_REQUEST"), phrase)

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def log_request(self, code="-", size="-"):
        pass    # one line per request is written by log_access, once the body is sent

    def log_access(self):
        path = self.path.partition("?")[0] if self.path.startswith("/auth/") else self.path
        log('%s "%s %s" %s %dB %.3fs upstream=%s' % (
            self.client_address[0], self.command or "-", path[:300], self.status, self.sent,
            time.monotonic() - self.started, self.upstream_status))


class RedirectHandler(http.server.BaseHTTPRequestHandler):
    """The plain-HTTP listener next to HTTPS: every request is sent to the https:// URL."""

    protocol_version = "HTTP/1.1"
    server_version = MirrorHandler.server_version
    version_string = MirrorHandler.version_string
    timeout = 30

    def do_GET(self):
        mirror = self.server.mirror
        if mirror.config.public_url:
            base = mirror.config.public_url
        else:
            host = self.headers.get("Host", "")
            if not valid_host_header(host):
                return self.send_error(400, "missing or invalid Host header")
            host = re.sub(r":\d+\Z", "", host)
            port = mirror.https_port
            base = "https://" + host + ("" if port == 443 else ":%d" % port)
        path = self.path if self.path.startswith("/") else "/"
        self.send_response(301)
        self.send_header("Location", base + path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_request(self, code="-", size="-"):
        log('%s "%s %s" %s redirect' % (self.client_address[0], self.command, self.path[:300], code))


# ---------------------------------------------------------------- server and main

class Listener(http.server.ThreadingHTTPServer):
    """One listening socket. Accepting never blocks on a client: TLS handshakes and
    everything else happen in the connection's own thread, and at most
    --max-connections threads exist at once (the rest wait in the backlog)."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024   # the default 5 left most of a 500-connection burst unanswered

    def __init__(self, address, handler, mirror, tls_context=None, v6only=False):
        self.mirror, self.tls_context, self.v6only = mirror, tls_context, v6only
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(self.v6only))
        socketserver.TCPServer.server_bind(self)   # HTTPServer's would do a slow reverse DNS lookup
        self.server_name, self.server_port = self.server_address[:2]

    def url(self):
        host = self.server_address[0]
        return "%s://%s:%d" % ("https" if self.tls_context else "http",
                               "[%s]" % host if ":" in host else host, self.server_address[1])

    def get_request(self):
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # else small answers stall 40 ms
        return sock, address

    def process_request(self, request, client_address):
        while not self.mirror.slots.acquire(timeout=0.5):
            if self.mirror.draining.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.mirror.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            if self.tls_context:
                request = self.tls_handshake(request, client_address)
            if request is not None:
                self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            if request is not None:
                self.shutdown_request(request)
            self.mirror.slots.release()

    def tls_handshake(self, sock, address):
        sock.settimeout(self.mirror.config.client_timeout)
        try:
            return self.tls_context.wrap_socket(sock, server_side=True)
        except (OSError, ValueError) as error:
            log("%s TLS handshake failed: %s" % (address[0], getattr(error, "reason", None) or error))
            sock.close()
            return None

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, socket.timeout, ssl.SSLError)):
            return      # the client went away; nothing to report
        log("internal error serving %s" % (client_address[0],))
        import traceback
        traceback.print_exc(file=sys.stderr)


def open_listeners(mirror):
    config = mirror.config
    ipv4_ports = {port for host, port in config.listen if ":" not in host}
    listeners = [Listener((host, port), MirrorHandler, mirror, config.tls, v6only=port in ipv4_ports)
                 for host, port in config.listen]
    if config.http_redirect:
        mirror.https_port = listeners[0].server_address[1]
        listeners.append(Listener(config.http_redirect, RedirectHandler, mirror))
    return listeners


def client_snippet(mirror, listeners):
    """The lines an operator pastes into Docker's and containerd's configuration."""
    if mirror.config.public_url:
        url = mirror.config.public_url
    else:
        first = listeners[0]
        host = first.server_address[0]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        url = "%s://%s:%d" % ("https" if first.tls_context else "http",
                              "[%s]" % host if ":" in host else host, first.server_address[1])
    upstream = origin_url(mirror.upstream)
    registry = "docker.io" if mirror.upstream.host in DOCKER_HUB_HOSTS else urllib.parse.urlsplit(upstream).netloc
    docker = {"registry-mirrors": [url]}
    if url.startswith("http://"):
        docker["insecure-registries"] = [urllib.parse.urlsplit(url).netloc]
    lines = ["Docker, /etc/docker/daemon.json:", "  " + json.dumps(docker),
             "containerd, /etc/containerd/certs.d/%s/hosts.toml:" % registry,
             '  server = "%s"' % upstream, '  [host."%s"]' % url,
             '    capabilities = ["pull", "resolve"]']
    if registry != "docker.io":
        lines.insert(0, "(Docker uses registry-mirrors for Docker Hub only; pull as %s/<image>)"
                     % urllib.parse.urlsplit(url).netloc)
    return lines


def drain(mirror, listeners):
    """Stop accepting, close idle keep-alive connections, let transfers finish."""
    mirror.draining.set()
    stoppers = [threading.Thread(target=listener.shutdown) for listener in listeners]
    for stopper in stoppers:
        stopper.start()
    for stopper, listener in zip(stoppers, listeners):
        stopper.join()
        listener.server_close()
    deadline = time.monotonic() + mirror.config.drain_seconds
    while time.monotonic() < deadline:
        with mirror.lock:
            handlers = list(mirror.connections.values())
        if not handlers:
            return True
        for handler in handlers:
            if handler.idle:
                try:
                    socket.socket.shutdown(handler.connection, socket.SHUT_RDWR)
                except OSError:
                    pass
        time.sleep(0.05)
    return False


def main(argv=None):
    try:
        config = read_config(sys.argv[1:] if argv is None else argv, os.environ)
        mirror = Mirror(config)
        listeners = open_listeners(mirror)
    except ConfigError as error:
        print("docxy: error: %s" % error, file=sys.stderr)
        return 2
    except OSError as error:
        print("docxy: error: cannot listen: %s" % (error.strerror or error), file=sys.stderr)
        return 2

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if hasattr(signal, "SIGHUP"):   # systemd's ExecReload must not kill the service
        signal.signal(signal.SIGHUP, lambda *_: log("SIGHUP: nothing to reload"))

    log("docxy %s mirroring %s" % (__version__, origin_url(config.upstream)))
    for listener in listeners:
        threading.Thread(target=listener.serve_forever, name="accept", daemon=True).start()
        if listener.RequestHandlerClass is RedirectHandler:
            log("redirecting %s to https" % listener.url())
        else:
            log("listening on %s" % listener.url())
    for line in client_snippet(mirror, listeners):
        log(line)

    while not stop.wait(1.0):
        pass
    log("stopping: draining transfers for up to %gs" % config.drain_seconds)
    clean = drain(mirror, listeners)
    log("stopped" if clean else "stopped with transfers still running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
