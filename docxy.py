#!/usr/bin/env python3
"""docxy: a container registry mirror in one file, with no dependencies.

Copy this file onto a server that can reach the registries, run it, and point
Docker, containerd, podman or Kubernetes nodes at it. It speaks the registry
protocol (pull side) to clients and forwards each pull to the registry it is
for: Docker Hub and the other public registries, or any Registry-v2 server of
your own. Token challenges are re-pointed at the mirror, blob redirects to a
CDN are followed by the mirror itself, and every body is streamed in
fixed-size chunks and checked against the digest the client asked for. With
--cache-dir it keeps what it fetched, so the second pull costs the upstream
nothing and a pull still works while the upstream is down.

    python3 docxy.py                                   # Docker Hub mirror on http://0.0.0.0:5000
    python3 docxy.py --cert fullchain.pem --key privkey.pem --cache-dir /var/lib/docxy
    python3 docxy.py --config /etc/docxy/docxy.ini     # registries, credentials, access rules
    python3 docxy.py --help                            # every flag (each also DOCXY_<FLAG>)
    python3 docxy.py hash-password                     # a line for --users
    python3 docxy.py prefetch busybox:latest --cache-dir DIR   # warm the cache

Then, on each Docker host, /etc/docker/daemon.json:

    {"registry-mirrors": ["https://mirror.example.com"]}

Python 3.8+, standard library only. The file is in sections opened by a banner, each
building on those above it: configuration; the registry protocol; network policy;
upstream; body transfer; cache; shared state; logging; request handling; the server;
commands and main. Importing it changes nothing: main() does what a process needs.
"""


import argparse
import base64
import collections
import configparser
import email.utils
import errno
import fcntl
import functools
import hashlib
import hmac
import html
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import logging
import mmap
import os
import queue
import re
import select
import selectors
import signal
import socket
import socketserver
import shutil
import ssl
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import namedtuple


# ================================================================================================
# Configuration
#
# Settings from the command line, DOCXY_* variables and an INI file, in that order of
# precedence, checked together (every problem reported at once) into one Config: the
# registries (presets and custom ones), their upstream credentials, and the access rules.
# ================================================================================================

__version__ = "0.1.0"
DOCKER_HUB = "https://registry-1.docker.io"
DOCKER_HUB_HOSTS = ("registry-1.docker.io", "index.docker.io", "docker.io")
# The public registries people mirror: name -> (upstream, aliases, library/ rule, short name).
# The short name routes <short>.<public host>, e.g. ghcr.mirror.example.com -> ghcr.io.
PRESETS = {
    "docker.io": (DOCKER_HUB, ("index.docker.io", "registry-1.docker.io"), True, "docker"),
    "ghcr.io": ("https://ghcr.io", (), False, "ghcr"),
    "quay.io": ("https://quay.io", (), False, "quay"),
    "gcr.io": ("https://gcr.io", (), False, "gcr"),
    "registry.k8s.io": ("https://registry.k8s.io", (), False, "k8s"),
    "mcr.microsoft.com": ("https://mcr.microsoft.com", (), False, "mcr"),
    "public.ecr.aws": ("https://public.ecr.aws", (), False, "ecr"),
    "nvcr.io": ("https://nvcr.io", (), False, "nvcr"),
}
DEFAULT_REGISTRY = "docker.io"
DEFAULTS = {
    "upstream_timeout": 10.0,
    "client_timeout": 30.0,
    "max_connections": 512,
    "drain_seconds": 30.0,
    "drain_delay": 0.0,
    "library_prefix": "auto",
    "tag_ttl": 300.0,
    "log_format": "text",
    "cert_check_interval": 60.0,
    "workers": 1,
}
REPEATABLE = ("listen", "allow", "trusted_proxy", "metrics_allow")
SWITCHES = ("ipv4_only", "i_understand_credentials_are_shared", "check")
REGISTRY_KEYS = ("upstream", "hosts", "library", "username", "password_file", "password_env")
# Matched against path prefixes too: linear, as a separator is never alphanumeric.
REGISTRY_NAME = re.compile(r"[a-z0-9]+(?:[.-][a-z0-9]+)*(?::\d{1,5})?")
PBKDF2_ITERATIONS = 300000
# Runs that a "$" separates and none contains: linear.
PASSWORD_HASH = re.compile(r"pbkdf2_sha256\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+")
LOGIN_HASHERS, LOGIN_QUEUE = 2, 8       # logins hashed at once, and waiting to be
LOGIN_FAILURES = (10, 10 / 60)          # failed logins per client network: burst, then per second
MAX_WORKERS = 256                       # --workers: past that, surely a typo
# The original docxy's variable names, kept so existing deployments carry over.
ENV_ALIASES = {"DOCXY_CERT_PATH": "cert", "DOCXY_KEY_PATH": "key"}
Origin = namedtuple("Origin", "scheme host port")
# names: what ?ns= and a path prefix may call it; hosts: Host headers that route to it.
Registry = namedtuple("Registry", "name upstream names hosts library username secret short")


class ConfigError(Exception):
    """Configuration problems, one a line, reported with exit status 2. log_format is the one
    the settings asked for, when reading them got that far."""

    def __init__(self, message, log_format=None):
        super().__init__(message)
        self.log_format = log_format


class Problems(list):
    """Configuration problems as they are found, so that one run reports them all. Used by
    one thread, at start-up or on a reload."""

    def check(self, step, *arguments):
        """step(*arguments), or None with its ConfigError noted."""
        try:
            return step(*arguments)
        except ConfigError as error:
            self.append(str(error))

    def raise_any(self, log_format=None):
        if self:
            raise ConfigError("\n".join(self), log_format)


class SettingsParser(argparse.ArgumentParser):
    """Raises ConfigError where argparse would print its usage and exit: a mistake is reported
    with its source, together with the others, in the log format asked for."""

    def error(self, message):
        raise ConfigError(re.sub(r"^argument ([^:]+): ", r"\1: ", message))


class Secret(str):
    """A password or token: its repr is masked, so no log line or error can show it."""

    def __repr__(self):
        return "Secret('***')"


def build_parser(**options):
    """Every flag with its --help text. Long on purpose: it is a table, one entry a flag, in
    the order --help shows them; split, --help would be read from several places."""
    parser = SettingsParser(
        prog="docxy", **options,
        usage="%(prog)s [flags]\n       %(prog)s hash-password\n"
        "       %(prog)s prefetch IMAGE[:TAG|@DIGEST] [--platform OS/ARCH] --cache-dir DIR [flags]",
        description="A Docker registry mirror in one file. Subcommands: 'docxy.py hash-password' "
        "prints a password hash for --users; 'docxy.py prefetch IMAGE --cache-dir DIR' pulls an "
        "image into the cache (each takes --help).",
        epilog="Every flag can also be given as an environment variable DOCXY_<FLAG> "
        "(e.g. DOCXY_UPSTREAM, DOCXY_LISTEN=0.0.0.0:5000,[::]:5000) or in the [docxy] section of "
        "--config; flags win over the environment, the environment over the file. "
        "DOCXY_CERT_PATH and DOCXY_KEY_PATH are accepted too. SSL_CERT_FILE selects the trust "
        "store for upstream TLS; HTTPS_PROXY, HTTP_PROXY and NO_PROXY are honoured upstream.",
    )
    add = parser.add_argument
    add("--config", metavar="PATH", help="INI file: a [docxy] section and one section per registry")
    add("--check", action="store_true", default=None, help="validate the configuration and exit")
    add("--listen", action="append", metavar="HOST:PORT",
        help="address to serve on, repeatable (default 0.0.0.0:5000, or 0.0.0.0:443 with --cert)")
    add("--registries", metavar="NAME,...",
        help="registries to serve (default: every preset and every registry of --config): "
        + ", ".join(PRESETS))
    add("--upstream", metavar="URL", help="upstream of the default registry, docker.io (default %s)"
        % DOCKER_HUB)
    add("--library-prefix", choices=("auto", "on", "off"),
        help="add library/ to one-component names of docker.io "
             "(default auto: if its upstream is Docker Hub)")
    add("--cert", metavar="PATH", help="PEM certificate chain: serve HTTPS")
    add("--key", metavar="PATH", help="PEM private key (RSA, ECDSA or PKCS#8)")
    add("--public-url", metavar="URL",
        help="externally visible base URL, used in auth challenges (default: from the Host header)")
    add("--http-redirect", metavar="HOST:PORT",
        help="also listen here on plain HTTP and redirect every request to HTTPS")
    add("--allow", action="append", metavar="CIDR",
        help="only these client networks may use the mirror, repeatable (default: everyone)")
    add("--users", metavar="FILE",
        help="name:hash lines; every pull then needs one of these logins")
    add("--trusted-proxy", action="append", metavar="CIDR",
        help="reverse proxies whose X-Forwarded-For/-Proto/-Host are believed, repeatable")
    add("--rate-limit", metavar="N/min",
        help="manifest requests per client address (IPv6: per /64)")
    add("--i-understand-credentials-are-shared", action="store_true", default=None,
        help="run with upstream credentials although anyone who reaches the mirror may use them")
    add("--cache-dir", metavar="DIR",
        help="keep pulled blobs and manifests here (default: no cache)")
    add("--cache-max-size", metavar="SIZE",
        help="cap on the cache, e.g. 20G (default: 80%% of the free space and the cache's "
             "own size at start-up)")
    add("--tag-ttl", type=float, metavar="SECONDS",
        help="how long a cached tag is trusted before an upstream HEAD checks it (default 300)")
    add("--metrics-allow", action="append", metavar="CIDR",
        help="who may read /metrics, repeatable (default: loopback only)")
    add("--log-format", choices=("text", "json"),
        help="every line docxy writes as text (default) or as JSON objects")
    add("--acme-webroot", metavar="DIR",
        help="serve /.well-known/acme-challenge/ from DIR on the --http-redirect listener")
    add("--cert-check-interval", type=float, metavar="SECONDS",
        help="how often to look for a renewed certificate on disk (default 60)")
    add("--upstream-timeout", type=float, metavar="SECONDS",
        help="connect and read timeout towards upstreams (default 10)")
    add("--ipv4-only", action="store_true", default=None, help="reach upstreams over IPv4 only")
    add("--client-timeout", type=float, metavar="SECONDS",
        help="time a client has to send a complete request, and idle keep-alive time (default 30)")
    add("--max-connections", type=int, metavar="N",
        help="client connections served at once; more wait in the backlog (default 512)")
    add("--drain-delay", type=float, metavar="SECONDS",
        help="on SIGTERM, time /health answers 503 while docxy still accepts and serves, for "
             "load balancers to take this node out (default 0)")
    add("--drain-seconds", type=float, metavar="SECONDS",
        help="on SIGTERM, after --drain-delay, time given to transfers in flight (default 30)")
    add("--workers", metavar="N|auto",
        help="processes serving the listeners together, each with its threads; the rate limit, "
             "--max-connections and /metrics count for all of them (default 1; auto: one per "
             "CPU this process may run on)")
    add("--version", action="version", version="docxy " + __version__)
    return parser


def setting_arguments(name, value):
    """A setting from the environment or a file as the flags it stands for, so that one parser
    checks all three sources."""
    flag, value = "--" + name.replace("_", "-"), value.strip()
    if not value:
        return []
    if name in REPEATABLE:
        return [part for item in re.split(r"[\s,]+", value) for part in (flag, item)]
    return [flag, value]


# Kubernetes gives each container variables for every Service of its namespace, named after the
# Service: for one named docxy, DOCXY_PORT=tcp://10.0.0.1:5000, DOCXY_SERVICE_HOST,
# DOCXY_SERVICE_PORT(_<port name>), DOCXY_PORT_5000_TCP(_PROTO|_ADDR|_PORT); for docxy-web,
# DOCXY_WEB_... No docxy setting has such a name. (Operators' names, not clients': the one
# ambiguous run, before the suffix, costs nothing.)
KUBERNETES_SERVICE_VARIABLE = re.compile(
    r"DOCXY_(?:[A-Z0-9_]+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
    r"|PORT_\d+_(?:TCP|UDP|SCTP)(?:_PROTO|_ADDR|_PORT)?)")
KUBERNETES_SERVICE_PORT = re.compile(r"DOCXY_(?:[A-Z0-9_]+_)?PORT")
KUBERNETES_SERVICE_URL = re.compile(r"(?:tcp|udp|sctp)://\S+")


def kubernetes_variable(name, value):
    """True for a variable Kubernetes sets for a Service: DOCXY_PORT only with its URL value,
    so that a DOCXY_PORT=5000 of the operator's own is still reported."""
    if KUBERNETES_SERVICE_VARIABLE.fullmatch(name):
        return True
    return bool(KUBERNETES_SERVICE_PORT.fullmatch(name)
                and KUBERNETES_SERVICE_URL.fullmatch(value.strip()))


def environment_settings(environ):
    """DOCXY_* variables as (variable, setting, value); and the names of those that Kubernetes
    set for a Service, which are no settings."""
    settings, kubernetes = [], []
    for variable, value in sorted(environ.items()):
        if not variable.startswith("DOCXY_"):
            continue
        if kubernetes_variable(variable, value):
            kubernetes.append(variable)
        else:
            name = ENV_ALIASES.get(variable, variable[len("DOCXY_"):].lower())
            settings.append((variable, name, value))
    return settings, kubernetes


def apply_settings(parser, config, settings, problems):
    """Settings from one source (the environment, or the file's [docxy] section), each as
    (where, name, value), fill what the sources above left unset. config.sources records where
    each value came from, for the messages about it; a problem names the setting as written."""
    known, layer, where_set = set(vars(parser.parse_args([]))), argparse.Namespace(), {}
    for where, name, value in settings:
        name = name.lower().replace("-", "_")
        if name not in known:
            problems.append("%s is not a docxy setting (docxy.py --help lists them)" % where)
            continue
        try:
            if name in SWITCHES and value.strip():
                # "off" is a value too: a source below must not turn the switch on again.
                setattr(layer, name, parse_switch(value, "this switch"))
            else:
                parser.parse_args(setting_arguments(name, value), namespace=layer)
        except ConfigError as error:
            reason = re.sub(r"^(--[\w-]+|this switch):? ", "", str(error))
            problems.append("%s: %s" % (where, reason))
            continue
        where_set[name] = where
    for name, value in vars(layer).items():
        if value is not None and getattr(config, name) is None:
            setattr(config, name, value)
            config.sources[name] = where_set[name]


def source(config, name):
    """Where a setting came from, as the operator wrote it: --flag, DOCXY_VARIABLE, or
    file:[docxy] key."""
    return config.sources.get(name) or "--" + name.replace("_", "-")


def read_config(argv, environ):
    """Flags, then DOCXY_* variables, then the --config file, checked. A ConfigError has every
    problem found, one a line, each naming where the setting came from."""
    parser = build_parser(allow_abbrev=False)
    try:
        config = build_parser().parse_args(argv)
    except ConfigError as error:
        raise ConfigError(str(error), command_line_log_format(argv, environ))
    config.sources = {}
    problems = Problems()
    settings, config.kubernetes_variables = environment_settings(environ)
    apply_settings(parser, config, settings, problems)
    sections = {}
    if config.config:
        try:
            ini = read_ini(config.config, source(config, "config"))
        except ConfigError as error:
            problems.append(str(error))
        else:
            where = "%s:[%%s] %%s" % config.config
            own = ini.items("docxy") if ini.has_section("docxy") else []
            own = [(where % ("docxy", key), key, value) for key, value in own]
            apply_settings(parser, config, own, problems)
            sections = {name: {key: (where % (name, key), value) for key, value in ini.items(name)}
                        for name in ini.sections() if name != "docxy"}
    for name, value in DEFAULTS.items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    for name in SWITCHES:       # on, or off whether it was said so or not
        setattr(config, name, bool(getattr(config, name)))
    config = problems.check(check_config, config, sections, environ) or config
    problems.raise_any(config.log_format)
    return config


def command_line_log_format(argv, environ):
    """--log-format of a command line that does not parse as a whole, else DOCXY_LOG_FORMAT's."""
    parser = SettingsParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--log-format")
    try:
        wanted = parser.parse_known_args(argv)[0].log_format
    except ConfigError:
        wanted = None
    wanted = wanted or environ.get("DOCXY_LOG_FORMAT", "").strip()
    return wanted if wanted in ("text", "json") else "text"


def read_ini(path, what="--config"):
    ini = configparser.ConfigParser(interpolation=None, default_section="\0none",
                                    inline_comment_prefixes=(";", "#"))
    try:
        with open(path, encoding="utf-8") as handle:
            ini.read_file(handle)
    except OSError as error:
        raise ConfigError("%s: cannot read %s: %s" % (what, path, error.strerror or error))
    except configparser.Error as error:
        raise ConfigError("%s: %s" % (path, str(error).splitlines()[0]))
    return ini


def check_config(config, sections, environ):
    """Validate and normalise the settings. Every problem is reported, one line each, naming the
    setting as the operator gave it."""
    problems = Problems()
    check_listeners(config, problems)
    check_limits(config, problems)
    for name, default in (("allow", []), ("trusted_proxy", []),
                          ("metrics_allow", ["127.0.0.0/8", "::1/128"])):
        setattr(config, name, [problems.check(parse_network, text, source(config, name))
                               for text in getattr(config, name) or default])
    if config.acme_webroot and not os.path.isdir(config.acme_webroot):
        problems.append("%s %s is not a directory"
                        % (source(config, "acme_webroot"), config.acme_webroot))
    elif config.acme_webroot and not config.http_redirect:
        problems.append("%s is served by the --http-redirect listener: set that too"
                        % source(config, "acme_webroot"))
    config.users = problems.check(read_users, config.users, source(config, "users")) \
        if config.users else None
    registries = problems.check(build_registries, config, sections, environ)
    if registries:
        config.registries, config.default_registry = registries
        shared = [r.name for r in config.registries.values() if r.username]
        guarded = config.allow or config.users or config.i_understand_credentials_are_shared
        if shared and not guarded:
            problems.append(
                "upstream credentials for %s would serve anyone who reaches this mirror: add "
                "--allow or --users, or pass --i-understand-credentials-are-shared"
                % ", ".join(shared))
    problems.raise_any()
    return config


def check_listeners(config, problems):
    """--public-url, --listen, --cert/--key and --http-redirect."""
    check = problems.check
    if config.public_url:
        config.public_url = check(
            lambda: origin_url(parse_origin(config.public_url, source(config, "public_url"))))
    default_listen = "0.0.0.0:443" if config.cert else "0.0.0.0:5000"
    config.listen = [check(parse_address, a, source(config, "listen"))
                     for a in (config.listen or [default_listen])]
    config.tls = check(check_certificate, config)
    if config.http_redirect:
        where = source(config, "http_redirect")
        if not config.cert:
            problems.append("%s needs --cert and --key (it redirects to HTTPS)" % where)
        config.http_redirect = check(parse_address, config.http_redirect, where)


def check_limits(config, problems):
    """The timeouts and limits: numbers in range, rates and sizes parsed."""
    for name in ("upstream_timeout", "client_timeout", "drain_seconds", "cert_check_interval"):
        if not getattr(config, name) > 0:
            problems.append("%s must be positive" % source(config, name))
    if not 0 <= config.drain_delay <= 86400:    # a day: past that, surely a typo
        problems.append("%s must be from 0 to 86400 seconds" % source(config, "drain_delay"))
    if config.max_connections < 1:
        problems.append("%s must be at least 1" % source(config, "max_connections"))
    config.workers = problems.check(parse_workers, config.workers, source(config, "workers"))
    if config.tag_ttl < 0:
        problems.append("%s must not be negative" % source(config, "tag_ttl"))
    if config.rate_limit:
        config.rate_limit = problems.check(parse_rate, config.rate_limit,
                                           source(config, "rate_limit"))
    if config.cache_max_size:
        config.cache_max_size = problems.check(parse_size, config.cache_max_size,
                                               source(config, "cache_max_size"))
        if config.cache_max_size == 0:
            problems.append("%s must be positive" % source(config, "cache_max_size"))


def check_certificate(config):
    if bool(config.cert) != bool(config.key):
        raise ConfigError("%s and %s go together" % (source(config, "cert"), source(config, "key")))
    # Taken before the files are read: a change while they are read is seen at the next look.
    config.tls_stamp = certificate_stamp(config.cert, config.key) if config.cert else None
    try:
        return server_tls_context(config.cert, config.key) if config.cert else None
    except ConfigError as error:
        raise ConfigError("%s, %s: %s" % (source(config, "cert"), source(config, "key"), error))


def build_registries(config, sections, environ):
    """The enabled registries by name, and the default one. sections holds each registry
    section of --config as {key: (where, value)}."""
    where = source(config, "registries")
    if config.registries:
        enabled = [name.strip().lower() for name in config.registries.split(",") if name.strip()]
    else:
        enabled = list(PRESETS) + [name for name in sections if name not in PRESETS]
    problems, bad = Problems(), set()
    for name in dict.fromkeys(list(sections) + enabled):
        if not REGISTRY_NAME.fullmatch(name):
            what = ("%s:[%s]" % (config.config, name) if name in sections
                    else "%s: %r" % (where, name))
            problems.append("%s is not a valid registry name" % what)
        elif name not in PRESETS and name not in sections:
            problems.append("%s: unknown registry %s: not a preset (%s) and no [%s] section"
                            % (where, name, ", ".join(PRESETS), name))
        else:
            continue
        bad.add(name)
    made = {name: problems.check(make_registry, name, sections.get(name, {}), config, environ)
            for name in enabled if name not in bad}
    registries = {name: registry for name, registry in made.items() if registry}
    problems.raise_any()
    if not registries:
        raise ConfigError("%s: no registry enabled" % where)
    default = DEFAULT_REGISTRY if DEFAULT_REGISTRY in registries else enabled[0]
    return registries, default


def make_registry(name, section, config, environ):
    """One registry from its preset and its section of --config; every problem of the section
    is reported, each as file:[section] key."""
    problems = Problems()
    check = problems.check

    def where(key):
        return section[key][0] if key in section else "[%s] %s" % (name, key)

    def value(key, default=None):
        return section[key][1] if key in section else default

    for key in sorted(set(section) - set(REGISTRY_KEYS)):
        problems.append("%s is not a registry setting (known: %s)"
                        % (where(key), ", ".join(REGISTRY_KEYS)))
    preset_upstream, aliases, library, short = PRESETS.get(name, (None, (), False, None))
    upstream, upstream_where = value("upstream") or preset_upstream, where("upstream")
    if name == DEFAULT_REGISTRY and config.upstream:
        upstream, upstream_where = config.upstream, source(config, "upstream")
    if not upstream:
        problems.append("[%s] needs an upstream = URL" % name)
    else:
        upstream = check(parse_origin, upstream, upstream_where)
    if "library" in section:
        library = check(parse_switch, value("library"), where("library"))
    elif name == DEFAULT_REGISTRY and upstream:
        library = upstream.host in DOCKER_HUB_HOSTS
    if name == DEFAULT_REGISTRY and config.library_prefix != "auto":
        library = config.library_prefix == "on"
    hosts = {h.strip().lower() for h in value("hosts", "").split(",") if h.strip()}
    for host in hosts:
        if not valid_host_header(host) or ":" in host:
            problems.append("%s: %r is not a host name" % (where("hosts"), host))
    username, secret = value("username"), None
    if username:
        secret = check(read_secret, section, where, environ)
    elif "password_file" in section or "password_env" in section:
        key = "password_file" if "password_file" in section else "password_env"
        problems.append("%s without a username" % where(key))
    problems.raise_any()
    own = {upstream.host, "%s:%d" % (upstream.host, upstream.port)}
    if upstream.port != (443 if upstream.scheme == "https" else 80):
        own.discard(upstream.host)
    names = {name} | set(aliases) | own
    return Registry(name, upstream, frozenset(names), frozenset(hosts | {name} | set(aliases)),
                    library, username, secret, short)


def read_secret(section, where, environ):
    """A registry password from a file or an environment variable: never from the command line,
    which every user of the machine can read in ps."""
    path, variable = (section[key][1] if key in section else ""
                      for key in ("password_file", "password_env"))
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                secret = handle.read().strip()
        except OSError as error:
            raise ConfigError("%s %s: %s" % (where("password_file"), path, error.strerror or error))
        if not secret:
            raise ConfigError("%s %s is empty" % (where("password_file"), path))
    elif variable:
        if variable not in environ:
            raise ConfigError("%s %s is not set" % (where("password_env"), variable))
        secret = environ[variable].strip()
        if not secret:
            raise ConfigError("%s %s is set but empty" % (where("password_env"), variable))
    else:
        raise ConfigError("%s has no password_file or password_env" % where("username"))
    return Secret(secret)


def parse_switch(text, what):
    if text.strip().lower() in ("on", "yes", "true", "1"):
        return True
    if text.strip().lower() in ("off", "no", "false", "0"):
        return False
    raise ConfigError("%s must be on or off, not %r" % (what, text))


def parse_network(text, what):
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError("%s wants an address or CIDR network, not %r" % (what, text))


def parse_rate(text, what="--rate-limit"):
    """'60/min' -> (burst 60, 1.0 per second)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*", text)
    if not match or int(match.group(1)) < 1:
        raise ConfigError("%s wants N/s, N/min or N/h, not %r" % (what, text))
    seconds = {"s": 1, "m": 60, "h": 3600}[match.group(2)[0]]
    return int(match.group(1)), int(match.group(1)) / seconds


def parse_workers(text, what="--workers"):
    """'auto' -> the CPUs this process may run on; else a whole number from 1 to MAX_WORKERS."""
    text = str(text).strip().lower()
    if text == "auto":
        try:
            count = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):    # not Linux
            count = os.cpu_count() or 1
    elif re.fullmatch(r"\d{1,6}", text):
        count = int(text)
    else:
        raise ConfigError("%s wants a number of processes or auto, not %r" % (what, text))
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError("%s must be from 1 to %d, not %d" % (what, MAX_WORKERS, count))
    if count > 1 and not hasattr(os, "fork"):
        raise ConfigError("%s: more than one worker needs fork(), which this system lacks" % what)
    return count


def parse_size(text, what="--cache-max-size"):
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError("%s wants a size like 500M or 20G, not %r" % (what, text))
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


def read_users(path, what="--users"):
    users = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise ConfigError("%s: cannot read %s: %s" % (what, path, error.strerror or error))
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, hashed = line.partition(":")
        if not name or not PASSWORD_HASH.fullmatch(hashed):
            raise ConfigError("%s line %d: want name:pbkdf2_sha256$... "
                              "(see 'docxy.py hash-password')" % (path, number))
        users[name] = hashed
    if not users:
        raise ConfigError("%s: %s lists no users" % (what, path))
    return users


def parse_origin(url, what):
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("%s must be an http:// or https:// URL, not %r" % (what, url))
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError("%s must be scheme://host[:port] only, not %r" % (what, url))
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:       # out of range, or 0: no port a connection can reach
        raise ConfigError("%s has a bad port: %r" % (what, url))
    port = port or (443 if parts.scheme == "https" else 80)
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


def certificate_stamp(cert, key):
    """What tells that the certificate or key changed on disk: their times and sizes, or None
    while one cannot be read."""
    try:
        return [(os.stat(path).st_mtime_ns, os.stat(path).st_size) for path in (cert, key)]
    except OSError:
        return None


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


# ================================================================================================
# Registry protocol: names, references, media types, tokens, errors
#
# The OCI distribution spec's grammar and docxy's reading of a request's path, the manifest
# media types, byte ranges, token scopes and token answers, the registry's JSON errors, and
# HTTP header fields as both sides write them. Pure functions: no state, no I/O.
# ================================================================================================

# The OCI distribution spec's grammar. Paths are matched raw, never unquoted: no
# legitimate name, tag or digest needs percent-encoding, so '%' is simply invalid.
#
# Every expression here sees client or upstream input, and each runs in linear time: no
# repeated group can match the same text in two ways. In NAME_COMPONENT a separator is never
# alphanumeric, so each repetition starts where the last must end (and names are length-checked
# before they are matched); TAG, DIGEST and MEDIA_TYPE are runs of bounded length; ROUTE's only
# backtracking is `.+` giving back one character at a time, each position tried in constant
# time. Headers with a richer grammar (Range, WWW-Authenticate, Accept, X-Forwarded-For) are
# parsed by hand, without regular expressions.
NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME = re.compile(r"%s(?:/%s)*" % (NAME_COMPONENT, NAME_COMPONENT))
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")
MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
                        r"/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
MAX_NAME = 255
TOKEN_PATH = re.compile(r"/auth/(?:(?P<registry>[a-z0-9.:-]+)/)?token")
ROUTE = re.compile(r"/v2/(?P<name>.+)/"
                   r"(?:(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]*)|tags/(?P<list>list))")
# Query parameters each route may carry upstream, with the grammar of their value.
QUERY_GRAMMAR = {
    "tags": {"n": re.compile(r"\d{1,5}"), "last": TAG},
    "referrers": {"artifactType": MEDIA_TYPE},
}


class RegistryError(Exception):
    """An answer docxy gives itself, as a registry-style JSON error."""

    def __init__(self, status, code, message, detail=None, headers=()):
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail
        self.headers = headers


def error_body(code, message, detail=None):
    return json.dumps({"errors": [{"code": code, "message": message,
                                   "detail": detail if detail is not None else {}}]}).encode()


def parse_registry_path(path, query, library):
    """Validate a /v2/<name>/... path; return (upstream path, upstream name, kind, reference)."""
    match = ROUTE.fullmatch(path)
    if not match:
        raise RegistryError(404, "NOT_FOUND", "no such endpoint", path[:200])
    name, kind, ref = match.group("name"), match.group("kind") or "tags", match.group("ref")
    if len(name) > MAX_NAME or not NAME.fullmatch(name):
        raise RegistryError(400, "NAME_INVALID", "invalid repository name", name[:300])
    if kind == "manifests":
        if not (TAG.fullmatch(ref) or DIGEST.fullmatch(ref)):
            # No manifest can have such a name: a pull of it is a 404 (distribution-spec v1.1;
            # TAG_INVALID and DIGEST_INVALID are answers to a push).
            raise RegistryError(404, "MANIFEST_UNKNOWN", "manifest unknown",
                                {"reference": ref[:300]})
    elif kind in ("blobs", "referrers") and not DIGEST.fullmatch(ref):
        raise RegistryError(400, "DIGEST_INVALID", "invalid digest", ref[:300])
    name = upstream_name(name, library)
    suffix = "tags/list" if kind == "tags" else "%s/%s" % (kind, ref)
    query = clean_query(query, QUERY_GRAMMAR.get(kind, {}))
    return "/v2/%s/%s%s" % (name, suffix, query), name, kind, ref


def upstream_name(name, library):
    """busybox -> library/busybox where the library/ rule holds (Docker Hub's official images)."""
    return "library/" + name if library and "/" not in name else name


def clean_query(query, grammar):
    """Keep only the parameters this route takes, each matching its grammar."""
    kept = [(key, value) for key, value in urllib.parse.parse_qsl(query)
            if key in grammar and grammar[key].fullmatch(value)]
    return "?" + urllib.parse.urlencode(kept) if kept else ""


# The manifest media types docxy asks upstreams for. A client's Accept headers come down to the
# ones of these it names, and exactly that set goes upstream: the set keys a tag's records, so
# every client that sends it gets the same answer, and one tag has a bounded number of records.
MANIFEST_ACCEPT = frozenset((
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.oci.artifact.manifest.v1+json", "*/*"))
INDEX_TYPES = frozenset(("application/vnd.oci.image.index.v1+json",
                         "application/vnd.docker.distribution.manifest.list.v2+json"))


def manifest_accept(values):
    """The known manifest media types that Accept headers name, sorted. A type whose parameters
    do not parse is left out, as distribution leaves it out, and so is one with q=0."""
    types = set()
    for value in values:
        for part in value.split(","):
            media_type, *parameters = part.split(";")
            media_type = media_type.strip(" \t").lower()
            if media_type in MANIFEST_ACCEPT and all(map(accepts, parameters)):
                types.add(media_type)
    return tuple(sorted(types))


def accepts(parameter):
    """False for a media type parameter that does not parse, or that is q=0."""
    name, equals, value = parameter.partition("=")
    name, value = name.strip(" \t").lower(), value.strip(" \t")
    if not equals or not name or not value:
        return False
    if name != "q":
        return True
    try:
        return float(value) > 0 if len(value) <= 5 else False
    except ValueError:
        return False


def media_type_of(content_type):
    """The media type of a Content-Type value when it has the grammar's shape, else None: only
    such a value is ever recorded, and later written into a response header."""
    media_type = (content_type or "").partition(";")[0].strip(" \t")
    return media_type if MEDIA_TYPE.fullmatch(media_type) else None


MAX_RANGE_HEADER = 200     # a longer Range is not one byte range: ignoring it is always allowed


def parse_range(value, size):
    """A single 'bytes=a-b' range (RFC 9110 14.1.2) -> (start, end inclusive); None for the
    whole object. Parsed by hand: a client's header never meets a backtracking expression."""
    if not value or len(value) > MAX_RANGE_HEADER:
        return None
    unit, equals, spec = value.partition("=")
    first, dash, last = spec.partition("-")
    first, last = first.strip(" \t"), last.strip(" \t")
    if unit.strip(" \t").lower() != "bytes" or not equals or not dash or not (first or last) \
            or not all(is_number(part) for part in (first, last) if part):
        return None                 # absent, several ranges or malformed: the whole object is valid
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    else:
        start, end = max(0, size - int(last)), size - 1
    if start >= size or start > end:
        raise RegistryError(416, "RANGE_INVALID", "range not satisfiable", {"size": size},
                            [("Content-Range", "bytes */%d" % size)])
    return start, end


def login_scope(headers, name):
    """With no credentials from the client, docxy logs in upstream itself, for this scope."""
    return None if "Authorization" in headers else "repository:%s:pull" % name


def pull_only(scope):
    """A repository scope cut down to pull; None for a scope that grants no pull ("*" grants
    every action, pull among them)."""
    named = split_scope(scope)
    if not named or not {"pull", "*"} & set(named[1].split(",")):
        return None
    return "repository:%s:pull" % named[0]


def split_scope(scope):
    """'repository:NAME:ACTIONS' -> (NAME, ACTIONS); None for any other scope."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return (name, actions) if kind == "repository" and name else None


TOKEN_FIELDS = ("token", "access_token", "expires_in", "issued_at")


def with_query(url, params):
    """url with (name, value) pairs added to its query."""
    if not params:
        return url
    return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(params)


def token_answer(body):
    """A token service's answer to a request docxy made, cut down to the token itself: a
    refresh token, or anything else the realm adds, stays with docxy. Unchanged when there
    is nothing to cut, so that clients get the realm's own bytes."""
    try:
        answer = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UpstreamError(502, "the token service answered something that is not a token")
    if not isinstance(answer, dict):
        raise UpstreamError(502, "the token service answered something that is not a token")
    if set(answer) <= set(TOKEN_FIELDS):
        return body
    return json.dumps({key: answer[key] for key in TOKEN_FIELDS if key in answer}).encode()


def token_of(body):
    """(token, lifetime in seconds) from a token realm's JSON answer; (None, 0) if none."""
    try:
        answer = json.loads(body.decode())
        token = answer.get("token") or answer.get("access_token")
        lifetime = float(answer.get("expires_in") or 60)
    except (ValueError, AttributeError, TypeError, OverflowError):
        return None, 0.0
    return (token, lifetime) if isinstance(token, str) and token else (None, 0.0)


# Handed out where no upstream token can be had; never sent upstream.
NO_TOKEN = "docxy-placeholder"
# Labels are separated by a dot that no label contains: linear, and valid_host_header checks
# the length (at most 255) before matching.
HOST_HEADER = re.compile(
    r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?")


def without_port(host):
    """'example.com:5000' -> 'example.com', '[::1]:5000' -> '[::1]', of a valid Host header."""
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host


def valid_host_header(value):
    """True for host[:port] and nothing else: the Host header ends up in auth realms."""
    if not value or len(value) > 255:      # bounded first: HOST_HEADER's labels backtrack a little
        return False
    match = HOST_HEADER.fullmatch(value)
    if not match or (match.group("port") and int(match.group("port")) > 65535):
        return False
    if match.group("host").startswith("["):
        try:
            ipaddress.IPv6Address(match.group("host")[1:-1])
        except ValueError:
            return False
    return True


class HeaderSyntaxError(http.client.HTTPException):
    """A request's header line that is not NAME: VALUE (RFC 9112 5.1)."""


# A field name is a token (RFC 9110 5.1): one character class, matched in linear time.
FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def read_headers(fp, _class=http.client.HTTPMessage, strict=False):
    """http.client.parse_headers without the email package's feed parser, the largest cost
    of a small request in a profile. Same limits, same result type.
    `strict` (a client's request): a line that is not NAME: VALUE, whitespace before the colon
    included, raises HeaderSyntaxError, as RFC 9112 5.1 requires of a server, and so does a
    value with a NUL or a bare CR in it, which docxy would pass on upstream, and a folded
    line (RFC 9112 5.2). Else (an
    upstream's answer) whitespace around the name is removed, as it requires of a proxy, and
    a line with no name is left out."""
    fields = []     # (name, value), in order
    while True:
        line = fp.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            break
        if len(fields) >= MAX_HEADERS:
            raise http.client.HTTPException("got more than %d headers" % MAX_HEADERS)
        text = line.decode("iso-8859-1")
        if strict:      # the line's end exactly: a CR before it is a bare CR of the value
            text = text[:-2] if text.endswith("\r\n") else text.rstrip("\n")
        else:
            text = text.rstrip("\r\n")
        if text[:1] in (" ", "\t") and fields:    # an obsolete folded continuation line
            if strict:  # RFC 9112 5.2 lets a server refuse it; no client docxy serves folds
                raise HeaderSyntaxError("obsolete line folding: %r" % text[:100])
            fields[-1] = (fields[-1][0], fields[-1][1] + " " + text.strip())
            continue
        name, colon, value = text.partition(":")
        if strict and (not colon or not FIELD_NAME.fullmatch(name)
                       or "\0" in value or "\r" in value):   # RFC 9112 5.1, RFC 9110 5.5
            raise HeaderSyntaxError("not a header line: %r" % text[:100])
        name = name.strip(" \t")
        if colon and name:
            fields.append((name, value.strip(" \t")))
    headers = _class()
    for name, value in fields:
        headers.set_raw(name, value)    # as parsed: a repeated name is kept
    return headers


MAX_HEADER_LINE, MAX_HEADERS = 65536, 100   # http.client's own limits


def read_upstream_headers_quickly():
    """Make http.client read upstream answers' headers with read_headers: docxy's only change
    to the standard library's behaviour, made by main() for the process it runs, never by an
    import. (Client requests are read by StrictRequestParser, which calls read_headers.)"""
    http.client.parse_headers = read_headers


# ================================================================================================
# Network policy: who may connect, and where docxy may dial
#
# Client addresses (the TCP peer's, or X-Forwarded-For from a trusted proxy), the networks a
# rate limit counts by, the zone an upstream address is in (an upstream may not lead docxy
# into loopback, link-local or private networks it is not in itself), and login hashes.
# ================================================================================================

def plain_address(text):
    """An address as networks see it: an IPv4 client of an [::] listener is IPv4."""
    ip = ipaddress.ip_address(text)
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def forwarded_address(text):
    """An X-Forwarded-For entry as an address: 203.0.113.7, 203.0.113.7:4711, 2001:db8::1,
    [2001:db8::1] or [2001:db8::1]:4711, as proxies write them. ValueError for anything else
    ('unknown', an obfuscated name, garbage)."""
    text = text.strip(" \t")
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or ":" not in host or port and not (port[0] == ":" and is_number(port[1:])):
            raise ValueError("not an address: %r" % text)
        text = host
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not is_number(port):
            raise ValueError("not an address: %r" % text)
    return plain_address(text)


def is_number(text):
    return text.isascii() and text.isdigit()


def client_network(address):
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return ip
    return ip.ipv4_mapped or ipaddress.ip_network("%s/64" % ip, strict=False)


def in_networks(address, networks):
    return any(address in network for network in networks)


def client_address(peer, forwarded_for, trusted):
    """The client's address, as text: the TCP peer's, or, when the peer is a trusted proxy,
    the rightmost X-Forwarded-For entry (of the header's values, `forwarded_for`) that is not
    itself a trusted proxy. An entry that is no address is refused (RegistryError): failing
    open would make the trusted proxy itself the client."""
    client = str(peer)
    if not in_networks(peer, trusted):
        return client
    hops = ",".join(forwarded_for).split(",")
    for hop in reversed([hop for hop in hops if hop.strip(" \t")]):  # a #list may have empty items
        try:
            address = forwarded_address(hop)
        except ValueError:
            raise RegistryError(400, "DENIED", "X-Forwarded-For names no client address",
                                hop.strip()[:100])
        client = str(address)
        if not in_networks(address, trusted):
            break
    return client


def address_zone(host):
    """The zone of network an address is in: "public", "loopback", "link-local" (where cloud
    metadata services answer) or "private" (every other range that is not public).
    None for a host name; "localhost" is loopback whatever resolves it, and so is 0.0.0.0 (or
    ::), which a connect on Linux takes to this host."""
    try:
        ip = plain_address(host.partition("%")[0])
    except ValueError:
        return "loopback" if host.lower().rstrip(".") == "localhost" else None
    if ip.is_loopback or ip.is_unspecified:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    return "public" if ip.is_global else "private"


def refused_zone(origin, zone):
    return UpstreamError(502, "upstream redirected into a network docxy does not enter; refused",
                         "%s is a %s address" % (origin.host, zone), "redirect")


def hash_password(password, iterations=PBKDF2_ITERATIONS):
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return "pbkdf2_sha256$%d$%s$%s" % (iterations, base64.b64encode(salt).decode(),
                                       base64.b64encode(digest).decode())


def password_matches(password, hashed):
    # An unknown user costs the same PBKDF2 work as a known one: no timing oracle for names.
    stand_in = "pbkdf2_sha256$%d$AAAA$AAAA" % PBKDF2_ITERATIONS
    _, iterations, salt, digest = (hashed or stand_in).split("$")
    computed = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt),
                                   int(iterations))
    return hashed is not None and hmac.compare_digest(computed, base64.b64decode(digest))


# ================================================================================================
# Upstream: connections, answers, registry logins
#
# ConnectionPool keeps upstream connections; fetch() sends a request and follows redirects
# the way a registry client must, returning an UpstreamResponse, which is all the rest of
# docxy knows of http.client; RegistryClient logs in upstream (challenges, tokens) and
# keeps each registry's health.
# ================================================================================================

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
# Idle upstream connections kept: as many per upstream as requests to it at once, or
# concurrent manifest requests would reconnect, each a TCP and TLS handshake.
IDLE_PER_ORIGIN = 64
IDLE_TOTAL = 256
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
OUTAGE_MEMORY = 30.0        # after an upstream failure, stale answers come at once for this long
PING_MEMORY = 3600.0        # a registry's /v2/ challenge hardly ever changes: ask once an hour


class UpstreamError(Exception):
    """The upstream could not be reached or misbehaved: 502, or 504 for a timeout.
    The message is for the client; the detail, which may name hosts, for the log."""

    def __init__(self, status, message, detail="", kind=None):
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail
        self.kind = kind or ("timeout" if status == 504 else "protocol")


def upstream_cause(error, timeout):
    """What went wrong upstream, in words fit for a client: the step that failed and the
    system's reason, never a host, a URL (a CDN's carries a signature) or a credential."""
    if error.status == 504:
        step = "connect" if error.detail.startswith("connect to ") else "read"
        return "%s timeout after %gs" % (step, timeout)
    if error.kind == "connect":     # the detail is "host: reason"
        step = "TLS handshake failed" if "TLS" in error.message else "connect failed"
        return "%s: %s" % (step, error.detail.rpartition(": ")[2])
    return error.message


class QuotaSpent(UpstreamError):
    """The registry refused docxy's login there with a 429 (too many pulls): until `wait`
    seconds have passed docxy asks it for no manifest, and tells clients so (429, Retry-After)
    when it has nothing cached to answer with."""

    def __init__(self, registry, identity, wait):
        super().__init__(429, "the upstream's pull quota is spent; try again later",
                         "%s refused %s" % (registry, identity), "quota")
        self.wait = wait

    def retry_after(self):
        return str(max(1, int(self.wait + 0.999)))


# Docker Hub's form, "100;w=21600": a count, and the window it is for in seconds.
RATELIMIT_FIGURE = re.compile(r"\s*([0-9]{1,12})\s*(?:;\s*w\s*=\s*([0-9]{1,9}))?")
RETRY_AFTER_MOST = 86400.0  # an upstream's Retry-After longer than a day is taken as a day
RETRY_AFTER_LEAST = 1.0     # and one shorter than a second (0, a date gone by) as a second


def ratelimit_figure(value):
    """'76;w=21600' -> (76, 21600); '76' -> (76, None); None when there is no count."""
    match = RATELIMIT_FIGURE.match(value or "")
    if not match:
        return None
    return int(match.group(1)), match.group(2) and int(match.group(2))


def retry_after_seconds(value, now):
    """A Retry-After (RFC 9110 10.2.3), delay-seconds or an HTTP-date, as seconds from `now`
    (time.time()), at most RETRY_AFTER_MOST; None when absent or unreadable."""
    value = (value or "").strip()
    if re.fullmatch("[0-9]{1,12}", value):
        return min(float(value), RETRY_AFTER_MOST)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, when - now), RETRY_AFTER_MOST)


def is_manifest_request(url):
    """Whether a URL is /v2/<name>/manifests/<reference> (a name may have a component
    "manifests" too)."""
    return urllib.parse.urlsplit(url).path.rsplit("/", 2)[-2:-1] == ["manifests"]


def passes_header(name):
    name = name.lower()
    return name in PASSED_HEADERS or name.startswith("ratelimit-")


class ConnectionPool:
    """Idle upstream connections, reused so that a pull costs one TLS handshake, not dozens.
    New connections go through the HTTPS_PROXY / HTTP_PROXY of the environment unless
    NO_PROXY exempts the host. `lock` guards `idle` and `zones`; a connection taken from the
    pool is its taker's alone until put back."""

    def __init__(self, timeout, tls_context, ipv4_only=False):
        self.timeout, self.tls_context, self.ipv4_only = timeout, tls_context, ipv4_only
        self.proxies = urllib.request.getproxies_environment()
        self.idle = {}          # Origin -> [(connection, idle since)]
        self.zones = {}         # Origin -> the zone of the address it was last reached at
        self.lock = threading.Lock()

    def get(self, origin, within=None):
        """A connected connection to origin: a pooled one, or a new one. Says which.
        `within`: the zones (see address_zone) the connection may lead into; None: any.
        An address literal is checked before connecting, where a name led after: so a name
        that resolves one way for a check and another way for the connection cannot slip by."""
        if within and address_zone(origin.host) not in (None,) + within:
            raise refused_zone(origin, address_zone(origin.host))
        with self.lock:
            stack = self.idle.get(origin, [])
            while stack:
                connection, since = stack.pop()
                if time.monotonic() - since < IDLE_SECONDS:
                    return self.checked(origin, connection, within), True
                connection.close()
        return self.checked(origin, self.connect(origin), within), False

    def checked(self, origin, connection, within):
        if within and connection.docxy_zone not in within:
            connection.close()
            raise refused_zone(origin, connection.docxy_zone)
        return connection

    def reachable_from(self, home):
        """Where a hop away from a registry's own host may lead: public addresses, and the kind
        of network the registry itself is in (a registry on a private network may send docxy
        to its storage there). Link-local is never among them unless the registry is too."""
        with self.lock:
            learned = self.zones.get(home, "public")
        return ("public", address_zone(home.host) or learned)

    def proxy_for(self, origin):
        proxy = self.proxies.get(origin.scheme)
        if not proxy or urllib.request.proxy_bypass_environment(origin.host, self.proxies):
            return None
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        headers = {}
        if parts.username is not None:
            login = "%s:%s" % (urllib.parse.unquote(parts.username),
                               urllib.parse.unquote(parts.password or ""))
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
        return parts.hostname, parts.port or 3128, headers

    def connect(self, origin):
        proxy = self.proxy_for(origin)
        host, port = (proxy[0], proxy[1]) if proxy else (origin.host, origin.port)
        if origin.scheme == "https":
            connection = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                                     context=self.tls_context)
            if proxy:
                connection.set_tunnel(origin.host, origin.port, headers=proxy[2])
        else:
            connection = http.client.HTTPConnection(host, port, timeout=self.timeout)
            if proxy:   # plain HTTP through a proxy: absolute-form targets
                connection.docxy_prefix = "http://%s:%d" % (
                    "[%s]" % origin.host if ":" in origin.host else origin.host, origin.port)
                connection.docxy_headers = proxy[2]
        if self.ipv4_only:
            # http.client has no public way to choose how it connects; this instance attribute
            # is its own seam for that, and the one private name docxy sets.
            connection._create_connection = connect_ipv4
        try:
            connection.connect()
        except socket.timeout:
            raise UpstreamError(504, "upstream did not answer in time",
                                "connect to %s" % origin.host)
        except ssl.SSLError as error:
            raise UpstreamError(502, "upstream TLS failed",
                                "%s: %s" % (origin.host, error.reason), "connect")
        except OSError as error:
            raise UpstreamError(502, "upstream unreachable",
                                "%s: %s" % (origin.host, error.strerror or error), "connect")
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Through a proxy, the proxy resolves names: docxy cannot see where they lead.
        connection.docxy_zone = address_zone(origin.host) or (
            "public" if proxy else address_zone(connection.sock.getpeername()[0]))
        with self.lock:
            self.zones[origin] = connection.docxy_zone
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


class UpstreamResponse:
    """One upstream answer and the connection it came on: all that the rest of docxy knows of
    http.client. The body is read with readinto() or read_small(); release() then gives the
    connection back to the pool if the body was read to its end, and closes it otherwise (a
    half-read connection is never reused); discard() reads a small body away first. One
    thread's at a time, no lock."""

    def __init__(self, pool, origin, connection, response, first_hop=()):
        self.pool, self.origin = pool, origin
        self.connection, self.response = connection, response
        self.status = response.status
        self.first_hop = list(first_hop)    # registry headers the hop before a redirect gave
        self.released = False

    def header(self, name, default=None):
        return self.response.getheader(name, default)

    def headers(self):
        return self.response.getheaders()

    @property
    def remaining(self):
        """What the body's Content-Length still promises, counted down as it is read; None
        when the body's end is not announced (chunked, or delimited by the connection's end)."""
        return self.response.length

    def readinto(self, view):
        return self.response.readinto(view)

    def read_small(self, limit=1 << 20):
        return self.response.read(limit)

    def release(self):
        if not self.released:
            self.released = True
            self.pool.release(self.origin, self.connection, self.response)

    def close(self):
        """Let go of the answer and close its connection, however much of it was read."""
        self.released = True
        self.connection.close()

    def discard(self, limit=65536):
        """Read a small body (a redirect's, a HEAD's) so the connection can be reused; a larger
        one is not worth reading: the connection closes."""
        try:
            if self.response.length is not None and self.response.length <= limit:
                self.response.read()
        except (OSError, http.client.HTTPException):
            self.released = True
            self.connection.close()
        self.release()


def connect_ipv4(address, timeout, source_address=None):
    """socket.create_connection restricted to IPv4 (--ipv4-only), for hosts whose IPv6 route
    is broken: only IPv4 addresses are looked up, and a failure is the IPv4 address's own."""
    error = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(
            address[0], address[1], socket.AF_INET, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as failure:
            error = failure
            sock.close()
    raise error or OSError("no IPv4 address for %s" % address[0])


def send_once(pool, origin, method, target, headers, body, within=None):
    """One request/response exchange; a stale pooled connection is retried once on a new one.
    A response whose framing is in doubt (framing_fault) is an upstream failure."""
    while True:
        connection, reused = pool.get(origin, within)
        try:
            connection.request(method, getattr(connection, "docxy_prefix", "") + target, body=body,
                               headers=dict(headers, **getattr(connection, "docxy_headers", {})))
            response = connection.getresponse()
        except socket.timeout:
            connection.close()
            raise UpstreamError(504, "upstream did not answer in time",
                                "%s %s" % (method, origin.host))
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            if not reused:
                raise UpstreamError(502, "upstream failed", "%s: %s" % (origin.host, error))
            continue
        fault = framing_fault(response, method)
        if fault:
            connection.close()      # what follows the head cannot be told apart from a next answer
            raise UpstreamError(502, "upstream sent a response of uncertain length",
                                "%s: %s" % (origin.host, fault), "protocol")
        return connection, response


def framing_fault(response, method):
    """Why the end of an upstream response's body is in doubt (RFC 9112 section 6.3), or None.
    Checked as soon as the head arrives, before any of it is relayed: http.client would pick
    one of two Content-Lengths, read a malformed one as "until the connection closes", and let
    Transfer-Encoding override Content-Length; each is how a body gets cut short or runs into
    the next response unnoticed (response splitting, smuggling).

    A Content-Length repeated with the same value, as two fields or as a list ("42, 42"), is
    accepted as that one value, as RFC 9112 section 6.3 rule 5 lets a recipient do: a proxy or
    CDN on the way merged or duplicated the field, and where the body ends is not in doubt.
    It is relayed as one field. Content-Length is checked in every response, also where no
    body follows (HEAD, 204, 304): it is relayed, and recorded as the size of a tag's manifest.
    """
    headers = response.msg
    fields = headers.get_all("Content-Length") or []
    values = [value.strip() for field in fields for value in field.split(",")]
    if not all(re.fullmatch("[0-9]+", value) for value in values):
        return "invalid Content-Length %r" % ", ".join(fields)[:100]
    lengths = {int(value) for value in values}
    if len(lengths) > 1:
        return "conflicting Content-Lengths %r" % ", ".join(fields)[:100]
    if lengths and values != [fields[0]]:
        length = lengths.pop()
        del headers["Content-Length"]
        headers["Content-Length"] = str(length)
        if response.length is None and not response.chunked:   # http.client gave up on "42, 42"
            response.length = length
    bodyless = method == "HEAD" or response.status in (204, 304) or response.status < 200
    codings = [coding.strip().lower() for field in headers.get_all("Transfer-Encoding") or []
               for coding in field.split(",")]
    if bodyless or not codings:
        return None
    if fields:
        return "both Content-Length and Transfer-Encoding"
    if codings != ["chunked"]:      # docxy decodes chunked only; any other coding would pass raw
        return "unsupported Transfer-Encoding %r" % ", ".join(codings)[:100]
    return None


def fetch(pool, method, url, headers, body=None, home=None):
    """Send a request upstream and follow redirects the way a registry client must.

    Returns an UpstreamResponse. Authorization and
    Cookie are only sent to the host they were meant for; the scheme never drops
    from https to http. `home` is the origin of the registry the request is for:
    any other host (a CDN, a token realm) must be at an address the registry may
    send docxy to (ConnectionPool.reachable_from), so an upstream cannot point docxy
    at a metadata service or an internal network.
    """
    first_hop_headers = []
    headers = dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        default_port = 443 if parts.scheme == "https" else 80
        origin = Origin(parts.scheme, parts.hostname, parts.port or default_port)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        within = pool.reachable_from(home) if home and origin != home else None
        connection, response = send_once(pool, origin, method, target, headers, body, within)
        location = response.getheader("Location")
        answer = UpstreamResponse(pool, origin, connection, response, first_hop_headers)
        if response.status not in REDIRECTS or not location:
            return answer
        if not first_hop_headers:
            first_hop_headers = [(k, v) for k, v in answer.headers()
                                 if k.lower() in REGISTRY_HEADERS]
        answer.discard()
        url = redirect_target(url, location)
        if urllib.parse.urlsplit(url)[:2] != parts[:2]:
            headers.pop("Authorization", None)   # S3-style CDNs reject it, and it is not theirs
            headers.pop("Cookie", None)
        body = None if response.status == 303 else body
        method = "GET" if response.status == 303 and method != "HEAD" else method
    raise UpstreamError(502, "upstream redirected too many times",
                        "more than %d hops" % MAX_REDIRECTS)


def answer_fault(answer, ranged):
    """What makes an upstream answer unfit to relay, or None: a redirect fetch() could not
    follow, or a part of a body (206) when no part was asked for, whose bytes no digest checks."""
    if answer.status in REDIRECTS:
        return "upstream redirect without a usable Location"
    if answer.status == 206 and not ranged:
        return "upstream sent part of a body nobody asked a part of"
    return None


CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18})")


def resume_fault(answer, offset, length, etag):
    """What makes an answer to a resume (a GET with Range: bytes=offset-) unfit to continue a
    body with, or None: anything but a 206 for exactly the bytes from `offset` to the end of
    the body first answered, whose length was `length` (None: not announced) and entity tag
    `etag` (None: none given). A 200 would send the body from its start again, and another
    length or entity tag means another body: the hash so far would only fail at the end."""
    if answer.status != 206:
        return "upstream answered a resume with %d, not 206" % answer.status
    match = CONTENT_RANGE.fullmatch((answer.header("Content-Range") or "").strip())
    if not match:
        return "upstream answered a resume without a usable Content-Range"
    first, last, total = map(int, match.groups())
    if first != offset or last != total - 1:
        return "upstream resumed bytes %d-%d/%d, not from %d to the end" % (
            first, last, total, offset)
    if length is not None and total != length:
        return "upstream resumed a body of %d bytes, not %d" % (total, length)
    # http.client stops a body at its Content-Length: so the client, promised the first
    # answer's, gets no byte past it. A resumed body of no announced length could run on.
    if answer.remaining is None and length is not None:
        return "upstream resumed without a Content-Length"
    if answer.remaining is not None and answer.remaining != total - offset:
        return "upstream resumed with a Content-Length that is not its range's"
    other = answer.header("ETag")
    if etag and other and other != etag:
        return "upstream resumed another entity (ETag %s, was %s)" % (other[:80], etag[:80])
    return None


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


def parse_challenge(value):
    """'Bearer realm="x",service="y"' -> ('Bearer', [('realm', 'x'), ('service', 'y')]).
    A scanner, not a regular expression: every step moves on by a character, so an upstream's
    header costs time in proportion to its length (findall over it was quadratic)."""
    scheme, _, rest = value.strip().partition(" ")
    params, at, end = [], 0, len(rest)
    while at < end:
        while at < end and rest[at] in " \t,":
            at += 1
        start = at
        while at < end and (rest[at].isalnum() or rest[at] in "_-"):
            at += 1
        key = rest[start:at]
        while at < end and rest[at] in " \t":
            at += 1
        if not key or at >= end or rest[at] != "=":
            while at < end and rest[at] != ",":     # not a parameter: on to the next one
                at += 1
            continue
        at += 1
        while at < end and rest[at] in " \t":
            at += 1
        if at < end and rest[at] == '"':
            at, text = at + 1, []
            while at < end and rest[at] != '"':
                if rest[at] == "\\" and at + 1 < end:
                    at += 1
                text.append(rest[at])
                at += 1
            params.append((key, "".join(text)))
            at += 1
        else:
            start = at
            while at < end and rest[at] not in " \t,":
                at += 1
            params.append((key, rest[start:at]))
    return scheme, params


def format_challenge(scheme, params):
    """A challenge header; each value a quoted-string (RFC 9110 5.6.4), its backslashes and
    quotes escaped, so that parse_challenge reads back what was written."""
    return "%s %s" % (scheme, ",".join('%s="%s"' % (k, v.replace("\\", "\\\\").replace('"', '\\"'))
                                       for k, v in params))


def basic_authorization(registry):
    login = "%s:%s" % (registry.username, registry.secret)
    return "Basic " + base64.b64encode(login.encode()).decode()


class RegistryClient:
    """docxy as a client of the upstream registries: the connection pool; each registry's
    Bearer challenge (its token realm and service) and the tokens docxy obtained with it
    (anonymously, or with the operator's credentials); and each registry's health: when its
    /v2/ last answered, and until when it counts as down after a failure.

    `lock` guards `pings`, `down_until`, and the writing of `registries` and `challenges`;
    `contacts` (for /health) is written whole per registry, one dict operation, without it;
    `challenges` maps a registry's name to a dict that is replaced whole, never changed, so it
    is read without the lock. `tokens` has its own. Every exchange is counted in the Metrics
    given (errors) and in the request's AccessRecord; the upstreams' quotas and 429s in
    `quotas` (UpstreamQuotas), which holds back manifest requests, and the pull tokens docxy
    handed out in `issued` (IssuedTokens); each guards itself."""

    def __init__(self, config, metrics, quotas=None, issued=None):
        self.tls = ssl.create_default_context()     # the system's store; honours SSL_CERT_FILE
        self.pool = ConnectionPool(config.upstream_timeout, self.tls, config.ipv4_only)
        self.metrics, self.quotas = metrics, quotas or UpstreamQuotas.private()
        self.issued = issued or IssuedTokens.private()
        self.user_agent = "docxy/" + __version__
        self.lock = threading.Lock()
        self.pings = {}         # registry name -> when its /v2/ last answered
        self.down_until = {}    # registry name -> don't ask it again before
        self.contacts = {}      # registry name -> (time.time() of its last answer or error, error)
        self.registries, self.challenges = {}, {}
        self.configure(config)

    def configure(self, config):
        """Take a configuration's registries: a challenge is kept while its upstream stays."""
        with self.lock:
            old, new = self.registries, config.registries
            self.challenges = {
                name: challenge for name, challenge in self.challenges.items()
                if name in old and name in new and old[name].upstream == new[name].upstream}
            self.tokens = ExpiringCache(4096)   # (registry, scope) -> Authorization docxy got
            self.registries = new

    # -- challenges and tokens

    def learn_challenge(self, registry, challenge):
        """Remember a registry's token realm; a realm may not be less secure than its registry."""
        scheme, params = parse_challenge(challenge)
        params = dict(params)
        parts = urllib.parse.urlsplit(params.get("realm", ""))
        if scheme.lower() == "bearer" and parts.scheme in ("http", "https") and parts.hostname \
                and not (registry.upstream.scheme == "https" and parts.scheme == "http"):
            # Only what holds for every repository: a scope or error belongs to one request.
            learned = {k: params[k] for k in ("realm", "service") if k in params}
            with self.lock:     # a reload may have replaced the registry meanwhile
                if self.registries.get(registry.name) == registry:
                    self.challenges = dict(self.challenges, **{registry.name: learned})
            return params
        return None

    def challenge(self, registry, discover=False):
        """The registry's Bearer challenge as learned, or asked of its /v2/ now (`discover`: a
        client may come for a token first). None for a registry that uses no tokens."""
        known = self.challenges.get(registry.name)
        if known or not discover:
            return known
        answer = fetch(self.pool, "GET", origin_url(registry.upstream) + "/v2/",
                       {"User-Agent": self.user_agent}, home=registry.upstream)
        challenge = answer.header("WWW-Authenticate", "")
        answer.discard()
        if answer.origin != registry.upstream:
            return None
        return self.learn_challenge(registry, challenge)

    def login(self, registry, challenge, scope):
        """An Authorization for the upstream: a Bearer token from its realm (anonymous, or
        with the operator's credentials), or the operator's Basic credentials."""
        scheme, _ = parse_challenge(challenge)
        if scheme.lower() == "basic":
            return basic_authorization(registry) if registry.username else None
        learned = self.learn_challenge(registry, challenge)
        if not learned:
            return None
        query = [(k, learned[k]) for k in ("service", "scope") if learned.get(k)]
        if "scope" not in learned:
            query.append(("scope", scope))
        headers = {"User-Agent": self.user_agent}
        if registry.username:
            headers["Authorization"] = basic_authorization(registry)
        answer = fetch(self.pool, "GET", with_query(learned["realm"], query), headers,
                       home=registry.upstream)
        try:
            body = answer.read_small() if answer.status == 200 else b""
        finally:
            answer.release()
        token, lifetime = token_of(body)
        if not token:
            return None
        authorization = Secret("Bearer " + token)
        lifetime = min(max(lifetime, 0.0), 3600.0)     # kept a little less long than it lives
        self.tokens.put((registry.name, scope), authorization,
                        lifetime - min(10.0, lifetime * 0.1))
        return authorization

    # -- exchanges

    def fetch(self, registry, method, url, headers, record, body=None, scope=None):
        """Send a request upstream; an UpstreamResponse. With a scope, docxy logs in upstream
        itself (anonymously or with the operator's credentials) when challenged, and
        remembers the token. `headers` gets the Authorization used. A manifest request as
        docxy's own identity raises QuotaSpent, unasked, while the registry's last 429 holds,
        and when it answers 429."""
        # An Authorization docxy did not write is a client's own login: its quota is the client's.
        authorization = None if scope else headers.get("Authorization")
        identity = None if authorization and authorization not in self.issued \
            else identity_of(registry)
        manifest = identity is not None and is_manifest_request(url)
        record.registry = registry.name
        wait, backing_off = self.quotas.hold(registry.name, identity) if manifest else (0, False)
        if wait:
            raise QuotaSpent(registry.name, identity, wait)
        known = self.tokens.get((registry.name, scope)) if scope else None
        challenge = self.challenges.get(registry.name)
        if scope and not known and challenge:   # log in first: saves a 401 round trip upstream
            known = self.login(registry, format_challenge("Bearer", list(challenge.items())),
                               scope)
        if known:
            headers["Authorization"] = known
        began = time.monotonic()
        try:
            answer = fetch(self.pool, method, url, headers, body, registry.upstream)
            if scope and answer.status == 401 and answer.origin == registry.upstream:
                login = self.login(registry, answer.header("WWW-Authenticate", ""), scope)
                if login:
                    answer.discard()
                    headers["Authorization"] = login
                    answer = fetch(self.pool, method, url, headers, body, registry.upstream)
        except UpstreamError as error:
            record.upstream_status = "error"
            self.count_error(registry.name, error.kind)
            self.contacts[registry.name] = (time.time(), error.message)
            raise
        finally:
            record.upstream_seconds += time.monotonic() - began
        record.upstream_status = str(answer.status)
        self.note_answer(registry, answer)
        if identity is not None:
            wait = self.note_quota(registry, identity, answer, manifest)
            if wait is not None and manifest:
                answer.discard()
                raise QuotaSpent(registry.name, identity, wait)
            # A pull counted after the wait resets the backoff; a HEAD proves nothing: Docker
            # Hub answers it with the quota spent.
            if backing_off and method == "GET" and answer.status < 400:
                self.quotas.served(registry.name, identity)
        return answer

    def note_answer(self, registry, answer):
        self.contacts[registry.name] = (time.time(), None)
        if answer.status < 500:
            self.mark_up(registry)
        if answer.status == 429 or answer.status >= 500:
            self.count_error(registry.name, "429" if answer.status == 429 else "5xx")

    def note_quota(self, registry, identity, answer, manifest):
        """Record what an answer to docxy's own identity tells of its quota; after a 429, the
        seconds to wait (else None)."""
        limit = ratelimit_figure(answer.header("RateLimit-Limit"))
        remaining = ratelimit_figure(answer.header("RateLimit-Remaining"))
        source = answer.header("Docker-RateLimit-Source")
        if limit or remaining or source:
            self.quotas.report(registry.name, identity, limit, remaining, source)
        if answer.status == 429 and (manifest or answer.origin == registry.upstream):
            retry_after = retry_after_seconds(answer.header("Retry-After"), time.time())
            wait, began = self.quotas.refused(registry.name, identity, retry_after)
            if began:
                log("upstream %s refused %s with 429 (too many requests): no manifest requests "
                    "to it for %gs (%s); cached tags are served stale, anything else gets 429"
                    % (registry.name, identity, round(wait, 1),
                       "its Retry-After" if retry_after is not None else "backing off"))
            return wait
        return None

    def count_error(self, registry_name, kind):
        self.metrics.add("docxy_upstream_errors_total",
                         (("registry", registry_name), ("kind", kind)))

    # -- health

    def last_contact(self, registry, now):
        """What /health tells of a registry, as this process knows it: seconds since it last
        answered or failed to, whether it counts as down, and the last failure's message."""
        when, error = self.contacts.get(registry.name, (None, None))
        return {"seconds_since_contact": None if when is None else round(now - when, 1),
                "down": self.is_down(registry), "last_error": error}

    def answered_lately(self, registry):
        """Whether the registry's /v2/ answered within PING_MEMORY."""
        with self.lock:
            asked = self.pings.get(registry.name)
        return asked is not None and time.monotonic() - asked < PING_MEMORY

    def answered(self, registry):
        with self.lock:
            self.pings[registry.name] = time.monotonic()

    def is_down(self, registry):
        with self.lock:
            return self.down_until.get(registry.name, 0) > time.monotonic()

    def mark_down(self, registry, error, asked):
        """Count the registry as down for OUTAGE_MEMORY after `error`, met when `asked` for
        what the log names; logged once each time. Only a registry that could not be reached
        (connect) or did not answer in time is down: an answer a request's own headers may have
        provoked (a reset, a malformed answer) is no outage for every other client."""
        if error.kind not in ("connect", "timeout"):
            return
        with self.lock:
            if self.down_until.get(registry.name, 0) > time.monotonic():
                return
            self.down_until[registry.name] = time.monotonic() + OUTAGE_MEMORY
        log("upstream %s failed (%s): serving cached tags stale for %gs, %s first"
            % (registry.name, error.message, OUTAGE_MEMORY, asked))

    def mark_up(self, registry):
        if registry.name not in self.down_until:    # the usual case, every answer: no lock
            return
        with self.lock:
            self.down_until.pop(registry.name, None)


# ================================================================================================
# Body transfer: fixed-size chunks, digests, truncation
#
# A body crosses docxy in fixed-size chunks through buffers that all transfers share a
# budget of, hashed beside the copy when verified; what fails midway is cut so that the
# client can tell (a missing last byte or chunk, or a reset).
# ================================================================================================

LONG_TRANSFER = 64 << 20    # bodies this large get a start line in the log, and a speed at the end
# Large reads: each costs system calls and GIL hand-offs whatever its size, so the chunk's size
# is the copy loop's biggest lever (bench/RESULTS.md).
CHUNK = 1 << 20
# What all transfers' buffers may take together: with many downloads at once each gets a
# smaller share (not below MIN_CHUNK), which keeps memory flat at the same aggregate speed.
BUFFER_BUDGET = 16 << 20
MIN_CHUNK = 256 << 10
# A verified body is hashed on a second thread while it is sent, when cores are free for it:
# the hash and the copy each cost about as much CPU, so in turn they would halve one stream's
# speed, and side by side it runs near the hash's own. With more transfers than cores the
# cores are busy anyway, and the extra thread would only add switches.
HASH_BESIDE_TRANSFERS = os.cpu_count() or 1
HASH_BESIDE_BYTES = 8 << 20


def transfer_buffer(size, transfers=1):
    """The one buffer a transfer copies through: no larger than the body needs, a share of
    BUFFER_BUDGET when many transfers run at once, and above 64 KiB an anonymous mmap, which
    returns to the system when the transfer ends (malloc would keep it, and idle keep-alive
    connections would hold memory their last transfer used)."""
    share = max(MIN_CHUNK, BUFFER_BUDGET // max(1, transfers))
    size = max(2, min(CHUNK, share, size))     # two bytes at least: one may be held back
    return mmap.mmap(-1, size) if size > 65536 else bytearray(size)


def release_buffer(buffer):
    """Give an mmap buffer back at once; one that a view still exports (a traceback may hold
    one) goes when the view does, rather than hide the error being handled."""
    if isinstance(buffer, mmap.mmap):
        try:
            buffer.close()
        except BufferError:
            pass


def hash_beside(hasher, buffers):
    """Feed `hasher` on its own thread. Returns (submit, reuse, finish): submit queues a
    chunk, reuse waits until one of the `buffers` has been hashed and may be filled again
    (chunks are hashed in order), finish waits for the last chunk. hashlib lets go of the GIL
    for chunks this large, as socket writes do, so the two run on two cores."""
    jobs, free = queue.SimpleQueue(), threading.Semaphore(buffers)

    def work():
        for chunk in iter(jobs.get, None):
            try:
                hasher.update(chunk)
            except Exception as error:      # the digest cannot match now: the transfer is cut
                log("hashing failed: %s" % (error,))
            free.release()

    worker = threading.Thread(target=work, name="hash", daemon=True)
    worker.start()

    def finish():
        jobs.put(None)
        worker.join()
    return jobs.put, free.acquire, finish


MAX_RESUMES = 5     # asks for the rest of one body after its upstream connection broke


class UpstreamBody:
    """An upstream answer's body as one stream, read with readinto(): a broken or stalled
    connection, or a body that ends before its Content-Length, is an UpstreamError, never a
    short read that looks like the end. Given `resume` (see UpstreamRelay.resumer), it asks
    for the rest instead, up to MAX_RESUMES times and each time only after the connection
    before gave some bytes, so that a reader (BodyCopy, its hash, a cache fill) sees one
    uninterrupted body. `answer` is the current UpstreamResponse: the first, then each
    resumed one. One thread's, no lock."""

    def __init__(self, answer, resume=None):
        self.answer, self.resume = answer, resume
        self.offset = 0         # bytes of the body read so far, over every answer
        self.progress = 0       # bytes the current answer gave
        self.resumes = 0

    @property
    def remaining(self):
        """What the body still lacks by its Content-Length; None when no length was given."""
        return self.answer.remaining

    def readinto(self, view):
        while True:
            try:
                new = self.answer.readinto(view)
            except socket.timeout:
                error = UpstreamError(504, "upstream stalled in the middle of a body")
            except (OSError, http.client.HTTPException) as failure:
                error = UpstreamError(502, "upstream body broke off", str(failure)[:200])
            else:
                if new or not self.answer.remaining:
                    self.offset += new
                    self.progress += new
                    return new
                error = UpstreamError(502, "upstream body ended early",
                                      "%d bytes missing" % self.answer.remaining)
            self.go_on_after(error)

    def go_on_after(self, error):
        """Take the resumed answer in place of the broken one, or raise `error`."""
        if not self.resume or not self.progress or self.resumes >= MAX_RESUMES:
            if self.resumes:
                error.detail += "; after %d resumes" % self.resumes
            raise error
        self.answer.close()     # broken: its connection is never reused
        self.resumes += 1
        self.progress = 0
        self.answer = self.resume(self.offset, self.resumes, error)

    def release(self):
        self.answer.release()


class BodyCopy:
    """One upstream body on its way to a client: read in fixed-size chunks into buffers of its
    own (transfer_buffer), and hashed when a digest is to be verified, on a thread beside the
    copy when the body is large and cores are free (hash_beside). The body is read through an
    UpstreamBody, which resumes it when a `resume` is given.

    The truncation rules: the last byte of a verified body is held back until the whole body
    hashed right, and a body that arrives in one read (a manifest, a config) is checked before
    any of it goes; a mismatch, a body shorter than its Content-Length or a broken upstream
    raises UpstreamError, and the client, whose connection then ends, never sees a complete
    body. One thread's, no lock; close() must follow, the hashing thread reads the buffers
    until then."""

    def __init__(self, answer, verify, transfers, resume=None):
        self.answer, self.verify = UpstreamBody(answer, resume), verify
        self.verified = False
        size = CHUNK if answer.remaining is None else answer.remaining + 1
        self.hasher = hashlib.new(verify.split(":")[0]) if verify else None
        beside = self.hasher and size > HASH_BESIDE_BYTES and transfers <= HASH_BESIDE_TRANSFERS
        # Two buffers when hashing beside: one is read into while the other is still hashed.
        self.buffers = [transfer_buffer(size, transfers) for _ in range(2 if beside else 1)]
        self.views = [memoryview(buffer) for buffer in self.buffers]
        self.reuse = self.finish = None
        self.submit = self.hasher and self.hasher.update
        if beside:
            self.submit, self.reuse, self.finish = hash_beside(self.hasher, len(self.buffers))

    def pieces(self, keep=None):
        """The body's pieces in order, each to be sent before the next is read; `keep` is
        given each piece as it arrives (a cache fill's write)."""
        held = None     # a verified body's last byte so far
        for turn in itertools.count():
            view = self.views[turn % len(self.views)]
            if self.reuse:
                self.reuse()
            start = 0
            if held is not None:
                view[0], start = held, 1
            new = self.read(view[start:])
            if not new:
                break
            end = start + new
            if keep:
                keep(view[start:end])
            if self.hasher:
                self.submit(view[start:end])
                if self.answer.remaining == 0:  # all of it is here: checked before any leaves
                    self.check()
                    yield view[:end]
                    return
                end -= 1
                held = view[end]
            yield view[:end]
        if self.hasher:
            self.check()
            if held is not None:
                yield bytes((held,))

    @property
    def received(self):
        """Bytes read from upstream, over every resumed answer."""
        return self.answer.offset

    def read(self, view):
        return self.answer.readinto(view)

    def check(self):
        if self.finish:
            self.finish()
            self.finish = None
        if self.hasher.hexdigest() != self.verify.split(":")[1]:
            raise UpstreamError(502, "upstream body does not match its digest", self.verify)
        self.verified = True

    def close(self):
        if self.finish:
            self.finish()
            self.finish = None
        self.answer.release()   # a resumed answer is this copy's own to give back
        for view, buffer in zip(self.views, self.buffers):
            view.release()
            release_buffer(buffer)


class ChunkedWriter:
    """Writes a body in HTTP/1.1 chunked framing (RFC 9112 7.1) to `write`; end() writes the
    last chunk, without which the client knows the body is incomplete. One thread's."""

    def __init__(self, write):
        self.raw = write

    def write(self, data):
        if len(data):
            self.raw(b"%x\r\n" % len(data))
            self.raw(data)
            self.raw(b"\r\n")

    def end(self):
        self.raw(b"0\r\n\r\n")


def reset_connection(sock):
    """Abort a TCP connection: SO_LINGER with a zero timeout makes the close send a reset
    (RST), and closing at once keeps any shutdown (the server's, when the handler returns)
    from sending a FIN first. The descriptor's number stays taken, by an unconnected socket,
    until its owner closes it: the handler's reader and writer keep using that number, which
    must not reach a connection accepted meanwhile."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with socket.socket(sock.family, socket.SOCK_STREAM) as stand_in:
            os.dup2(stand_in.fileno(), sock.fileno(), inheritable=False)
    except OSError:
        pass


# ================================================================================================
# Cache
#
# Content-addressed objects verified before they are committed, fills that other clients
# follow while they download, tag records per Accept set, eviction under a size cap: all of
# it on disk, shared by every process that uses the directory, coordinated by file locks.
# ================================================================================================

TAG_RECORD_VERSION = 3      # 1 keyed records by the raw Accept list; 2 had no folder per tag
TAG_RECORDS_PER_TAG = 4     # one tag, answered for that many Accept sets at most
RECENCY_GRAIN = 10          # seconds: a file used again this soon is not touched again (a write)
MEMO_SIZE = 10000           # what a process remembers of tag records and manifests' types
TAG_SHARE = 0.1             # tag records take at most this share of the cache's cap
STALE_WARNING = '110 - "Response is Stale"'


class Fill:
    """An object this process downloads into the cache (Cache.start_fill). Clients of this
    process follow it through `changed`; other processes through the file system (see
    ForeignFill). `changed`, a Condition, guards `written`, `length`, `described` and `state`
    and wakes the followers; `descriptor` and `media_type` are the downloading thread's. The
    descriptor holds the fill file's flock for as long as the download lasts: that lock is
    how other processes, on this host or another, know that its owner is alive."""

    def __init__(self, path, descriptor, kind):
        # Written with os.write, unbuffered: `written` must count bytes that readers can see.
        self.path, self.descriptor, self.kind = path, descriptor, kind
        self.length = None          # the upstream's Content-Length, once its headers arrived
        self.media_type = None      # a manifest's, from the upstream's Content-Type
        self.described = False      # the upstream's headers arrived
        self.written = 0
        self.state = "filling"      # then "done" (verified and committed) or "failed"
        self.abandoned = False      # a local fill never is: its owner is this process
        self.changed = threading.Condition()

    def update(self, written=None, state=None, length=None, described=False):
        with self.changed:
            if written is not None:
                self.written = written
            if described:
                self.length, self.described = length, True
            if state:
                self.state = state
            self.changed.notify_all()

    def wait(self, condition, timeout):
        with self.changed:
            self.changed.wait_for(lambda: condition(self) or self.state != "filling", timeout)
            return self.written, self.state, self.length

    def reader(self):
        """The growing file, opened for a follower (OSError once committed or discarded)."""
        return open(self.path, "rb")

    def close(self):
        """A follower is done with the fill: nothing of its own to let go of."""


class ForeignFill:
    """A fill that another process owns, followed through the file system: the file's size
    is what its owner wrote; its head file (Cache.describe) gives the upstream's length and
    media type; it is done when the object's path names this very file (the owner renamed it
    there, verified); it failed when its lock is free and it was not (the owner gave up, or
    it died: then `abandoned`, as the file is still there). Used by one follower thread."""

    POLL_FIRST, POLL_MOST = 0.002, 0.05     # seconds between looks, doubling while idle

    def __init__(self, cache, digest, descriptor, kind):
        self.cache, self.digest, self.descriptor, self.kind = cache, digest, descriptor, kind
        status = os.fstat(descriptor)
        self.identity = (status.st_dev, status.st_ino)
        self.length = self.media_type = None
        self.described = self.abandoned = False
        self.written, self.state = 0, "filling"

    def wait(self, condition, timeout):
        deadline, pause = time.monotonic() + timeout, self.POLL_FIRST
        while True:
            written = self.written
            self.look()
            if condition(self) or self.state != "filling":
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            pause = self.POLL_FIRST if self.written > written else min(pause * 2, self.POLL_MOST)
            time.sleep(min(pause, left))
        return self.written, self.state, self.length

    def look(self):
        if not self.described:
            head = self.cache.read_head(self.digest, self.identity)
            if head:
                self.length, self.media_type, self.described = head + (True,)
        self.written = os.fstat(self.descriptor).st_size
        if self.cache.committed(self.digest, self.identity):
            self.done()
        elif not owner_alive(self.descriptor):
            # The owner let go of the file: it committed it a moment ago, or never will.
            if self.cache.committed(self.digest, self.identity) or self.complete():
                self.done()
            else:
                self.state = "failed"
                self.abandoned = os.fstat(self.descriptor).st_nlink > 0
                fcntl.flock(self.descriptor, fcntl.LOCK_UN)     # the next owner's to take

    def complete(self):
        """Every byte is there, though the object's path does not (yet) name the file: a
        network file system may show this host a name as missing for a while after another
        created it. The follower's own hash (send_growing_file) decides whether it is sent."""
        return self.described and self.length is not None and self.written == self.length

    def done(self):
        """Committed (or complete): whole, and described by the object itself, should its
        head file have gone before this follower read it. The file is held with a shared
        lock from now on, as a cache hit is, so that no process evicts it while it is sent
        (its owner lets go of it right after the rename: the wait is short)."""
        if self.state != "done":
            fcntl.flock(self.descriptor, fcntl.LOCK_SH)
        self.state = "done"
        if not self.described:
            self.length, self.described = self.written, True
            if self.kind == "manifests":
                self.media_type = self.cache.read_type(self.digest)

    def reader(self):
        return os.fdopen(os.dup(self.descriptor), "rb")

    def close(self):
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None


def owner_alive(descriptor):
    """Whether another open file holds this file's exclusive lock: a fill's owner, or a
    writer of a temporary file. When none does, this one now holds a shared lock, so that
    an evicting process leaves the file alone until it is closed."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True


class WriteProbe:
    """Whether a folder takes writes now (a full or read-only disk, a lost network mount): for
    /health, which balancers ask every second or so. One probe at a time, at most one per
    FRESH seconds: the checks in between answer at once with its answer; while it hangs (on a
    mount that stopped answering) they answer that it hangs, once it has for PATIENCE seconds,
    instead of each holding a thread. `lock` is held by the probing thread; `started`,
    `checked` and `problem` are written by it alone, each replaced whole."""

    FRESH = 1.0         # seconds
    PATIENCE = 2.0      # seconds

    def __init__(self, folder):
        self.folder, self.lock = folder, threading.Lock()
        self.started, self.checked, self.problem = None, None, None

    def check(self):
        """Why no file can be written in the folder now, or None when one can."""
        checked = self.checked
        if checked is not None and time.monotonic() - checked < self.FRESH:
            return self.problem
        if not self.lock.acquire(blocking=False):
            started = self.started
            if started is not None and time.monotonic() - started > self.PATIENCE:
                return "a write has not returned in %gs" % self.PATIENCE
            return self.problem
        try:
            self.started = time.monotonic()
            self.problem = self.write_one()
            self.checked = time.monotonic()
            return self.problem
        finally:
            self.started = None
            self.lock.release()

    def write_one(self):
        """Write a small file and remove it: the error that stopped it, or None."""
        try:
            descriptor, probe = tempfile.mkstemp(prefix="health-", dir=self.folder)
        except OSError as error:
            return error.strerror or str(error)
        problem = None
        try:
            try:
                os.write(descriptor, b"ok")
            finally:
                os.close(descriptor)    # a network file system may report a write's error here
        except OSError as error:
            problem = error.strerror or str(error)
        try:
            os.unlink(probe)
        except OSError as error:
            problem = problem or error.strerror or str(error)
        return problem


class CacheUsage:
    """The bytes and objects the cache directory holds, counted for every process that uses
    it (workers, other docxy processes, prefetch, on this host or on others that share the
    directory): one small file, read and changed under its flock. The count is kept honest
    by each process's scan at start and by every eviction, which counts the files anew.
    `lock` serialises this process's threads, which flock alone would not (they share the
    descriptor); the descriptor is opened per process, as a forked child must not share
    its parent's."""

    def __init__(self, path):
        self.path, self.lock = path, threading.Lock()
        self.descriptor, self.pid = None, None

    def file(self):
        if self.pid != os.getpid():
            self.descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self.pid = os.getpid()
        return self.descriptor

    def read(self, shared=True):
        with self.lock:
            fcntl.flock(self.file(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                return self.parse()
            finally:
                fcntl.flock(self.descriptor, fcntl.LOCK_UN)

    def parse(self):
        try:
            size, objects = os.pread(self.descriptor, 64, 0).split()[:2]
            return max(0, int(size)), max(0, int(objects))
        except ValueError:
            return 0, 0

    def add(self, size, objects=0):
        """Change the count by this much; the new (size, objects)."""
        with self.lock:
            fcntl.flock(self.file(), fcntl.LOCK_EX)
            try:
                now = self.parse()
                return self.write(now[0] + size, now[1] + objects)
            finally:
                fcntl.flock(self.descriptor, fcntl.LOCK_UN)

    def write(self, size, objects):
        size, objects = max(0, size), max(0, objects)
        os.pwrite(self.descriptor, b"%20d %20d\n" % (size, objects), 0)
        return size, objects


class Cache:
    """Blobs and manifests by digest, content-addressed on disk and verified before they are
    committed, evicted least-recently-used under a size cap; plus tag -> digest records.
    The directory is the truth: any number of processes (workers, other docxy processes,
    prefetch) on this host or others may share it, on a file system where flock, rename and
    O_EXCL work (see check_locks).

    Layout: objects/<algorithm>/<first two hex>/<hex>; types/<algorithm>/<hex> holding the
    media type of each object that was fetched as a manifest: only those are ever served as
    manifests, with the type the upstream gave them (never one read from the object's own
    bytes, which any blob could choose); tags/<hash of the tag>/<hash of the Accept set>.json;
    fills/<algorithm>-<hex> (a download in progress, locked by its owner) and its .head;
    tmp/ (small files being written, locked by their writer); usage (CacheUsage); evicting
    (whose lock one evicting process holds). Recency is a file's mtime, which a use sets, at
    most once per RECENCY_GRAIN.

    `lock` guards `fills` (this process's downloads), `busy` (transfers of this process
    reading or writing an object, which its eviction passes over before it even opens the
    file; the locks guard them from every other process) and `stats`; file system work
    happens outside it, but for claiming a fill. `paused_until` is a number replaced whole."""

    SWEEP_AGE = 60          # seconds: an unlocked temporary file older than this is litter

    def __init__(self, root, max_size, tag_ttl):
        self.root, self.max_size, self.tag_ttl = root, max_size, tag_ttl
        for folder in ("objects", "tags", "tmp", "types", "fills"):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        self.usage = CacheUsage(os.path.join(root, "usage"))
        self.after_fork()
        self.usage.file()
        check_locks(self.usage.path)
        self.drop_old_tag_records()
        self.sweep()
        self.recount()
        if max_size is None:
            self.max_size = self.default_cap()
        self.evict()

    def after_fork(self):
        """A new process's own state: none of its parent's downloads or locks."""
        self.lock = threading.Lock()
        self.fills = {}                             # digest -> Fill this process downloads
        self.busy = collections.Counter()           # digest -> transfers reading or writing it
        self.stats = collections.Counter()
        self.paused_until = 0.0
        self.usage.lock, self.usage.pid = threading.Lock(), None
        self.write_probe = WriteProbe(os.path.join(self.root, "tmp"))
        # What was read from disk, each entry replaced whole (see MEMO_SIZE): digest -> media
        # type; tag record path -> (the file's identity, the record).
        self.types, self.records = {}, {}

    # --- where things are -------------------------------------------------------------------

    def path(self, digest):
        algorithm, hexdigest = digest.split(":")
        return os.path.join(self.root, "objects", algorithm, hexdigest[:2], hexdigest)

    def type_path(self, digest):
        algorithm, hexdigest = digest.split(":")
        return os.path.join(self.root, "types", algorithm, hexdigest)

    def fill_path(self, digest):
        return os.path.join(self.root, "fills", digest.replace(":", "-"))

    def tag_path(self, key):
        """A tag record's file: the key has names and media types, not a file name's shape."""
        tag, accepted = "\n".join(key[:3]), key[3]
        return os.path.join(self.root, "tags", hashlib.sha256(tag.encode()).hexdigest(),
                            hashlib.sha256(accepted.encode()).hexdigest()[:32] + ".json")

    def read_type(self, digest):
        """The media type recorded for a manifest, or None. Remembered: the bytes a digest
        names never change, nor what they were fetched as."""
        media_type = self.types.get(digest)
        if media_type is None:
            try:
                media_type = media_type_of(read_small(self.type_path(digest))[0].decode("ascii"))
            except (OSError, ValueError):
                return None
            remember(self.types, digest, media_type)
        return media_type

    def unlink(self, path):
        return unlink_quietly(path)

    # --- objects ------------------------------------------------------------------------------

    def open(self, digest, kind="blobs"):
        """On a hit, (the open file, its size, its media type), marked busy until release();
        else None. A manifest is a hit only if it was stored as one. The file is held with a
        shared lock, so that no process evicts it while it is served."""
        media_type = self.read_type(digest) if kind == "manifests" else None
        if kind == "manifests" and not media_type:
            return None
        try:
            handle = open(self.path(digest), "rb")
        except OSError:
            return None
        try:
            # Waits only while a process evicts it, or its download's owner lets go of it.
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            status = os.fstat(handle.fileno())
            if status.st_nlink == 0:        # evicted between the open and the lock
                handle.close()
                return None
        except OSError:
            handle.close()
            return None
        if time.time() - status.st_mtime >= RECENCY_GRAIN:
            try:
                touch(handle.fileno())      # recency, for every process and after a restart
            except OSError:                 # another user's file: served all the same
                pass
        with self.lock:
            self.busy[digest] += 1
        return handle, status.st_size, media_type

    def committed(self, digest, identity):
        """Whether the object's path names the file `identity` (st_dev, st_ino): a fill's
        owner renamed it there once it was verified."""
        try:
            status = os.stat(self.path(digest))
        except OSError:
            return False
        return (status.st_dev, status.st_ino) == identity

    def release(self, digest):
        with self.lock:
            self.busy[digest] -= 1
            if self.busy[digest] <= 0:
                del self.busy[digest]

    # --- fills: one download per object, whichever process asks -------------------------------

    def start_fill(self, digest, kind):
        """("lead", fill): download it; ("follow", fill): follow the download in progress,
        this process's (Fill) or another's (ForeignFill); ("again", None): it was committed
        meanwhile, look again; ("pass", None): caching is paused, or a blob is downloading
        where a manifest is asked for: pass the request through."""
        with self.lock:
            local = self.fills.get(digest)
            if local:
                if kind == "manifests" and local.kind != kind:
                    return "pass", None
                self.busy[digest] += 1
                return "follow", local
            if time.monotonic() < self.paused_until:
                return "pass", None
            try:
                claim, fill = self.claim_fill(digest, kind)
            except OSError as error:
                failure = error
            else:
                if claim == "lead":
                    self.fills[digest] = fill
                if claim in ("lead", "follow"):
                    self.busy[digest] += 1
                return claim, fill
        self.pause(failure)     # outside the lock, which pause takes too (it is not reentrant)
        return "pass", None

    def claim_fill(self, digest, kind):
        """Become the owner of the fill file (its exclusive lock), or follow its owner. A file
        left by an owner that died is taken over: removed, and a new one started, so that its
        followers see it fail and nobody ever reads on in bytes nobody will verify."""
        path = self.fill_path(digest)
        for _ in range(3):
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "follow", ForeignFill(self, digest, descriptor, kind)
            except OSError:
                os.close(descriptor)
                raise
            status = os.fstat(descriptor)
            if not same_file(status, path):     # removed or replaced before the lock came
                os.close(descriptor)
                continue
            if status.st_size or os.path.exists(path + ".head"):
                log("cache: taking over the download of %s, whose process stopped" % digest)
                self.stats["fills_taken_over"] += 1
                self.unlink(path + ".head")
                self.unlink(path)
                os.close(descriptor)
                continue
            if os.path.exists(self.path(digest)):   # committed between the miss and now
                self.unlink(path)
                os.close(descriptor)
                return "again", None
            return "lead", Fill(path, descriptor, kind)
        return "pass", None

    def describe(self, fill, length, media_type):
        """The upstream's headers arrived: followers in other processes learn the length and
        media type from the fill's head file, which names the file it describes."""
        fill.media_type = media_type
        if fill.descriptor is not None:
            status = os.fstat(fill.descriptor)
            head = {"file": [status.st_dev, status.st_ino], "length": length,
                    "type": media_type}
            try:
                self.write_file(fill.path + ".head", json.dumps(head).encode())
            except OSError as error:
                self.stop_writing(fill, error)
        fill.update(length=length, described=True)

    def read_head(self, digest, identity):
        """(length, media type) of another process's fill of this file, once described."""
        try:
            with open(self.fill_path(digest) + ".head", "rb") as handle:
                head = json.loads(handle.read(4096).decode("utf-8"))
            if tuple(head["file"]) == identity:
                return head["length"], head["type"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def write(self, fill, data):
        """Append to a download; a full or read-only disk pauses caching, never the transfer."""
        if fill.descriptor is None:
            return
        try:
            done = 0
            while done < len(data):
                done += os.write(fill.descriptor, data[done:])
            fill.update(written=fill.written + done)
        except OSError as error:
            self.stop_writing(fill, error)

    def stop_writing(self, fill, error):
        """Caching this download failed (a full disk): its files go, while its lock is held,
        and the transfer goes on uncached."""
        self.pause(error)
        self.discard_fill_files(fill)
        fill.update(state="failed")

    def discard_fill_files(self, fill):
        """Remove a fill's file and head, then let go of its lock. Only the lock's holder ever
        removes or renames a fill file, and only while the path still names its own file:
        after the lock goes, the path may be another process's download."""
        if fill.descriptor is None:
            return
        try:
            if same_file(os.fstat(fill.descriptor), fill.path):
                self.unlink(fill.path + ".head")
                self.unlink(fill.path)
        finally:
            close_quietly(fill.descriptor)
            fill.descriptor = None

    def finish_fill(self, digest, fill, verified):
        """Commit a verified download (fsync, its type, an atomic rename; then the lock goes)
        or discard it. Whatever fails, the fill ends: its followers and this process's next
        request must not wait for it."""
        committed = False
        try:
            committed = verified and self.commit(digest, fill)
        finally:
            self.discard_fill_files(fill)   # a committed fill's path is gone: only the lock goes
            with self.lock:
                del self.fills[digest]
                if not committed and fill.written:
                    self.stats["discarded"] += 1  # bytes came, but not the ones the digest names
            self.release(digest)
            fill.update(state="done" if committed else "failed")
        if committed:
            self.usage.add(fill.written, 1)
            self.evict()

    def commit(self, digest, fill):
        """Rename a verified fill's file into objects/, if it is still this fill's (see
        discard_fill_files): True when it is there."""
        media_type = fill.media_type if fill.kind == "manifests" else None
        descriptor = fill.descriptor
        try:
            if descriptor is None or not same_file(os.fstat(descriptor), fill.path):
                return False
            os.fsync(descriptor)
            touch(descriptor)
            if media_type:      # before the object: whoever finds the object finds its type
                self.write_file(self.type_path(digest), media_type.encode())
            os.makedirs(os.path.dirname(self.path(digest)), exist_ok=True)
            self.unlink(fill.path + ".head")
            os.rename(fill.path, self.path(digest))
            return True
        except OSError as error:
            self.pause(error)
            if media_type and not os.path.exists(self.path(digest)):
                self.unlink(self.type_path(digest))
            return False

    # --- tags ---------------------------------------------------------------------------------

    def tag(self, key):
        """The record of a tag for one Accept set, as the last process that checked it left
        it; its use makes it recent."""
        path = self.tag_path(key)
        try:
            status = os.stat(path)
        except OSError:
            return None
        identity = (status.st_ino, status.st_ctime_ns)     # a new record is a new file
        known = self.records.get(path)
        if known and known[0] == identity:
            record = known[1]
        else:
            record = read_tag_record(path, key)
            remember(self.records, path, (identity, record))
        if record and time.time() - status.st_mtime >= RECENCY_GRAIN:
            try:
                os.utime(path, ns=(time.time_ns(),) * 2)
            except OSError:
                pass
        return record

    def tag_for_any_client(self, key, accepted):
        """A record of this tag made for another Accept set, of a type this client accepts:
        during an outage a fleet of Docker and containerd nodes shares it. An index (or list)
        beats one platform's manifest, which might not be this client's platform; then the
        most recently checked record beats older ones."""
        types = set(accepted)
        fits = [record for record in self.tag_records(key)
                if record["type"] in types or not accepted or "*/*" in types]
        return max(fits, key=lambda record: (record["type"] in INDEX_TYPES, record["checked"]),
                   default=None)

    def tag_answering(self, key, accepted):
        """A record of this tag made for another Accept set that is this client's answer as
        well: of a type it accepts, and either an index or list (which a registry answers
        whoever accepts one) or a manifest answered to a client that accepted an index too
        (so the tag names no index). A prefetched tag is then a hit for Docker, containerd
        and podman alike. The most recently checked such record, kept as this client's own
        too (checked when it was), so that its next request reads one file, not them all."""
        types = set(accepted)
        fits = []
        for record in self.tag_records(key):
            made_for = set(record["key"][3].split(","))
            if (record["type"] in types or "*/*" in types) and (
                    record["type"] in INDEX_TYPES or made_for & (INDEX_TYPES | {"*/*"})):
                fits.append(record)
        best = max(fits, key=lambda record: record["checked"], default=None)
        if best is None:
            return None
        return self.remember_tag(key, best["digest"], best["type"], best["length"],
                                 best["checked"])

    def tag_records(self, key):
        """Every record of a tag, whatever the Accept set it was made for."""
        folder = os.path.dirname(self.tag_path(key))
        try:
            names = os.listdir(folder)
        except OSError:
            return []
        records = (read_tag_record(os.path.join(folder, name)) for name in names)
        return [record for record in records if record and record["key"][:3] == list(key[:3])]

    def remember_tag(self, key, digest, media_type, length, checked=None):
        record = {"version": TAG_RECORD_VERSION, "key": list(key), "digest": digest,
                  "type": media_type, "length": length,
                  "checked": time.time() if checked is None else checked}
        data = json.dumps(record).encode()
        path = self.tag_path(key)
        try:
            replaced = file_size(path)
            self.write_file(path, data)
        except OSError as error:
            self.pause(error)
            return record
        self.usage.add(len(data) - replaced)
        self.drop_extra_records(key)
        if self.usage.read()[0] > self.max_size:
            self.evict()
        return record

    def drop_extra_records(self, key):
        """One tag is kept for TAG_RECORDS_PER_TAG Accept sets at most: the least recently
        checked go."""
        records = self.tag_records(key)
        records.sort(key=lambda record: record["checked"])
        for record in records[:max(0, len(records) - TAG_RECORDS_PER_TAG)]:
            path = self.tag_path(record["key"])
            size = file_size(path)
            if remove_record(path):
                self.usage.add(-size)

    def drop_old_tag_records(self):
        """Records of an older layout (files directly under tags/): never read again."""
        folder = os.path.join(self.root, "tags")
        for name in os.listdir(folder):
            if name.endswith(".json"):
                self.unlink(os.path.join(folder, name))

    # --- the size cap, and litter -------------------------------------------------------------

    def count(self, event, amount=1):
        with self.lock:
            self.stats[event] += amount

    def figures(self):
        """The cache's figures for /metrics and the status page: the directory's size and
        objects (every process's), this process's events and downloads in progress."""
        size, objects = self.usage.read()
        with self.lock:
            return {"size": size, "max_size": self.max_size, "objects": objects,
                    "events": dict(self.stats), "fills": len(self.fills)}

    def pause(self, error):
        if time.monotonic() >= self.paused_until:
            log("cache paused for 60s, transfers go on uncached: %s"
                % (getattr(error, "strerror", None) or error))
        self.paused_until = time.monotonic() + 60
        self.count("write_errors")

    def scan(self):
        """Every object and tag record on disk: (mtime, path, size, is an object), the least
        recently used first."""
        found = []
        for top in ("objects", "tags"):
            for folder, _, names in os.walk(os.path.join(self.root, top)):
                for name in names:
                    path = os.path.join(folder, name)
                    try:
                        status = os.stat(path)
                    except OSError:
                        continue        # evicted meanwhile
                    found.append((status.st_mtime_ns, path, status.st_size, top == "objects"))
        found.sort()
        return found

    def default_cap(self):
        """80% of what the file system has for the cache: its free space, and what the cache
        holds already (else every restart of a full cache would shrink it)."""
        return int((shutil.disk_usage(self.root).free + self.usage.read()[0]) * 0.8)

    def recount(self):
        """Count the directory anew: at start, what crashes left uncounted. Under the evicting
        lock, waited for: an eviction meanwhile would make the count's change wrong."""
        guard = self.evicting_lock(wait=True)
        try:
            before = self.usage.read()
            found = self.scan()
            self.usage.add(sum(entry[2] for entry in found) - before[0],
                           sum(1 for entry in found if entry[3]) - before[1])
        finally:
            os.close(guard)

    def evicting_lock(self, wait):
        """The lock of the `evicting` file, which one process at a time holds to count the
        directory or evict: its descriptor, or None when another holds it and this one does
        not wait."""
        guard = os.open(os.path.join(self.root, "evicting"),
                        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            return guard
        except OSError:
            os.close(guard)
            if wait:
                raise
            return None

    def evict(self):
        """Down to 90% of the cap once over it, so eviction is not a per-request cost; tag
        records also down to their share of it. One process evicts at a time (the others
        go on; the next commit looks again); the least recently used go first, whichever
        process used them, and never an object that any process is reading or writing."""
        if self.usage.read()[0] <= self.max_size:
            return
        try:
            guard = self.evicting_lock(wait=False)
        except OSError:
            return
        if guard is None:
            return
        try:
            self.evict_locked()
        finally:
            os.close(guard)

    def evict_locked(self):
        before = self.usage.read()
        found = self.scan()
        size = sum(entry[2] for entry in found)
        objects = sum(1 for entry in found if entry[3])
        tag_bytes = size - sum(entry[2] for entry in found if entry[3])
        removed_size = removed = 0
        for _, path, length, is_object in found:
            over_cap = size - removed_size > self.max_size * 0.9
            if not over_cap and tag_bytes <= self.max_size * TAG_SHARE:
                break
            if not over_cap and is_object:
                continue        # only the tag records are over their share
            if not (self.remove_object(path) if is_object else remove_record(path)):
                continue
            removed_size += length
            if is_object:
                removed += 1
            else:
                tag_bytes -= length
        with self.lock:
            self.stats["evictions"] += removed
        # The count becomes what is left, plus what other processes changed meanwhile.
        self.usage.add(size - removed_size - before[0], objects - removed - before[1])

    def remove_object(self, path):
        """Evict an object unless a transfer anywhere holds it (its lock), or one of this
        process does (busy)."""
        hexdigest = os.path.basename(path)
        digest = "%s:%s" % (os.path.basename(os.path.dirname(os.path.dirname(path))), hexdigest)
        with self.lock:
            if self.busy.get(digest):
                return False
        descriptor = lock_at_once(path)
        if descriptor is None:
            return False
        try:
            if DIGEST.fullmatch(digest):    # first: an object is never found without its type
                self.unlink(self.type_path(digest))
            # A process may have fetched it again meanwhile (its type written anew, then the
            # object renamed over this one): that one stays.
            return same_file(os.fstat(descriptor), path) and self.unlink(path)
        finally:
            os.close(descriptor)

    def sweep(self):
        """Remove what processes that stopped left behind: fill files and temporary files
        whose lock nobody holds, and heads of fills that are gone. Runs at start and every
        SWEEP_AGE seconds (sweep_every)."""
        removed = 0
        old = time.time() - self.SWEEP_AGE
        for folder in ("fills", "tmp"):
            top = os.path.join(self.root, folder)
            for name in os.listdir(top):
                path = os.path.join(top, name)
                if name.endswith(".head"):
                    if not os.path.exists(path[:-5]) and file_mtime(path) < old:
                        removed += self.unlink(path)
                elif folder == "fills" or file_mtime(path) < old:
                    removed += remove_if_abandoned(path)
        if removed:
            log("cache: removed %d files left by processes that stopped" % removed)
        return removed

    def sweep_every(self, stop):
        """The sweep, every SWEEP_AGE seconds until `stop` is set (a thread of each process)."""
        while not stop.wait(self.SWEEP_AGE):
            try:
                self.sweep()
            except OSError as error:
                log("cache: sweeping failed: %s" % error, logging.WARNING)

    def write_file(self, path, data):
        """Write a whole small file under its final name, or nothing (another process or a
        crash sees the old file or the new one). Locked while written, so that no sweep
        takes it for litter."""
        descriptor, temporary = tempfile.mkstemp(dir=os.path.join(self.root, "tmp"))
        try:
            with os.fdopen(descriptor, "wb") as handle:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                os.fchmod(descriptor, 0o644)    # as objects are: other docxy users read it too
                handle.write(data)
                handle.flush()
                touch(descriptor)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                os.rename(temporary, path)
            except FileNotFoundError:   # its folder went meanwhile (a tag's last record did)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.rename(temporary, path)
        except OSError:
            self.unlink(temporary)
            raise


def read_tag_record(path, key=None):
    """A tag record from its file: this version's, and of `key` when given; else None."""
    try:
        record = json.loads(read_small(path)[0].decode("utf-8"))
        if record.get("version") == TAG_RECORD_VERSION and \
                (key is None or record["key"] == list(key)) and DIGEST.fullmatch(record["digest"]):
            return record
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    return None


def read_small(path, limit=65536):
    """A small file's bytes, and its status."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(descriptor, limit), os.fstat(descriptor)
    finally:
        os.close(descriptor)


def remember(memo, key, value):
    """Put an entry in a bounded memo, emptied whole when full (a dict's item assignment and
    clear are each atomic, so threads share it without a lock)."""
    if len(memo) >= MEMO_SIZE:
        memo.clear()
    memo[key] = value


def touch(descriptor):
    """Make a file the most recently used. The time is given, not left to the kernel, whose
    clock for file times is coarse: uses a moment apart must not tie."""
    now = time.time_ns()
    os.utime(descriptor, ns=(now, now))


def same_file(status, path):
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (status.st_dev, status.st_ino)


def file_size(path):
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def file_mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return float("inf")


def remove_if_abandoned(path):
    """Remove a file (and its head) whose lock nobody holds: its writer stopped. Removed
    while this holds the lock, and only if the path still names the file locked: else a new
    download, started meanwhile under the same name, would go."""
    descriptor = lock_at_once(path)
    if descriptor is None:
        return False
    try:
        if not same_file(os.fstat(descriptor), path):
            return False
        unlink_quietly(path + ".head")
        return unlink_quietly(path)
    finally:
        os.close(descriptor)


def lock_at_once(path):
    """Open a file and take its exclusive lock without waiting: the descriptor (the caller
    closes it, which lets go of the lock), or None when the file is gone or another open file
    holds its lock. Opened for writing: NFS grants LOCK_EX to no other."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return descriptor
    except OSError:         # held (BlockingIOError), or the lock failed
        os.close(descriptor)
        return None


def remove_record(path):
    """Remove a tag record, and its tag's folder once it holds none."""
    if not unlink_quietly(path):
        return False
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:         # other records of the tag are there
        pass
    return True


def unlink_quietly(path):
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def close_quietly(descriptor):
    """Close a descriptor; a network file system may report a late write error here, which
    changes nothing for a file being discarded or already committed."""
    try:
        os.close(descriptor)
    except OSError:
        pass


def check_locks(path):
    """Refuse a cache directory whose file system has no working flock: processes sharing it
    could not tell a download in progress from an abandoned one, nor keep an object being
    served from eviction. (A network file system that keeps flock to each host, such as NFS
    mounted with local_lock=flock, cannot be told apart from here: the README says so.)"""
    first = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    second = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return          # the second open file waits for the first: locks work
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(first)
        os.close(second)
    raise OSError(errno.ENOLCK, "its file system has no working locks (flock), which sharing "
                  "a cache directory between processes needs")


def open_cache(config):
    try:
        os.makedirs(config.cache_dir, exist_ok=True)
        cache = Cache(config.cache_dir, config.cache_max_size, config.tag_ttl)
    except OSError as error:
        raise ConfigError("cannot use --cache-dir %s: %s"
                          % (config.cache_dir, error.strerror or error))
    figures = cache.figures()
    log("cache %s: %.1f MiB in %d objects, cap %.1f MiB%s, tags trusted for %gs" % (
        config.cache_dir, figures["size"] / 1048576, figures["objects"], cache.max_size / 1048576,
        "" if config.cache_max_size else " (80% of the free space and the cache)",
        config.tag_ttl))
    return cache


# ================================================================================================
# Shared state
#
# What the threads of one process share, each piece with its own lock: a TTL map, a rate
# limiter, the metrics; what the worker processes of --workers share (WorkerShare: memory
# mapped by all, under a lock across processes); and Mirror, the one object that holds them
# all and says which lock guards what. At module level only the log's lock (LOG_LOCK) and the
# 'docxy' logger's handler (configure_logging) are shared too; nothing else changes after
# start-up.
# ================================================================================================

class ExpiringCache:
    """A bounded mapping whose entries expire: upstream tokens, verified logins. `lock`
    guards `items`."""

    def __init__(self, size):
        self.size, self.items, self.lock = size, {}, threading.Lock()

    def get(self, key):
        with self.lock:
            value, expires = self.items.get(key, (None, 0))
            if expires > time.monotonic():
                return value
            self.items.pop(key, None)
            return None

    def put(self, key, value, seconds):
        with self.lock:
            if key not in self.items and len(self.items) >= self.size:
                now = time.monotonic()
                self.items = {k: v for k, v in self.items.items() if v[1] > now}
                while len(self.items) >= self.size:
                    self.items.pop(next(iter(self.items)))
            self.items[key] = (value, time.monotonic() + seconds)


class ProcessLock:
    """A lock for every thread of every process of one server. Within a process, a
    threading.Lock; across the workers (across_processes), also a POSIX record lock (lockf) on
    an unlinked temporary file, which the kernel lets go when its holder dies, even by
    kill -9: a worker's death never leaves it held. Both are needed, as a POSIX lock excludes
    other processes, never the threads of its own. A forked process calls after_fork before
    it takes the lock."""

    def __init__(self, across_processes=False):
        self.threads, self.file = threading.Lock(), None
        if across_processes:
            import fcntl        # Unix only, as fork() is
            self.fcntl, self.file = fcntl, tempfile.TemporaryFile(prefix="docxy-lock-")

    def __enter__(self):
        self.threads.acquire()
        if self.file is not None:
            try:
                self.fcntl.lockf(self.file, self.fcntl.LOCK_EX)
            except BaseException:
                self.threads.release()
                raise
        return self

    def __exit__(self, *exc_info):
        if self.file is not None:
            self.fcntl.lockf(self.file, self.fcntl.LOCK_UN)
        self.threads.release()

    def after_fork(self):
        self.threads = threading.Lock()


PROBES = 8      # places an entry of a HashedTable may take, from its hash's on


class HashedTable:
    """A fixed table of ENTRY records, in memory every worker shares (see WorkerShare) or in a
    process's own (private): an entry, whose first field is its name's hash (0: a free place),
    is in one of PROBES places from where that hash points. The hash is keyed with a secret
    drawn at the server's start, so that no client can choose names whose entries crowd out
    another's. A subclass says which entry a full set of places gives up. `lock`, the share's,
    guards the memory. time.monotonic() is the system's, the same in every process."""

    ENTRY = None

    def __init__(self, memory, offset, count, lock, key):
        self.memory, self.offset, self.count, self.lock, self.key = memory, offset, count, lock, key

    @classmethod
    def private(cls, count):
        """A table for one process alone."""
        return cls(mmap.mmap(-1, count * cls.ENTRY.size), 0, count, threading.Lock(),
                   os.urandom(16))

    def hashed(self, name):
        digest = hashlib.blake2b(str(name).encode("utf-8", "replace"), key=self.key,
                                 digest_size=8).digest()
        return int.from_bytes(digest, "little") or 1

    def places(self, wanted):
        """Where the entry hashed `wanted` may be, in the order it is looked for."""
        start = wanted % self.count
        return [self.offset + (start + probe) % self.count * self.ENTRY.size
                for probe in range(PROBES)]


BUCKET = struct.Struct("<Qdd")  # a client network's keyed hash (0: a free place), tokens, when
BUCKETS = 65536                 # token buckets in a table: pages are taken as they are first used


class BucketTable(HashedTable):
    """Token buckets by client network (a HashedTable). When all its places are taken, a new
    bucket takes the place of one that has refilled (as good as none), else of the one counted
    longest ago."""

    ENTRY = BUCKET

    @classmethod
    def private(cls, count=BUCKETS):
        return super().private(count)

    def place(self, wanted, burst, rate, now):
        """(where, found, tokens, since): the bucket of the network hashed `wanted`, or the place
        a new one takes, given full (the lock held)."""
        choice = None
        for where in self.places(wanted):
            key, tokens, since = BUCKET.unpack_from(self.memory, where)
            if key == wanted:
                return where, True, tokens, since
            refilled = tokens + (now - since) * rate >= burst
            rank = (0, 0.0) if key == 0 else (1, 0.0) if refilled else (2, since)
            if choice is None or rank < choice[0]:
                choice = (rank, where)
        return choice[1], False, burst, now

    def take(self, network, burst, rate):
        """0 if a token was taken, else the whole seconds until one will be there."""
        wanted, now = self.hashed(network), time.monotonic()
        with self.lock:
            where, _, tokens, since = self.place(wanted, burst, rate, now)
            tokens = min(burst, tokens + (now - since) * rate)
            taken = tokens >= 1
            BUCKET.pack_into(self.memory, where, wanted, tokens - 1 if taken else tokens, now)
        return 0 if taken else max(1, int((1 - tokens) / rate + 0.999))

    def give_back(self, network, burst):
        wanted = self.hashed(network)
        with self.lock:
            where, found, tokens, since = self.place(wanted, burst, 0.0, time.monotonic())
            if found:
                BUCKET.pack_into(self.memory, where, wanted, min(burst, tokens + 1), since)


class RateLimiter:
    """A token bucket per client network (an IPv4 address, an IPv6 /64): `burst` requests
    at once, refilled at `rate` per second, whichever worker a client reaches. The buckets are
    in a BucketTable, which guards itself: the workers' shared one, or one of this limiter's
    own. Nothing else changes after it is made."""

    def __init__(self, burst, rate, table=None):
        self.burst, self.rate, self.table = burst, rate, table or BucketTable.private()
        self.rate_limit = (burst, rate)

    def wait_needed(self, address):
        """0 if the client may go on now (and it takes a token), else the seconds until it may."""
        return self.table.take(client_network(address), self.burst, self.rate)

    def give_back(self, address):
        """Return the token wait_needed took: what it was taken for turned out well."""
        self.table.give_back(client_network(address), self.burst)


# An upstream identity's entry: its keyed hash (0: a free place), the last RateLimit-Limit,
# -Remaining and window reported (-1: none), when (time.time(); 0: never),
# Docker-RateLimit-Source, until when (time.monotonic()) no manifest is asked after a 429, and
# the last backoff taken (0: none).
QUOTA = struct.Struct("<Qqqqd64sdd")
QUOTA_ENTRIES = 256
BACKOFF_FIRST, BACKOFF_MOST = 30.0, 600.0   # after a 429 without Retry-After: doubling


class UpstreamQuotas(HashedTable):
    """Each upstream identity's pull quota as its registry reports it, and the registry's
    refusals. An identity is docxy's own login at a registry: "anonymous", or the configured
    account's name (never its secret); what a client's own credentials fetch is the client's
    business and is not recorded. After a 429, docxy asks that registry for no manifest as
    that identity until its Retry-After, or without one for a backoff that starts at
    BACKOFF_FIRST and doubles with each 429 that follows, up to BACKOFF_MOST, until a manifest
    is served again. A HashedTable, so that a 429 one worker met holds every worker back; the
    names come from the configuration, and a new one finds no place only among more
    identities than a configuration has."""

    ENTRY = QUOTA
    FIELDS = ("key", "limit", "remaining", "window", "reported", "source", "until", "backoff")
    UNTIL, BACKOFF = FIELDS.index("until"), FIELDS.index("backoff")

    def __init__(self, *arguments):
        super().__init__(*arguments)
        # (registry, identity) -> where its entry is, once it has one: an entry never moves, and
        # every manifest request asks (hold), so it is looked for once per process, not hashed.
        self.known = {}

    @classmethod
    def private(cls, count=QUOTA_ENTRIES):
        return super().private(count)

    def place_of(self, registry, identity, make=False):
        """Where the identity's entry is (made if `make`, when there is room), or None."""
        at = self.known.get((registry, identity))
        if at is None:
            key = self.entry_key(registry, identity)
            with self.lock:
                at, found = self.where(key)
                if at is None or not (found or make):
                    return None
                if not found:
                    QUOTA.pack_into(self.memory, at, key, -1, -1, -1, 0.0, b"", 0.0, 0.0)
            self.known[(registry, identity)] = at
        return at

    def entry_key(self, registry, identity):
        return self.hashed("%s\0%s" % (registry, identity))

    def where(self, key):
        """(offset, found) of the key's entry, or of the free place it takes; (None, False)
        when it finds none (the lock held)."""
        for at in self.places(key):
            held = QUOTA.unpack_from(self.memory, at)[0]
            if held in (key, 0):
                return at, held == key
        return None, False

    def entry(self, registry, identity):
        """The identity's entry as a dict of FIELDS, or None."""
        at = self.place_of(registry, identity)
        if at is None:
            return None
        with self.lock:
            return dict(zip(self.FIELDS, QUOTA.unpack_from(self.memory, at)))

    def change(self, registry, identity, how):
        """Apply how(entry) to the identity's entry (a dict of FIELDS, made if new) under the
        lock, and store it; what `how` returns, or None when the table is full."""
        at = self.place_of(registry, identity, make=True)
        if at is None:
            return None
        with self.lock:
            entry = dict(zip(self.FIELDS, QUOTA.unpack_from(self.memory, at)))
            result = how(entry)
            QUOTA.pack_into(self.memory, at, *(entry[field] for field in self.FIELDS))
            return result

    def hold(self, registry, identity):
        """(seconds until docxy may ask the registry for a manifest as this identity, 0: now;
        whether a backoff is counting up, which a manifest served after the wait resets). Makes
        the entry, so that the next look finds it at once."""
        at = self.place_of(registry, identity, make=True)
        if at is None:
            return 0.0, False
        with self.lock:
            fields = QUOTA.unpack_from(self.memory, at)
        return max(0.0, fields[self.UNTIL] - time.monotonic()), fields[self.BACKOFF] > 0

    def report(self, registry, identity, limit, remaining, source):
        """The figures an answer carried: (count, window) pairs, or None for one it lacked."""
        def how(entry):
            for field, figure in (("limit", limit), ("remaining", remaining)):
                if figure:
                    entry[field] = figure[0]
                    entry["window"] = figure[1] if figure[1] else entry["window"]
            if source:
                entry["source"] = source.encode("ascii", "replace")[:64]
            entry["reported"] = time.time()
        self.change(registry, identity, how)

    def refused(self, registry, identity, retry_after):
        """A 429: (seconds to wait, whether this 429 began the wait). One that comes while the
        wait runs (a request that was in flight) neither lengthens nor doubles it."""
        now = time.monotonic()

        def how(entry):
            if entry["until"] > now:
                return entry["until"] - now, False
            if retry_after is not None:     # "0", or a date gone by: not asked again at once
                wait = max(RETRY_AFTER_LEAST, retry_after)
            else:
                wait = min(BACKOFF_MOST, entry["backoff"] * 2 or BACKOFF_FIRST)
                entry["backoff"] = wait
            entry["until"] = now + wait
            return wait, True
        return self.change(registry, identity, how) or (BACKOFF_FIRST, False)

    def served(self, registry, identity):
        """A manifest GET (a counted pull) was answered after the wait: a later 429 backs off
        from the start again."""
        now = time.monotonic()

        def how(entry):
            if entry["until"] <= now:
                entry["backoff"] = 0.0
        self.change(registry, identity, how)

    def wait(self, registry, identity):
        """Seconds until docxy may ask the registry for a manifest as this identity; 0: now."""
        return self.hold(registry, identity)[0]

    def figures(self, registries):
        """{(registry name, identity): entry} for each configured registry's identities that
        have an entry, with `wait` (seconds left of a 429's wait) added."""
        found = {}
        for registry in registries:
            for identity in sorted({"anonymous", registry.username or "anonymous"}):
                entry = self.entry(registry.name, identity)
                if entry:
                    entry["wait"] = max(0.0, entry["until"] - time.monotonic())
                    found[(registry.name, identity)] = entry
        return found


LEDGER = struct.Struct("<Qd")  # a token's keyed hash (0: a free place), until when (monotonic)
LEDGER_ENTRIES = 4096


class IssuedTokens(HashedTable):
    """The pull tokens docxy wrote itself and handed to clients (forward_pull_token), so that a
    request that shows one is known to spend docxy's own quota upstream, while one that shows
    a token of a client's own login spends the client's. A HashedTable, as a client may fetch
    its token from one worker and pull from another; a token whose places are all taken takes
    the place of the entry that expires first."""

    ENTRY = LEDGER

    @classmethod
    def private(cls, count=LEDGER_ENTRIES):
        return super().private(count)

    def add(self, authorization, seconds):
        wanted, now = self.hashed(authorization), time.monotonic()
        with self.lock:
            entries = [(LEDGER.unpack_from(self.memory, at), at) for at in self.places(wanted)]
            _, at = min(entries, key=lambda e: (e[0][0] != wanted, e[0][1] > now, e[0][1]))
            LEDGER.pack_into(self.memory, at, wanted, now + seconds)

    def __contains__(self, authorization):
        wanted, now = self.hashed(authorization), time.monotonic()
        with self.lock:
            return any(key == wanted and until > now for key, until in (
                LEDGER.unpack_from(self.memory, at) for at in self.places(wanted)))


def identity_of(registry):
    """Who docxy is at a registry when it logs in itself (see UpstreamQuotas)."""
    return registry.username or "anonymous"


# A worker's slot: its pid (0: none), the places it holds of each connection budget, which of
# the two copies of its figures that follow is the last published, and each one's length. A
# worker writes the other copy, then flips: killed halfway, it leaves the last one whole.
SLOT = struct.Struct("<qqqqqq")
SLOT_PID, SLOT_COPY, SLOT_LENGTHS = 0, 3, (4, 5)
PLACES = {"mirror": 1, "redirect": 2}   # a budget's field in the slot
FIGURES_BYTES = 256 << 10
PUBLISH_EVERY = 0.5     # seconds between a worker's publications of its figures


class WorkerShare:
    """What the processes of one server share: one anonymous shared mapping (MAP_SHARED, made
    by the supervisor before it forks, so every worker sees the others' writes, and it outlives
    any of them) holding a slot per worker (see SLOT: its pid, its places in the connection
    budgets, its last published figures), two BucketTables, for --rate-limit and for failed
    logins, the upstreams' quotas (UpstreamQuotas) and the pull tokens docxy handed out
    (IssuedTokens). `lock`, a ProcessLock, guards the mapping; `slot`, this process's (the
    first, until after_fork names another), changes only right after a fork. With one worker
    the same, with one slot, and a lock for threads only."""

    def __init__(self, workers=1):
        self.workers, self.slot = workers, 0
        try:
            self.lock = ProcessLock(across_processes=workers > 1)
        except OSError as error:
            raise ConfigError("--workers: cannot make the workers' lock file in %s: %s"
                              % (tempfile.gettempdir(), error.strerror or error))
        self.slot_bytes, table_bytes = SLOT.size + 2 * FIGURES_BYTES, BUCKETS * BUCKET.size
        slots = workers * self.slot_bytes
        quotas = slots + 2 * table_bytes
        ledger = quotas + QUOTA_ENTRIES * QUOTA.size
        self.memory = mmap.mmap(-1, ledger + LEDGER_ENTRIES * LEDGER.size)
        key = os.urandom(16)    # one for the server, drawn before any fork
        self.rate_buckets = BucketTable(self.memory, slots, BUCKETS, self.lock, key)
        self.login_buckets = BucketTable(self.memory, slots + table_bytes, BUCKETS, self.lock, key)
        self.quotas = UpstreamQuotas(self.memory, quotas, QUOTA_ENTRIES, self.lock, key)
        self.issued = IssuedTokens(self.memory, ledger, LEDGER_ENTRIES, self.lock, key)
        if workers == 1:
            self.set_field(0, SLOT_PID, os.getpid())

    def after_fork(self, slot):
        self.lock.after_fork()
        self.slot = slot

    def field(self, slot, field):
        return SLOT.unpack_from(self.memory, slot * self.slot_bytes)[field]

    def set_field(self, slot, field, value):
        at = slot * self.slot_bytes + field * 8
        self.memory[at:at + 8] = struct.pack("<q", value)

    def take_place(self, budget, capacity):
        """Take a place of a budget (a PLACES field) for this process, if the places all workers
        hold leave one."""
        with self.lock:
            if sum(self.field(slot, budget) for slot in range(self.workers)) >= capacity:
                return False
            self.set_field(self.slot, budget, self.field(self.slot, budget) + 1)
            return True

    def release_place(self, budget):
        with self.lock:
            self.set_field(self.slot, budget, self.field(self.slot, budget) - 1)

    def places(self, budget, slot=None):
        with self.lock:
            return self.field(self.slot if slot is None else slot, budget)

    def started(self, slot, pid):
        """The supervisor forked the slot's worker."""
        with self.lock:
            self.set_field(slot, SLOT_PID, pid)

    def worker_gone(self, slot):
        """The supervisor reaped the slot's worker: its connections died with it, so its places
        are free, and its gauges are no more; its counters stay, for its successor to carry on
        from (Metrics.after_fork)."""
        with self.lock:
            figures = self.read_figures(slot)
            for field in (SLOT_PID,) + tuple(PLACES.values()):
                self.set_field(slot, field, 0)
            if figures:
                figures.update(gauges={}, levels={})
                self.write_figures(slot, encode_figures(figures))

    def inherited(self, slot):
        """The figures the slot's last worker published, or None."""
        with self.lock:
            return self.read_figures(slot)

    def publish(self, figures):
        """This process's figures into its slot; False when they do not fit (the last ones that
        did stay)."""
        data = encode_figures(figures)
        with self.lock:
            return self.write_figures(self.slot, data)

    def gather(self, figures):
        """Publish this process's figures; then every worker's, these first, and how many
        workers there are now. Under one hold of the lock, so that a sum of them never goes
        back: each slot only grows, and this one is never shown above what it published."""
        data = encode_figures(figures)
        with self.lock:
            published = self.write_figures(self.slot, data)
            others = [self.figures_data(slot) for slot in range(self.workers) if slot != self.slot]
            alive = sum(1 for slot in range(self.workers) if self.field(slot, SLOT_PID))
        return [figures] + [decode_figures(data) for data in others if data], alive, published

    def figures_data(self, slot):
        copy = self.field(slot, SLOT_COPY)
        at = slot * self.slot_bytes + SLOT.size + copy * FIGURES_BYTES
        return bytes(self.memory[at:at + self.field(slot, SLOT_LENGTHS[copy])])

    def read_figures(self, slot):
        data = self.figures_data(slot)
        return decode_figures(data) if data else None

    def write_figures(self, slot, data):
        if len(data) > FIGURES_BYTES:
            return False
        copy = 1 - self.field(slot, SLOT_COPY)
        at = slot * self.slot_bytes + SLOT.size + copy * FIGURES_BYTES
        self.memory[at:at + len(data)] = data
        self.set_field(slot, SLOT_LENGTHS[copy], len(data))
        self.set_field(slot, SLOT_COPY, copy)
        return True


def encode_figures(figures):
    """Metrics.figures as JSON, for a slot: keys of (name, labels) become lists."""
    counters = figures["counters"].items()
    return json.dumps({
        "counters": [[name, labels, value] for (name, labels), value in counters],
        "durations": figures["durations"],
        "gauges": [[name, labels, value, at]
                   for (name, labels), (value, at) in figures["gauges"].items()],
        "levels": figures["levels"], "started": figures["started"]},
        separators=(",", ":")).encode()


def decode_figures(data):
    document = json.loads(data.decode())
    labelled = lambda labels: tuple(tuple(pair) for pair in labels)
    return {"counters": {(name, labelled(labels)): value
                         for name, labels, value in document["counters"]},
            "durations": document["durations"],
            "gauges": {(name, labelled(labels)): (value, at)
                       for name, labels, value, at in document["gauges"]},
            "levels": document["levels"], "started": document["started"]}


def merge_figures(everyone):
    """The whole server's figures from each worker's: counters, histograms and levels (requests
    in flight, open connections, fills) add up; a gauge that is a last report (an upstream's
    rate limit left) is the latest any worker had. The start is the server's, every worker's."""
    merged = {"counters": collections.Counter(), "durations": {}, "gauges": {},
              "levels": collections.Counter(), "started": everyone[0]["started"]}
    for figures in everyone:
        merged["counters"].update(figures["counters"])
        merged["levels"].update(figures["levels"])
        for route, cells in figures["durations"].items():
            total = merged["durations"].setdefault(route, [0] * len(cells))
            merged["durations"][route] = [a + b for a, b in zip(total, cells)]
        for key, (value, at) in figures["gauges"].items():
            if key not in merged["gauges"] or at > merged["gauges"][key][1]:
                merged["gauges"][key] = (value, at)
    return merged


def quota_gauges(quotas):
    """The upstreams' quotas (UpstreamQuotas.figures) as gauges, for /metrics."""
    gauges = {}
    for (registry, identity), entry in quotas.items():
        labels = (("registry", registry), ("identity", identity))
        for field, name in (("limit", "docxy_upstream_ratelimit_limit"),
                            ("remaining", "docxy_upstream_ratelimit_remaining"),
                            ("window", "docxy_upstream_ratelimit_window_seconds")):
            if entry[field] >= 0:
                gauges[(name, labels)] = (entry[field], 0)
        source = entry["source"].rstrip(b"\0").decode("ascii", "replace")
        if source:
            info = ("docxy_upstream_ratelimit_source_info", labels + (("source", source),))
            gauges[info] = (1, 0)
        gauges[("docxy_upstream_quota_wait_seconds", labels)] = (round(entry["wait"], 1), 0)
    return gauges


DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """Counters, gauges and request durations of this process, for /metrics (in the Prometheus
    text format) and the status page, which show them summed with the other workers' (see
    WorkerShare.gather). `lock` guards all of them; readers take copies under it. `started` is
    the server's start, kept by every worker."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = collections.Counter()       # (name, labels) -> value
        self.durations = {}                         # route -> [bucket counts..., sum, count]
        self.gauges = {}                            # (name, labels) -> (value, when it was set)
        self.started = time.time()
        self.inflight = 0                           # requests being answered now

    def after_fork(self, inherited=None):
        """A worker's own figures, from its slot's last worker's counters and histograms
        (`inherited`, Metrics.figures of it), so that none goes back when a worker is replaced;
        not from its gauges, which died with it."""
        self.lock = threading.Lock()
        self.counters, self.durations, self.gauges, self.inflight = collections.Counter(), {}, {}, 0
        if inherited:
            self.counters.update(inherited["counters"])
            self.durations = {route: list(cells) for route, cells in inherited["durations"].items()}

    def add(self, name, labels=(), value=1):
        with self.lock:
            self.counters[(name, tuple(labels))] += value

    def set(self, name, labels, value):
        with self.lock:
            self.gauges[(name, tuple(labels))] = (value, time.monotonic())

    def gauge(self, name, labels=()):
        with self.lock:
            return self.gauges.get((name, tuple(labels)), (None, 0))[0]

    def request_started(self):
        with self.lock:
            self.inflight += 1

    def request_ended(self):
        with self.lock:
            self.inflight -= 1

    def in_flight(self):
        """Requests being answered now: transfers share their buffers' budget among them.
        Read without the lock: reading an int is atomic, and a figure a moment old only sizes
        a buffer a little differently."""
        return self.inflight

    def request_done(self, route, status, sent, seconds):
        with self.lock:
            self.counters[("docxy_requests_total",
                           (("route", route), ("status", str(status))))] += 1
            self.counters[("docxy_sent_bytes_total", (("route", route),))] += sent
            cells = self.durations.setdefault(route, [0] * (len(DURATION_BUCKETS) + 2))
            for i, bound in enumerate(DURATION_BUCKETS):
                if seconds <= bound:
                    cells[i] += 1
            cells[-2] += seconds
            cells[-1] += 1

    def total(self, name, **match):
        with self.lock:
            return counter_total(self.counters, name, **match)

    def figures(self, cache_figures=None):
        """This process's figures, copied under the lock, as a worker publishes them: with the
        cache's events (Cache.figures) as counters, and its fills in flight as a level."""
        with self.lock:
            counters, gauges = collections.Counter(self.counters), dict(self.gauges)
            durations = {route: list(cells) for route, cells in self.durations.items()}
            levels = {"docxy_inflight_requests": self.inflight}
        if cache_figures:
            for event, value in cache_figures["events"].items():
                counters[cache_event_counter(event)] += value
            levels["docxy_cache_fills_in_flight"] = cache_figures.get("fills", 0)
        return {"counters": counters, "durations": durations, "gauges": gauges,
                "levels": levels, "started": self.started}

    def exposition(self, cache_figures=None):
        """This process's figures alone in the exposition format (see exposition)."""
        return exposition(self.figures(cache_figures), cache_figures)


def cache_event_counter(event):
    """The counter a cache event (Cache.figures' events) is shown as."""
    if event == "bytes_served":
        return ("docxy_cache_served_bytes_total", ())
    return ("docxy_cache_events_total", (("event", event),))


def cache_events(counters):
    """The cache's events from counters (the reverse of cache_event_counter)."""
    events = {}
    for (name, labels), value in counters.items():
        if name == "docxy_cache_served_bytes_total":
            events["bytes_served"] = value
        elif name == "docxy_cache_events_total":
            events[dict(labels)["event"]] = value
    return events


def counter_total(counters, name, **match):
    return sum(v for (n, labels), v in counters.items()
               if n == name and all(dict(labels).get(k) == w for k, w in match.items()))


def exposition(figures, cache_figures=None):
    """Figures (Metrics.figures, or merge_figures of every worker's) in the Prometheus text
    exposition format, version 0.0.4; with the cache's size figures (Cache.figures, which are
    the whole cache directory's already) when there is a cache."""
    counters = dict(figures["counters"])
    gauges = {key: value for key, (value, _) in figures["gauges"].items()}
    gauges.update(((name, ()), value) for name, value in figures["levels"].items())
    gauges[("docxy_uptime_seconds", ())] = round(time.time() - figures["started"], 3)
    if cache_figures:
        gauges[("docxy_cache_size_bytes", ())] = cache_figures["size"]
        gauges[("docxy_cache_max_size_bytes", ())] = cache_figures["max_size"]
        gauges[("docxy_cache_objects", ())] = cache_figures["objects"]
    lines = []
    for kind, table in (("counter", counters), ("gauge", gauges)):
        for name in sorted({n for n, _ in table}):
            lines += ["# HELP %s %s" % (name, METRIC_HELP.get(name, name.replace("_", " "))),
                      "# TYPE %s %s" % (name, kind)]
            lines += ["%s%s %s" % (name, prometheus_labels(labels), number(value))
                      for (n, labels), value in sorted(table.items()) if n == name]
    return "\n".join(lines + histogram_lines(figures["durations"])) + "\n"


def histogram_lines(durations):
    """docxy_request_duration_seconds, a histogram by route, in the exposition format."""
    name = "docxy_request_duration_seconds"
    lines = ["# HELP %s %s" % (name, METRIC_HELP[name]), "# TYPE %s histogram" % name]
    for route, cells in sorted(durations.items()):
        counts = cells[:len(DURATION_BUCKETS)] + [cells[-1]]
        for bound, count in zip(DURATION_BUCKETS + ("+Inf",), counts):
            labels = prometheus_labels((("route", route), ("le", str(bound))))
            lines.append("%s_bucket%s %d" % (name, labels, count))
        labels = prometheus_labels((("route", route),))
        lines.append("%s_sum%s %s" % (name, labels, number(cells[-2])))
        lines.append("%s_count%s %d" % (name, labels, cells[-1]))
    return lines


METRIC_HELP = {
    "docxy_requests_total": "Requests answered, by route class and status.",
    "docxy_sent_bytes_total": "Body bytes sent to clients, by route class.",
    "docxy_upstream_received_bytes_total": "Body bytes received from upstreams, by registry.",
    "docxy_upstream_errors_total": "Failed upstream exchanges, by registry and kind "
                                   "(connect, timeout, protocol, 429, 5xx).",
    "docxy_upstream_ratelimit_limit": "The pulls a registry allows docxy's identity there "
                                      "(RateLimit-Limit), by registry and identity.",
    "docxy_upstream_ratelimit_remaining": "The pulls a registry last said docxy's identity there "
                                          "has left (RateLimit-Remaining), by registry and "
                                          "identity.",
    "docxy_upstream_ratelimit_window_seconds": "The window the quota is counted over (;w=).",
    "docxy_upstream_ratelimit_source_info": "Whom the registry counts the pulls of "
                                            "(Docker-RateLimit-Source).",
    "docxy_upstream_quota_wait_seconds": "Seconds until docxy asks the registry for manifests "
                                         "again after a 429; 0: it asks.",
    "docxy_upstream_resumes_total": "Blob transfers asked for again from where their upstream "
                                    "connection broke, by registry.",
    "docxy_upstream_resumed_bytes_total": "Bytes that resumes did not fetch again (each "
                                          "resume's offset), by registry.",
    "docxy_inflight_requests": "Requests being answered now.",
    "docxy_open_connections": "Client connections open now: served, or waiting for their "
                               "request or for a place (--max-connections).",
    "docxy_workers": "Worker processes serving now (--workers).",
    "docxy_uptime_seconds": "Seconds since docxy started.",
    "docxy_cache_size_bytes": "Bytes held in the cache.",
    "docxy_cache_max_size_bytes": "The cache's size cap.",
    "docxy_cache_objects": "Objects held in the cache.",
    "docxy_cache_fills_in_flight": "Objects being downloaded into the cache now.",
    "docxy_cache_events_total": "Cache events: hits, misses, coalesced waits, tag hits, "
                                "revalidations and stale serves, evictions, discards, "
                                "write errors.",
    "docxy_cache_served_bytes_total": "Body bytes served from the cache.",
    "docxy_failed_logins_total": "Logins to this mirror (--users) that failed.",
    "docxy_request_duration_seconds": "Time to answer a request, by route class.",
}


def prometheus_labels(labels):
    if not labels:
        return ""
    escape = lambda value: str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{%s}" % ",".join('%s="%s"' % (key, escape(value)) for key, value in labels)


def number(value):
    return repr(float(value)) if isinstance(value, float) else str(value)


class Mirror:
    """Everything the running server shares, and who guards what:
    - config, and the routing tables made from it (by_name, by_host, default, limiter): replaced
      whole by configure() on a reload, never changed in place, so read without a lock;
    - upstream: the RegistryClient (pool, challenges, tokens, upstream health), its own locks;
    - cache (None without --cache-dir) and metrics: each guards itself with its own lock;
    - share (WorkerShare): what the workers share, the rate limiters' buckets, the budgets'
      places and the figures, under its own lock; worker: this process's number (1 to
      --workers), None when it is the only one or the supervisor;
    - logins (verified Basic logins) and failed_logins: an ExpiringCache and a RateLimiter,
      each locked inside; password_checks and login_queue: semaphores that bound PBKDF2 work;
    - budget (ConnectionBudget) and waiting (WaitingConnections): the connection lifecycle;
    - `lock` guards `connections` (socket -> handler, to close idle ones when draining);
    - stopping: set on SIGTERM, when /health starts answering 503; draining: set once docxy
      no longer accepts (see stop_serving);
    - date: (second, its Date header), a tuple replaced whole (see date_time_string).
    Made before the workers are forked; each calls after_fork first."""

    def __init__(self, config):
        self.limiter, self.worker = None, None
        self.share = WorkerShare(config.workers)
        self.figures_fit = True     # whether this process's figures fitted its slot last time
        self.metrics = Metrics()
        self.upstream = RegistryClient(config, self.metrics, self.share.quotas, self.share.issued)
        self.configure(config)
        # PBKDF2 is slow on purpose: LOGIN_HASHERS at once, LOGIN_QUEUE more waiting, and a
        # client network that failed too often is answered at once (see check_login).
        self.password_checks = threading.BoundedSemaphore(LOGIN_HASHERS)
        self.login_queue = threading.BoundedSemaphore(LOGIN_HASHERS + LOGIN_QUEUE)
        self.failed_logins = RateLimiter(*LOGIN_FAILURES, table=self.share.login_buckets)
        self.cache = open_cache(config) if config.cache_dir else None
        self.https_port = 443               # where --http-redirect sends clients
        self.budget = ConnectionBudget(config.max_connections, self.share)
        self.stopping, self.draining = threading.Event(), threading.Event()
        self.connections = {}
        self.waiting = None                 # WaitingConnections, once there are listeners
        self.listeners = []                 # (open_listeners), for /health
        self.lock = threading.Lock()
        self.date = (0, "")

    def configure(self, config):
        """Take a configuration's registries and access rules: at start, and on a reload."""
        by_name, by_host = {}, {}
        for registry in config.registries.values():
            for name in registry.names:
                by_name.setdefault(name, registry)
            for host in registry.hosts:
                by_host.setdefault(host, registry)
        public_host = urllib.parse.urlsplit(config.public_url or "").hostname
        for registry in config.registries.values():   # a registry's own name beats any alias
            by_name[registry.name] = by_host[registry.name] = registry
            if public_host and registry.short:
                by_host["%s.%s" % (registry.short, public_host)] = registry
        if not (self.limiter and self.limiter.rate_limit == config.rate_limit):
            self.limiter = config.rate_limit and RateLimiter(*config.rate_limit,
                                                             table=self.share.rate_buckets)
        self.upstream.configure(config)
        self.by_name, self.by_host, self.registries = by_name, by_host, config.registries
        self.default = config.registries[config.default_registry]
        self.logins = ExpiringCache(1024)   # digest of a client's Authorization -> user or ""
        self.config = config

    def after_fork(self, worker):
        """In a worker, right after its fork from the supervisor (which serves nothing, and
        runs no thread that could hold a lock at the fork): this process's own locks, figures
        and connections, and its slot of the share."""
        self.worker = worker
        self.share.after_fork(worker - 1)
        self.metrics.after_fork(self.share.inherited(worker - 1))
        self.lock, self.connections = threading.Lock(), {}
        self.stopping, self.draining = threading.Event(), threading.Event()
        self.logins = ExpiringCache(1024)
        self.password_checks = threading.BoundedSemaphore(LOGIN_HASHERS)
        self.login_queue = threading.BoundedSemaphore(LOGIN_HASHERS + LOGIN_QUEUE)
        if self.cache:
            self.cache.after_fork()
        self.publish_figures()      # at once: its slot shows no dead worker's gauges meanwhile

    def transfers(self):
        """Transfers under way in the whole server, as this process can tell without asking
        the others: its own, times the workers (their connections spread evenly). The buffers'
        budget and the cores that hashing beside a copy may take are the machine's, whatever
        the number of workers."""
        return self.metrics.in_flight() * self.share.workers

    def open_connections(self):
        """Client connections of this process: served, waiting for a place, or waiting (in
        WaitingConnections) for their request."""
        with self.lock:
            served = len(self.connections)
        queued = len(self.budget.queue)
        return served + queued + (self.waiting.count() if self.waiting else 0)

    def process_figures(self):
        """This process's figures (Metrics.figures) and the cache's (Cache.figures)."""
        cache = self.cache and self.cache.figures()
        figures = self.metrics.figures(cache)
        figures["levels"]["docxy_open_connections"] = self.open_connections()
        return figures, cache

    def publish_figures(self):
        """This process's figures into its slot, for the other workers' /metrics."""
        self.figures_published(self.share.publish(self.process_figures()[0]))

    def server_figures(self):
        """The whole server's figures (merge_figures) and the cache's: this process's live ones,
        published as they are shown, with every other worker's last published ones."""
        figures, cache = self.process_figures()
        everyone, workers, published = self.share.gather(figures)
        self.figures_published(published)
        figures = merge_figures(everyone)
        figures["levels"]["docxy_workers"] = workers
        figures["gauges"].update(quota_gauges(
            self.upstream.quotas.figures(self.registries.values())))
        return figures, cache

    def figures_published(self, published):
        if self.figures_fit and not published:
            log("this worker's figures outgrew their %d KiB: /metrics shows their last ones that "
                "fitted" % (FIGURES_BYTES >> 10), logging.WARNING)
        self.figures_fit = published

    def registry_for(self, ns, host, path):
        """Which registry a request is for, and its path without a registry prefix: ?ns=,
        else the Host header (`host`, without its port), else a path prefix, else the
        default registry."""
        if ns is not None:
            if ns.lower() not in self.by_name:
                raise RegistryError(404, "NAME_UNKNOWN",
                                    "this mirror does not serve that registry", ns[:200])
            return self.by_name[ns.lower()], path
        if host in self.by_host:
            return self.by_host[host], path
        if path:
            registry, name = self.registry_by_prefix(path[len("/v2/"):])
            if registry:
                return registry, "/v2/" + name
        return self.default, path

    def registry_by_prefix(self, name):
        """'ghcr.io/owner/image' -> (ghcr.io's Registry, 'owner/image'), or (None, name)."""
        first, _, rest = name.partition("/")
        # Docker's own rule: a first component is a registry if it has a dot or a port, or is
        # localhost; anything else is a Docker Hub namespace, whatever registries are named.
        hostlike = "." in first or ":" in first
        if not rest or not (first == "localhost" or hostlike and REGISTRY_NAME.fullmatch(first)):
            return None, name
        if first not in self.by_name:
            raise RegistryError(404, "NAME_UNKNOWN", "this mirror does not serve that registry",
                                first[:200])
        return self.by_name[first], rest

    def check_login(self, authorization, client):
        """The user whose Basic credentials these are, or None. Verified hashes are remembered
        briefly, so that PBKDF2 runs once per login, not once per request, and a remembered
        login never waits behind others. A login to be hashed is refused at once (RegistryError)
        when its client's network failed too often lately, or when the hashing queue is full:
        a flood of made-up logins costs the flooder, not the users."""
        if not authorization.startswith("Basic "):
            return None
        key = hashlib.sha256(authorization.encode("latin-1", "replace")).digest()
        known = self.logins.get(key)
        if known is not None:
            return known or None
        try:
            login = base64.b64decode(authorization[6:], validate=True).decode()
            name, _, password = login.partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        # A try takes a token before it is hashed, so that tries at once cannot outrun the
        # limit, and a refused one costs the client too; a good login gives it back.
        wait = self.failed_logins.wait_needed(client)
        if wait:
            raise RegistryError(429, "TOOMANYREQUESTS", "too many failed logins; try again later",
                                {"retry_after": wait}, [("Retry-After", str(wait))])
        if not self.login_queue.acquire(blocking=False):
            raise RegistryError(503, "TOOMANYREQUESTS", "too many logins at once; try again",
                                {"retry_after": 1}, [("Retry-After", "1")])
        try:
            with self.password_checks:
                ok = password_matches(password, self.config.users.get(name))
        finally:
            self.login_queue.release()
        self.logins.put(key, name if ok else "", 300 if ok else 5)
        if ok:
            self.failed_logins.give_back(client)
        else:
            self.metrics.add("docxy_failed_logins_total")
            log("%s failed to log in as %r" % (client, name[:64]))
        return name if ok else None


# ================================================================================================
# Logging
#
# One line per event on stderr, text or JSON (--log-format), each in one write; an
# AccessRecord per request for its access line.
# ================================================================================================

UNPRINTABLE = re.compile(r"[^\x20-\x7e]")     # one character class: linear
LEVEL_NAMES = {logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}
TEXT_PREFIXES = {logging.WARNING: "WARNING: ", logging.ERROR: "error: "}


def log(message, level=logging.INFO):
    """One line on stderr, in the format main() chose: 'docxy: ...' text, or a JSON object with
    --log-format json. The format lives in the handler of the 'docxy' logger, set once at
    start-up (configure_logging), so that every line of the process follows it."""
    logger = logging.getLogger("docxy")
    if logger.handlers:
        logger.log(level, "%s", message)
    else:   # docxy imported, not run: plain text, as before any configuration
        write_log_line(log_line(message, level, False))


def log_line(message, level, json_lines, created=None, worker=None):
    """A log or report line: 'docxy: [WARNING: |error: ][worker N: ]message', or a JSON object
    (with "worker": N). The worker is named in a worker process of --workers N."""
    if json_lines:
        fields = {"time": round(time.time() if created is None else created, 3),
                  "level": LEVEL_NAMES.get(level, "info"), "message": message}
        if worker:
            fields["worker"] = worker
        return json.dumps(fields, separators=(",", ":")) + "\n"
    named = "worker %d: " % worker if worker else ""
    return "docxy: %s%s%s\n" % (TEXT_PREFIXES.get(level, ""), named, UNPRINTABLE.sub("?", message))


class LogLines(logging.Handler):
    """The 'docxy' logger's one handler: each record as one line on stderr, one write(2).
    logging's own lock serialises emit(); write_log_line's LOG_LOCK the lines of all."""

    def __init__(self, json_lines, worker=None):
        super().__init__()
        self.json_lines, self.worker = json_lines, worker

    def emit(self, record):
        line = log_line(record.getMessage(), record.levelno, self.json_lines, record.created,
                        self.worker)
        write_log_line(line)


def configure_logging(log_format, worker=None):
    logger = logging.getLogger("docxy")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(LogLines(log_format == "json", worker))
    logger.setLevel(logging.INFO)
    logger.propagate = False


def report(message, log_format, prefix=""):
    """A line of a command's report on stdout (--check, prefetch): as it is, or with
    --log-format json, as a JSON object like a log line's."""
    json_lines = log_format == "json"
    line = log_line(message, logging.INFO, True) if json_lines else prefix + message + "\n"
    sys.stdout.write(line)
    sys.stdout.flush()


def log_json(fields):
    write_log_line(json.dumps(fields, separators=(",", ":")) + "\n")


ROUTE_CLASSES = {"manifests": "manifest", "blobs": "blob", "referrers": "referrers"}
PATH_CLASSES = {"/v2/": "base", "/v2": "base", "/health": "health", "/metrics": "metrics",
                "/": "status"}


def route_class(path):
    """A request's kind, for metrics: a bounded label set, whatever clients send."""
    path = path.partition("?")[0]
    match = ROUTE.fullmatch(path)
    if match:
        return ROUTE_CLASSES.get(match.group("kind"), "tags")
    return PATH_CLASSES.get(path, "token" if TOKEN_PATH.fullmatch(path) else "other")


class AccessRecord:
    """What one request did, for its access line (text or JSON) and the metrics. Filled in
    as the request goes, by its handler and, for the upstream's part, RegistryClient.fetch;
    one thread's, no lock."""

    __slots__ = ("started", "client", "method", "path", "status", "sent", "received", "user",
                 "registry", "upstream_status", "upstream_seconds", "cache", "long_transfer",
                 "resumes")

    def __init__(self):
        self.started, self.client, self.method, self.path = time.monotonic(), "-", "-", "-"
        self.status, self.sent, self.received, self.user = None, 0, 0, None
        self.registry, self.upstream_status, self.upstream_seconds = "-", "-", 0.0
        self.cache, self.long_transfer, self.resumes = "-", 0, 0

    def speed(self, seconds):
        """MiB/s, for a long transfer only."""
        if not self.long_transfer:
            return None
        return self.sent / 1048576 / max(seconds, 1e-6)

    def json_line(self, seconds):
        return json.dumps({
            "time": round(time.time(), 3), "client": self.client, "method": self.method,
            "path": self.path[:300], "status": self.status, "bytes": self.sent,
            "duration": round(seconds, 4), "upstream_status": self.upstream_status,
            "upstream_time": round(self.upstream_seconds, 4), "registry": self.registry,
            "cache": self.cache, "user": self.user, "resumes": self.resumes,
            "mib_per_second": round(self.speed(seconds), 1) if self.long_transfer else None},
            separators=(",", ":")) + "\n"

    def text_line(self, seconds):
        speed = self.speed(seconds)
        return log_line('%s "%s %s" %s %dB %.3fs%s upstream=%s%s%s%s' % (
            self.client, self.method, self.path[:300], self.status, self.sent, seconds,
            " %.1fMiB/s" % speed if speed is not None else "", self.upstream_status,
            " resumes=%d" % self.resumes if self.resumes else "",
            " user=" + self.user if self.user else "",
            " cache=" + self.cache if self.cache != "-" else ""), logging.INFO, False)


LOG_LOCK = threading.Lock()


def write_log_line(line):
    # One write(2) per line, so a pipe or journald takes each line whole. The lock matters too:
    # without it, many busy connections writing at once contend in the kernel and the slowest
    # answers wait far longer; the threads queue here instead.
    data = line.encode("utf-8", "replace")
    with LOG_LOCK:
        try:
            while data:
                data = data[os.write(2, data):]
        except OSError:
            pass


# ================================================================================================
# Request handling
#
# RequestReader and ResponseWriter are a connection's two sides; StrictRequestParser,
# UnsafeHeaderGuard and ResponseHead are mixins of one concern each; RegistryRequestHandler
# frames requests and answers errors, and MirrorHandler routes them, with one mixin per kind
# of route (relay, cache, tokens, operator pages). RedirectHandler serves the plain-HTTP port
# next to HTTPS.
# ================================================================================================

# The request line's three parts (RFC 9112 3): each one character class, matched in linear time.
REQUEST_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
REQUEST_TARGET = re.compile(rb"[\x21-\x7e]+")
HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
MAX_REQUEST_HEAD = 128 << 10    # a request line and headers; a real client's are a few KiB
MAX_REQUEST_BODY = 64 << 10     # the largest body docxy reads: a token request's form
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def body_to_wait_for(head):
    """The length of the body that must arrive with a request before a thread takes it: its
    Content-Length, when that is one number docxy would read (MAX_REQUEST_BODY at most);
    else 0, and the thread answers it (an error, or a 405 that leaves the body unread).
    Also whether the client waits for "100 Continue" before it sends the body."""
    lower = head.lower()
    if b"content-length" not in lower and b"transfer-encoding" not in lower:
        return 0, False     # most requests: no body, and a search says so
    lengths, expect, chunked = [], False, False
    for line in head.split(b"\n")[1:]:
        if line[:1] in (b" ", b"\t"):     # a folded line: the thread refuses the request
            return 0, False
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            lengths.append(value.strip())
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"expect":
            expect = value.strip().lower() == b"100-continue"
    if chunked or len(lengths) != 1 or not lengths[0].isdigit() \
            or int(lengths[0]) > MAX_REQUEST_BODY:
        return 0, False
    return int(lengths[0]), expect and int(lengths[0]) > 0


class RequestReader:
    """A client connection's incoming side: what arrived and is not read yet (`pending`),
    and reads from the socket before a deadline. It is the handler's rfile (readline, read).

    A connection reaches a thread only once a request has arrived whole (request_arrived), so
    a slow client never holds one; the thread's reads find their bytes here, and the socket is
    read only for what came after. A plain socket is read with os.read on its descriptor,
    which Python keeps non-blocking for a socket with a timeout, and waited for with poll only
    when nothing is there yet: sock.recv would poll before every read, and a deadline set with
    settimeout costs another system call each time. Each of those lets go of the GIL, and with
    many busy connections the hand-offs are what a small request costs most."""

    def __init__(self, sock, timeout, pending=b""):
        self.sock, self.timeout, self.deadline = sock, timeout, None
        self.pending = bytearray(pending)
        self.restart()
        self.fd, self.poller = sock.fileno(), None
        if not isinstance(sock, ssl.SSLSocket) and hasattr(select, "poll"):
            self.poller = select.poll()
            self.poller.register(self.fd, select.POLLIN)

    def fill(self, wait=None):
        """Add what the socket has to `pending`, waiting for it up to `wait` seconds (or the
        deadline). Returns the number of bytes, 0 at the end of the stream; socket.timeout
        when none came in time."""
        wait = self.timeout if wait is None else wait
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
        if wait <= 0:
            raise socket.timeout("request not received in time")
        if self.poller is None:
            self.sock.settimeout(wait)
            data = self.sock.recv(65536)
        else:
            give_up = time.monotonic() + wait
            while True:
                try:
                    data = os.read(self.fd, 65536)
                    break
                except BlockingIOError:
                    pass
                wait = give_up - time.monotonic()
                if wait <= 0 or not self.poller.poll(wait * 1000):
                    raise socket.timeout("timed out")
        self.pending += data
        return len(data)

    def take(self, count):
        with memoryview(self.pending) as view:
            data = bytes(view[:count])
        del self.pending[:count]
        if self.head is not None or self.scanned:
            self.restart()
        return data

    def restart(self):
        """Forget what request_arrived found: `pending` starts anew."""
        self.head = None            # where the head in `pending` ends, once found
        self.body = None            # (its body's length, whether it waits for 100 Continue)
        self.scanned = 0            # head_end found no head's end before this offset
        self.continued = False      # "100 Continue" was sent for the request in `pending`

    def readline(self, limit=-1):
        end = self.pending.find(b"\n", 0, limit if limit >= 0 else len(self.pending))
        if end >= 0:        # the usual case: the line is here
            return self.take(end + 1)
        start = 0
        while True:
            end = self.pending.find(b"\n", start, None if limit < 0 else limit)
            if end >= 0:
                return self.take(end + 1)
            if 0 <= limit <= len(self.pending):
                return self.take(limit)
            start = len(self.pending)
            if not self.fill():
                return self.take(len(self.pending))

    def read(self, count):
        while len(self.pending) < count and self.fill():
            pass
        return self.take(count)

    def take_head(self):
        """The head of the request in `pending` (its line and headers, up to the empty line),
        when it is here whole; else b"". Read from in one piece, it costs no call per line."""
        end = self.head_end()
        return self.take(end) if end is not None else b""

    def request_arrived(self):
        """Whether `pending` starts with a whole request: its head, and the body a thread
        would read (body_to_wait_for). A request docxy answers with an error at once (a TLS
        handshake on the plain port, a head too large) counts as whole. Sends "100 Continue"
        when the client waits for it before the body. Each call looks only at new bytes."""
        data = self.pending
        if data[:1] == b"\x16":
            return True
        end = self.head_end()
        if end is None:
            return len(data) > MAX_REQUEST_HEAD
        if self.body is None:
            self.body = body_to_wait_for(bytes(data[:end]))
        length, wants_continue = self.body
        if len(data) >= end + length:
            return True
        if wants_continue and not self.continued:
            self.continued = True
            self.send_continue()
        return False

    def head_end(self):
        """Where the head in `pending` ends (after its first empty line), or None. RFC 9112
        lets a line end with a bare LF, and the standard library's parser takes one. Resumes
        where the last call stopped: a client sending a byte at a time costs a byte's work."""
        if self.head is None:
            data, start = self.pending, max(self.scanned - 2, 0)
            ends = [at for at in (data.find(b"\n\r\n", start), data.find(b"\n\n", start))
                    if at >= 0]
            if not ends:
                self.scanned = len(data)
                return None
            at = min(ends)
            self.head = at + (3 if data[at + 1:at + 2] == b"\r" else 2)
        return self.head

    def send_continue(self):
        self.sock.sendall(CONTINUE)


class ResponseWriter(io.BufferedIOBase):
    """The handler's wfile. A response head waits here for the first piece of its body, and
    a small body leaves with it in one send: each send lets go of the GIL, and with many busy
    connections the hand-offs, not the bytes, cost the most. Its handler's thread's alone."""

    JOIN_LIMIT = 65536      # larger bodies are not copied to join them

    def __init__(self, sock):
        self.sock, self.head = sock, b""
        # As RequestReader reads: one write(2) where sendall would poll first.
        self.fd = None if isinstance(sock, ssl.SSLSocket) else sock.fileno()

    def writable(self):
        return True

    def write(self, data):
        if self.head:
            if len(data) <= self.JOIN_LIMIT:
                data = self.head + bytes(data)
            else:
                self.send(self.head)
            self.head = b""
        self.send(data)
        return len(data)

    def send(self, data):
        if self.fd is not None and len(data) <= self.JOIN_LIMIT:
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self.sock.sendall(data)

    def flush(self):
        if self.head:
            head, self.head = self.head, b""
            self.send(head)


class ResponseHead:
    """Handler mixin: collects a response's head itself, in place of BaseHTTPRequestHandler's
    own buffer, and hands it whole to the ResponseWriter (the handler's wfile), which sends it
    with the first piece of the body. A head sent before any status is set (an interim
    answer) goes at once: the client waits for it. A connection that closes after this answer
    says so in its head, whichever route wrote it: else a keep-alive client may send its next
    request into a closing connection (a balancer may retry it; a client fails)."""

    head_lines = ()
    status = None

    def send_response_only(self, code, message=None):
        if message is None:
            message = self.responses[code][0] if code in self.responses else ""
        self.head_lines = ["%s %d %s\r\n" % (self.protocol_version, code, message)]

    def send_header(self, keyword, value):
        self.head_lines.append("%s: %s\r\n" % (keyword, value))
        if keyword.lower() == "connection":
            if value.lower() == "close":
                self.close_connection = True
            elif value.lower() == "keep-alive":
                self.close_connection = False

    def end_headers(self):
        if self.close_connection and self.status is not None and not any(
                line[:11].lower() == "connection:" for line in self.head_lines):
            self.head_lines.append("Connection: close\r\n")
        self.head_lines.append("\r\n")
        self.wfile.head += "".join(self.head_lines).encode("latin-1", "strict")
        self.head_lines = []
        if self.status is None:
            self.wfile.flush()


class UnsafeHeaderGuard:
    """Handler mixin: a header with CR, LF or NUL in it is refused (left out, and logged). It
    would end the header early, and what follows would become headers, or a whole second
    response, of someone else's making: an upstream's, or a cached object's."""

    def send_header(self, keyword, value):
        value = str(value)
        text = keyword + value
        if "\r" in text or "\n" in text or "\0" in text:
            log("refused to send a %s header with a line break or NUL in it" % keyword[:40])
            return
        super().send_header(keyword, value)


class StrictRequestParser:
    """Handler mixin: parses a request's line and headers strictly, in place of
    BaseHTTPRequestHandler.parse_request. The line is METHOD SP TARGET SP HTTP/1.x and nothing
    else (RFC 9112 3); each header line is NAME: VALUE (5.1); an HTTP/1.1 request has exactly
    one Host (3.2). Anything else is answered 400 in HTTP/1.1, and the connection closes; the
    standard library would answer some of it in HTTP/0.9, a body with no status line, and
    would take a header line it cannot read for no header at all."""

    default_request_version = "HTTP/1.1"     # what an answer speaks before the version is known
    head_file = None    # where the head's lines are read from, when not rfile

    def parse_request(self):
        line = self.raw_requestline.rstrip(b"\r\n")
        words = line.split(b" ")
        self.requestline = line.decode("iso-8859-1")
        self.command, self.path = "-", "(malformed request line)"
        self.request_version, self.close_connection = "HTTP/1.1", True
        if len(words) != 3 or not REQUEST_METHOD.fullmatch(words[0]) \
                or not REQUEST_TARGET.fullmatch(words[1]) or not HTTP_VERSION.fullmatch(words[2]):
            return self.refuse(400, "malformed request line")
        self.command, self.path = words[0].decode("ascii"), words[1].decode("ascii")
        version = words[2].decode("ascii")
        if version[5] != "1":
            return self.refuse(505, "HTTP version %s is not supported" % version[5:])
        try:
            lines = self.head_file or self.rfile
            self.headers = read_headers(lines, self.MessageClass, strict=True)
        except http.client.LineTooLong:
            return self.refuse(431, "a header line is too long")
        except HeaderSyntaxError:
            return self.refuse(400, "malformed header line")
        except http.client.HTTPException as error:
            return self.refuse(431, str(error))
        self.request_version = version
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1 or not hosts and version != "HTTP/1.0":
            return self.refuse(400, "a request needs exactly one Host header")
        tokens = {token.strip().lower() for token in self.headers.get("Connection", "").split(",")}
        self.close_connection = "close" in tokens or (version == "HTTP/1.0"
                                                      and "keep-alive" not in tokens)
        return True

    def refuse(self, status, message):
        self.close_connection = True
        self.send_error(status, message)
        return False


class RegistryRequestHandler(StrictRequestParser, UnsafeHeaderGuard, ResponseHead,
                             http.server.BaseHTTPRequestHandler):
    """A client connection of a registry: frames its requests one by one (RequestReader,
    StrictRequestParser, frame_request, read_body), answers errors as registry JSON, and logs
    each request once (AccessRecord). A subclass overrides route(), which answers one framed
    request; it may raise RegistryError, answered here. Between requests, a connection whose
    next request is not there within PARK_AFTER goes back to WaitingConnections (`parked`).
    Its state is its own thread's; the shared kind lives in the server's Mirror."""

    protocol_version = "HTTP/1.1"
    server_version = "docxy/" + __version__

    def version_string(self):
        return self.server_version

    def setup(self):
        self.mirror = self.server.mirror
        self.connection = self.request
        self.connection.settimeout(self.mirror.config.client_timeout)
        self.peer = plain_address(self.client_address[0])
        self.peer_text = str(self.peer)
        self.reader = self.rfile = RequestReader(self.connection, self.mirror.config.client_timeout,
                                                 self.server.pending.pop(self.connection, b""))
        self.wfile = ResponseWriter(self.connection)
        self.idle = True
        with self.mirror.lock:
            self.mirror.connections[self.connection] = self

    def finish(self):
        with self.mirror.lock:
            self.mirror.connections.pop(self.connection, None)

    def handle(self):
        self.close_connection, self.parked = True, False
        self.handle_one_request()
        while not self.close_connection:
            self.quiet_since = time.monotonic()
            if not self.next_request_arrived():
                # Listener hands the socket, and what came of a next request, to
                # WaitingConnections: a slow client waits there, without a thread.
                self.parked = not self.close_connection
                return
            self.handle_one_request()

    def next_request_arrived(self):
        """Whether the next request arrived whole within PARK_AFTER. Waits in the read it needs
        anyway, so a keep-alive client that asks again at once is answered by this thread."""
        self.idle = True
        self.reader.deadline = time.monotonic() + PARK_AFTER
        try:
            while not self.reader.request_arrived():
                if not self.reader.fill():
                    self.close_connection = True
                    return False
            return True
        except socket.timeout:
            return False
        except OSError:
            self.close_connection = True
            return False

    def handle_one_request(self):
        """Read one request, answer it (route) and log it."""
        self.status, self.record = None, AccessRecord()
        self.reader.deadline = time.monotonic() + self.mirror.config.client_timeout
        self.idle = True
        tls_probe = self.reader.pending[:2] == b"\x16\x03"
        if not self.read_request_line(tls_probe):
            self.close_connection = True
            return
        self.idle = False
        self.record.started = time.monotonic()
        self.command, self.path, self.request_version = None, "-", "HTTP/1.1"
        self.client = self.client_address[0]
        metrics = self.mirror.metrics
        metrics.request_started()
        try:
            if tls_probe and not self.server.tls_context:
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
            if self.reader.poller is None:      # a TLS read may have shortened the timeout
                self.connection.settimeout(self.mirror.config.client_timeout)
            if self.mirror.stopping.is_set():    # its client had better ask another node next
                self.close_connection = True
            self.route()
        except socket.timeout:
            self.close_connection = True
        finally:
            try:
                self.wfile.flush()      # a head that no body followed (HEAD, 304, errors)
            except OSError:
                self.close_connection = True
            metrics.request_ended()
            if self.status is not None:
                self.log_access()

    def read_request_line(self, tls_probe):
        """Take the request's head from the reader (its line into raw_requestline, its header
        lines left in head_file); False when the connection ended or failed instead."""
        try:
            head = b"" if tls_probe else self.reader.take_head()
            self.head_file = io.BytesIO(head) if head else self.reader
            self.raw_requestline = b"\x16\x03" if tls_probe else self.head_file.readline(65537)
            if self.raw_requestline in (b"\r\n", b"\n"):  # one empty line before it is ignored
                self.raw_requestline = self.head_file.readline(65537)   # (RFC 9112 2.2)
        except (socket.timeout, OSError):
            return False
        return bool(self.raw_requestline)

    def route(self):
        """Answer the request just framed: self.command, self.path, self.headers."""
        raise NotImplementedError

    def frame_request(self):
        """How long the body is (RFC 9112 6.3): None for chunked, else its Content-Length (0 for
        none). A request framed two ways, or a way docxy does not know, is refused with 400,
        and the connection closes: its body cannot be told from the next request."""
        codings = ",".join(self.headers.get_all("Transfer-Encoding") or [])
        lengths = self.headers.get_all("Content-Length") or []
        try:
            if codings:
                if lengths:
                    raise ValueError("both Transfer-Encoding and Content-Length")
                if [c.strip().lower() for c in codings.split(",")] != ["chunked"]:
                    raise ValueError("a transfer coding other than chunked")
                self.body_length = None
            elif len(lengths) > 1:
                raise ValueError("more than one Content-Length")
            elif lengths and not is_number(lengths[0].strip(" \t")):
                raise ValueError("a Content-Length that is not a number")
            else:
                self.body_length = int(lengths[0]) if lengths else 0
        except ValueError as error:
            self.close_connection = True
            self.body_length = 0
            raise RegistryError(400, "UNSUPPORTED", "request framing refused: %s" % error)

    def read_body(self, wanted):
        """The request's body if `wanted` (at most MAX_REQUEST_BODY, with a Content-Length);
        else it is read and dropped (GET and HEAD, within the same limit), or left unread and
        the connection closed after the answer. Its bytes never become a request."""
        length = self.body_length
        if wanted:
            if length is None:
                self.close_connection = True
                raise RegistryError(411, "UNSUPPORTED", "the request body needs a Content-Length")
            if length > MAX_REQUEST_BODY:
                self.close_connection = True
                raise RegistryError(413, "UNSUPPORTED", "the request body is too large")
            return self.rfile.read(length)
        if length == 0:
            return b""
        if self.command in ("GET", "HEAD") and length is not None and length <= MAX_REQUEST_BODY:
            self.rfile.read(length)
            return b""
        self.close_connection = True
        if self.command in ("GET", "HEAD"):
            raise RegistryError(400, "UNSUPPORTED", "a %s request carries no body" % self.command)
        return b""      # another method gets a 405, and the connection closes with the body unread

    def send_body(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.record.sent += len(body)

    def send_json(self, status, document, extra_headers=()):
        body = json.dumps(document).encode() if not isinstance(document, bytes) else document
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.record.sent += len(body)

    def send_registry_error(self, status, code, message, detail=None, headers=()):
        extra = [("Allow", "GET, HEAD")] if status == 405 else list(headers)
        self.send_json(status, error_body(code, message, detail), extra)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, huge headers) in registry JSON too."""
        self.close_connection = True
        codes = {404: "NOT_FOUND", 405: "UNSUPPORTED", 501: "UNSUPPORTED", 505: "UNSUPPORTED"}
        phrase = message or self.responses.get(code, ("error",))[0]
        self.send_registry_error(code, codes.get(code, "BAD_REQUEST"), phrase)

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def date_time_string(self, timestamp=None):
        # Formatted once a second, not once an answer: email.utils is a cost of every answer.
        now = int(time.time() if timestamp is None else timestamp)
        second, text = self.mirror.date
        if second != now:
            text = super().date_time_string(now)
            self.mirror.date = (now, text)
        return text

    def send_header(self, keyword, value):
        if keyword.lower() == "content-length" and self.command == "GET" \
                and str(value).isdigit() and int(value) >= LONG_TRANSFER:
            self.record.long_transfer = int(value)
            self.log_transfer_start(int(value))
        super().send_header(keyword, value)

    def log_transfer_start(self, size):
        """A long transfer gets a line when it starts, and its speed in its access line."""
        if self.mirror.config.log_format == "json":
            log_json({"time": round(time.time(), 3), "event": "transfer-start",
                      "client": self.client, "method": self.command, "path": self.path[:300],
                      "bytes": size})
        else:
            log('%s "%s %s" started: %.1f MiB'
                % (self.client, self.command, self.path[:300], size / 1048576))

    def log_request(self, code="-", size="-"):
        pass    # one line per request is written by log_access, once the body is sent

    def logged_path(self):
        # A token request's query may carry a login (a refresh token): it is never logged.
        return self.path.partition("?")[0] if self.path.startswith("/auth/") else self.path

    def log_access(self):
        record, metrics = self.record, self.mirror.metrics
        record.client, record.method, record.status = self.client, self.command or "-", self.status
        record.path = self.logged_path()
        seconds = time.monotonic() - record.started
        metrics.request_done(route_class(self.path), self.status, record.sent, seconds)
        if record.received:
            metrics.add("docxy_upstream_received_bytes_total", (("registry", record.registry),),
                        record.received)
        # Straight to stderr: the logging module's records and frame walks would be a cost
        # of every request.
        json_lines = self.mirror.config.log_format == "json"
        write_log_line(record.json_line(seconds) if json_lines else record.text_line(seconds))


class UpstreamRelay:
    """Handler mixin: relays an upstream answer to the client: the client's headers that the
    upstream needs (forward_headers), the upstream's headers a client may see, a challenge's
    realm pointed at this mirror, and the body (BodyCopy), cut short on any failure so that
    it never looks complete (abort_transfer)."""

    def forward_headers(self):
        """The client's headers that the upstream needs, and nothing else."""
        headers = {"User-Agent": "%s docxy/%s" % (self.headers.get("User-Agent", "-"), __version__)}
        for name in ("Authorization", "Range", "If-None-Match", "If-Range"):
            if self.headers.get(name):
                headers[name] = self.headers[name]
        if self.mirror.config.users or headers.get("Authorization") == "Bearer " + NO_TOKEN:
            headers.pop("Authorization", None)  # that login was for docxy, not for the upstream
        accept = self.headers.get_all("Accept")
        if accept:
            headers["Accept"] = ", ".join(accept)
        return headers

    def relay(self, registry, method, url, headers, body=None, verify=None,
              rewrite_challenge=True, scope=None, resumable=False):
        """Fetch url upstream and stream the answer to the client. `resumable`: a blob, whose
        whole body, should its connection break, is asked for again from where it broke."""
        answer = self.mirror.upstream.fetch(registry, method, url, headers, self.record, body,
                                            scope)
        resume = None
        if resumable and method == "GET" and "Range" not in headers:
            resume = self.resumer(registry, url, headers, scope, answer)
        self.send_upstream(registry, method, answer, verify, rewrite_challenge,
                           ranged="Range" in headers, resume=resume)

    def resumer(self, registry, url, headers, scope, first):
        """How a blob's body goes on after its connection broke (see UpstreamBody): the same
        request again for the rest (Range: bytes=N-), through the registry as the first went,
        so that an expired token is renewed and a CDN's signed address drawn anew. Only the
        rest of the same body is taken (resume_fault); the digest check still decides."""
        length, etag = first.remaining, first.header("ETag")
        asked = {k: v for k, v in headers.items()
                 if k not in ("Range", "If-Range", "If-None-Match")}
        if etag and not etag.startswith("W/"):    # RFC 9110 13.1.5: a strong one only
            asked["If-Range"] = etag
        blob = url.rpartition("/")[2]

        def resume(offset, turn, error):
            self.record.resumes = turn     # tried, whether or not the upstream goes along
            log("resuming %s of %s at byte %d (resume %d of %d): %s%s" % (
                blob, registry.name, offset, turn, MAX_RESUMES, error.message,
                " (%s)" % error.detail if error.detail else ""))
            status = self.record.upstream_status   # the access line tells the first answer's
            try:
                answer = self.mirror.upstream.fetch(
                    registry, "GET", url, dict(asked, Range="bytes=%d-" % offset), self.record,
                    scope=scope)
            finally:
                self.record.upstream_status = status
            fault = resume_fault(answer, offset, length, etag)
            if fault:
                answer.release()    # unread: the connection closes
                raise UpstreamError(502, "upstream could not resume the body", fault)
            labels = (("registry", registry.name),)
            self.mirror.metrics.add("docxy_upstream_resumes_total", labels)
            self.mirror.metrics.add("docxy_upstream_resumed_bytes_total", labels, offset)
            return answer
        return resume

    def send_upstream(self, registry, method, answer, verify=None, rewrite_challenge=True,
                      fill=None, media_type=None, ranged=False, resume=None):
        """Stream an upstream answer to the client, and into a cache fill when given one.
        `ranged`: the request asked for a range; `resume`: see resumer. Returns True when the
        body arrived whole and verified."""
        try:
            fault = answer_fault(answer, ranged)
            if fault:
                self.mirror.upstream.count_error(registry.name, "protocol")
                raise UpstreamError(502, fault)
            headers = self.response_headers(registry, answer, rewrite_challenge)
            if media_type:
                headers = [(k, media_type if k.lower() == "content-type" else v)
                           for k, v in headers]
            has_body = method != "HEAD" and answer.status not in (204, 304) \
                and answer.status >= 200
            if has_body and verify and answer.status != 200:
                # Only a 200 carries the whole object, whatever the request asked for: a 206
                # (a Range) cannot be checked against the whole's digest, an error is no object.
                verify = None
            if not verify:
                resume = None   # what is not checked as a whole is not pieced together either
            unframed = has_body and answer.remaining is None \
                and answer.header("Content-Length") is None
            chunked = unframed and self.request_version == "HTTP/1.1"
            if chunked:
                headers.append(("Transfer-Encoding", "chunked"))
            elif unframed:      # an HTTP/1.0 client: the connection's end ends the body
                self.close_connection = self.close_delimited = True
            if fill:
                media_type = media_type or media_type_of(answer.header("Content-Type"))
                self.mirror.cache.describe(fill, answer.remaining, media_type)
            self.send_response(answer.status)
            for name, value in headers + self.cache_headers():
                self.send_header(name, value)
            self.end_headers()
            if has_body:
                return self.stream_body(answer, verify, chunked, fill, resume)
            return False
        finally:
            answer.release()

    def response_headers(self, registry, answer, rewrite_challenge):
        """The upstream's headers a client may see (and the first hop's, after a redirect);
        a challenge's realm pointed at this mirror."""
        headers = [(k, v) for k, v in answer.headers() if passes_header(k)]
        present = {k.lower() for k, _ in headers}
        headers += [(k, v) for k, v in answer.first_hop if k.lower() not in present]
        result = []
        for name, value in headers:
            lower = name.lower()
            if lower == "www-authenticate":
                if not rewrite_challenge:
                    result.append((name, value))
                    continue
                if answer.origin != registry.upstream:
                    continue
                value = self.rewrite_challenge(registry, value)
            elif lower == "link" and not value.startswith("</v2/"):
                continue
            result.append((name, value))
        return result

    def rewrite_challenge(self, registry, value):
        """Point a Bearer challenge's realm at this mirror's path for the registry, keeping
        every other parameter. With --users, clients log in to docxy, not upstream."""
        scheme, params = parse_challenge(value)
        if self.mirror.config.users:
            return 'Basic realm="docxy"'
        if scheme.lower() != "bearer":
            return value
        self.mirror.upstream.learn_challenge(registry, value)
        if registry is self.mirror.default:
            realm = self.public_base() + "/auth/token"
        else:
            realm = self.public_base() + "/auth/%s/token" % registry.name
        return format_challenge(scheme, [(k, realm if k == "realm" else v) for k, v in params])

    def stream_body(self, answer, verify, chunked, fill=None, resume=None):
        """Copy an upstream body to the client (BodyCopy: fixed-size chunks, verified when a
        digest is given, a mismatch or a broken upstream ending the connection before the body
        is complete). Returns True when the body was verified whole.

        With a cache fill, the download does not depend on this client: when it hangs up,
        the body is still read, verified and committed, for the clients following the fill
        and for the cache, only no longer sent here (see fill_goes_on)."""
        copy = BodyCopy(answer, verify, self.mirror.transfers(), resume)
        keep = fill and functools.partial(self.mirror.cache.write, fill)
        writer = ChunkedWriter(self.wfile.write) if chunked else None
        write = writer.write if writer else self.wfile.write
        self.gone = False       # the client hung up, and the download went on into the fill
        pieces, piece = copy.pieces(keep), None
        try:
            for piece in pieces:
                self.deliver(write, piece, fill)
                if self.gone and not self.fill_goes_on(fill):
                    return False    # caching paused meanwhile: nobody needs the rest
            if writer and not self.gone:
                writer.end()
            return copy.verified
        except (UpstreamError, OSError, http.client.HTTPException) as error:
            self.abort_transfer(error)
            return False
        finally:
            piece = None        # a view of a buffer: none may be left when the buffers go
            pieces.close()
            self.record.received += copy.received
            copy.close()

    def deliver(self, write, data, fill):
        """Send a piece of a body, unless the client is gone; a client that hangs up ends the
        transfer, or only its sending when the download goes on into a fill."""
        if self.gone:
            return
        try:
            write(data)
            self.record.sent += len(data)
        except OSError as error:
            if not self.fill_goes_on(fill):
                raise
            # Not kept: its traceback holds `data`, a view of a buffer to be released.
            self.gone = True
            self.abort_transfer(error)

    @staticmethod
    def fill_goes_on(fill):
        """Whether a download goes on after its client hung up: while it is being cached at
        all. Followers read the file, and so does the cache. With no follower left either it
        still goes on, to be committed: the client that hung up, like Docker after a broken
        layer download, most likely asks again, and then finds it cached (or in progress)
        instead of starting over upstream. --upstream-timeout bounds each read as before."""
        return fill is not None and fill.descriptor is not None

    # Set when a response is delimited by the connection's end (send_upstream), and once a
    # transfer was aborted; either way the connection serves no further request.
    close_delimited = aborted = False
    gone = False    # the client hung up while its download went on into a cache fill

    def abort_transfer(self, error):
        """End the connection mid-body: the client sees an error and retries. A body framed by
        Content-Length or chunked lacks bytes or its last chunk; one only the connection's end
        delimits (no Content-Length, to an HTTP/1.0 client) ends with a reset, as a FIN there
        would say "complete". Called again (the client left, then the upstream failed), it
        only counts and logs the new error."""
        # Which transfer: many run at once, and the access line comes only at its end.
        which = ' for %s "%s %s"' % (self.client, self.command, self.logged_path()[:300])
        if isinstance(error, UpstreamError):
            self.mirror.upstream.count_error(self.record.registry, error.kind)
            log("transfer aborted: %s (%s)%s" % (error.message, error.detail, which))
        elif not isinstance(error, (BrokenPipeError, ConnectionResetError)):
            log("transfer aborted: %s%s" % (error, which))
        if self.aborted:
            return
        self.close_connection = self.aborted = True
        self.record.upstream_status += "!"
        try:
            self.wfile.flush()      # a head no body went with: the client sees a body cut short
        except OSError:
            pass
        if self.close_delimited:
            reset_connection(self.connection)
            return
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


AGAIN = "again"     # a fill that ended before it was followed: look in the cache again
# How many --upstream-timeouts a follower waits for a fill's next bytes: one for its download to
# notice a stall, and for the resume two each (connect, then answer) to log in again, to ask the
# registry and to ask the CDN.
RESUME_SILENCE = 7


class ReadBackCheck:
    """The hash of an object as a follower reads it back from another process's file, piece by
    piece in order (send_file): the piece that ends the object passes only if the whole hashes
    to the digest."""

    def __init__(self, digest, length):
        algorithm, self.expected = digest.split(":")
        self.hasher, self.length, self.seen = hashlib.new(algorithm), length, 0

    def passes(self, piece):
        self.hasher.update(piece)
        self.seen += len(piece)
        return self.seen < self.length or self.hasher.hexdigest() == self.expected


class CacheRoutes:
    """Handler mixin: answers blobs and manifests from the Cache (--cache-dir): by digest
    from disk, from a download in progress (a Fill), or downloaded once while it streams to
    the client and into the cache; manifests by tag from tag records, revalidated after
    --tag-ttl and served stale when the upstream fails."""

    def serve_object(self, registry, url, name, kind, digest, headers, media_type=None):
        """A blob or a manifest by digest: from the cache, from a download in progress (in
        this process or another), or downloaded once while it streams to the client and into
        the cache."""
        cache = self.mirror.cache

        def pass_through():     # uncached, as the core proxy does
            return self.relay(registry, self.command, url, headers, verify=digest,
                              scope=login_scope(headers, name), resumable=kind == "blobs")

        for _ in range(3):      # again: committed, or its owner stopped, while this looked
            hit = cache.open(digest, kind)
            if hit:
                return self.send_cached(hit, digest, kind, "hit")
            if self.command == "HEAD" or "Range" in headers:
                return pass_through()
            claim, fill = cache.start_fill(digest, kind)
            if claim == "pass":
                return pass_through()
            if claim == "follow":
                if self.follow_fill(fill, digest, kind, pass_through) is not AGAIN:
                    return None
            elif claim == "lead":
                return self.lead_fill(fill, registry, url, name, digest, headers, media_type)
        return pass_through()

    def lead_fill(self, fill, registry, url, name, digest, headers, media_type):
        verified = False
        try:
            self.mirror.cache.count("misses")
            self.record.cache = "miss"
            verified = self.fill_from_upstream(fill, registry, url, name, digest, headers,
                                               media_type)
        finally:
            self.mirror.cache.finish_fill(digest, fill, verified)

    def fill_from_upstream(self, fill, registry, url, name, digest, headers, media_type):
        """Download into the cache with docxy's own upstream login, so that what is cached is
        what every client of this mirror may read. Content only the client's own credentials
        can read is streamed to it, and never cached."""
        own = {k: v for k, v in headers.items() if k != "Authorization"}
        scope = "repository:%s:pull" % name
        answer = self.mirror.upstream.fetch(registry, "GET", url, own, self.record, scope=scope)
        if answer.status in (401, 403) and "Authorization" in headers:
            answer.discard()
            self.record.cache = "private"
            self.relay(registry, "GET", url, headers, verify=digest, resumable=fill.kind == "blobs")
            return False
        if answer.status != 200:
            self.send_upstream(registry, "GET", answer)
            return False
        resume = self.resumer(registry, url, own, scope, answer) if fill.kind == "blobs" else None
        return self.send_upstream(registry, "GET", answer, digest, fill=fill,
                                  media_type=media_type, resume=resume)

    def follow_fill(self, fill, digest, kind, pass_through):
        """Serve a download in progress, this process's or another's, from the file as it
        grows. AGAIN when there is nothing to follow before anything was sent: committed a
        moment ago, or its owner stopped (then the next look takes it over). If it fails
        before it began otherwise (content docxy's own login may not read), fetch it as this
        client."""
        cache = self.mirror.cache
        timeout = self.mirror.config.upstream_timeout
        try:
            try:
                handle = fill.reader()
            except OSError:
                return AGAIN
            with handle:
                _, state, length = fill.wait(lambda f: f.described, timeout)
                if fill.abandoned:
                    return AGAIN
                unusable = length is None or kind == "manifests" and not fill.media_type
                if state == "failed" or unusable:
                    return pass_through()
                cache.count("coalesced")
                self.record.cache = "coalesced"
                self.send_object_headers(200, digest, kind, fill.media_type, length)
                self.send_growing_file(fill, handle, digest, length, timeout)
        except OSError as error:
            self.abort_transfer(error)
        finally:
            fill.close()
            cache.release(digest)
        return None

    def send_growing_file(self, fill, handle, digest, length, timeout):
        """The body of a fill as it is written. The last byte waits for verification, as on
        the downloading connection. What another process wrote is checked here as well, its
        last byte sent only if the whole matches: a network file system may show one host
        another's writes late or out of order. A fill may bring nothing new for a while:
        RESUME_SILENCE times `timeout` covers its download noticing a stall and resuming."""
        check = ReadBackCheck(digest, length) if isinstance(fill, ForeignFill) else None
        sent, patience = 0, timeout * RESUME_SILENCE
        while sent < length:
            written, state, _ = fill.wait(lambda f: min(f.written, f.length - 1) > sent, patience)
            ready = written if state == "done" else min(written, length - 1)
            if state == "failed" or ready <= sent:
                why = " (the process downloading it stopped)" if fill.abandoned else ""
                return self.abort_transfer(
                    UpstreamError(502, "coalesced download failed" + why, digest))
            if state == "done":     # as a hit is held: no process evicts it while it is sent
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            if not self.send_file(handle, sent, ready - sent, check):
                return self.abort_transfer(
                    UpstreamError(502, "another process's download does not match", digest))
            self.mirror.cache.count("bytes_served", ready - sent)
            sent = ready
        return None

    def serve_tag(self, registry, url, name, tag, headers):
        """A manifest by tag: a cached tag is trusted for --tag-ttl, then checked with an upstream
        HEAD (free on Docker Hub); when upstream fails, the last known manifest is served stale."""
        cache = self.mirror.cache
        accepted = manifest_accept(self.headers.get_all("Accept") or [])
        key = (registry.name, name, tag, ",".join(accepted))
        known, status = cache.tag(key) or cache.tag_answering(key, accepted), "hit"
        if not known or time.time() - known["checked"] >= cache.tag_ttl:
            # During an outage a record made for another client's Accept list will do, if this
            # client accepts its media type: a fleet of Docker and containerd nodes shares it.
            fallback = known or cache.tag_for_any_client(key, accepted)
            status = "revalidated" if known else "miss"
            known = self.check_tag(registry, url, name, tag, headers, key, fallback)
            if known is None:   # unknown, or only the client's own credentials may read it
                return self.relay(registry, self.command, url, headers,
                                  scope=login_scope(headers, name))
            if known is fallback:
                status = "stale"
        cache.count("tag_" + status)
        self.record.cache = status
        digest = known["digest"]
        if self.command == "HEAD":
            hit = cache.open(digest, "manifests")
            if hit:
                return self.send_cached(hit, digest, "manifests", status)
            return self.send_object_headers(200, digest, "manifests", known["type"],
                                            int(known["length"] or 0))
        by_digest = url.rsplit("/", 1)[0] + "/" + digest
        return self.serve_object(registry, by_digest, name, "manifests", digest, headers,
                                 known["type"])

    def check_tag(self, registry, url, name, tag, headers, key, fallback):
        """Ask the upstream (HEAD, with docxy's own login) what the tag is now: its new record;
        `fallback` when the upstream failed (or failed moments ago, see RegistryClient.is_down)
        or its quota is spent (QuotaSpent); None when the tag is not there to be shared."""
        upstream = self.mirror.upstream
        own = {k: v for k, v in headers.items() if k != "Authorization"}
        try:
            if fallback and upstream.is_down(registry):
                raise UpstreamError(503, "upstream failed moments ago")
            answer = upstream.fetch(registry, "HEAD", url, own, self.record,
                                    scope="repository:%s:pull" % name)
        except UpstreamError as error:
            if not fallback:
                raise
            # A silent upstream costs each request --upstream-timeout: wait once per half minute.
            upstream.mark_down(registry, error, "%s/%s:%s" % (registry.name, name, tag))
            return fallback
        digest = answer.header("Docker-Content-Digest", "")
        media_type = media_type_of(answer.header("Content-Type"))
        answer.discard()
        if answer.status == 200 and DIGEST.fullmatch(digest) and media_type:
            return self.mirror.cache.remember_tag(key, digest, media_type,
                                                  answer.header("Content-Length", ""))
        if fallback and answer.status >= 500:     # a 429 raised QuotaSpent in fetch
            return fallback
        return None

    def send_cached(self, hit, digest, kind, status):
        """A cache hit: HEAD, a single Range, or the whole object (zero-copy on plain HTTP)."""
        handle, size, media_type = hit
        cache = self.mirror.cache
        try:
            if status == "hit" and self.record.cache == "-":
                cache.count("hits")
                self.record.cache = "hit"
            span = parse_range(self.headers.get("Range"), size)
            start, end = span or (0, size - 1)
            extra = [("Content-Range", "bytes %d-%d/%d" % (start, end, size))] if span else []
            self.send_object_headers(206 if span else 200, digest, kind, media_type,
                                     end - start + 1, extra)
            if self.command != "HEAD":
                self.send_file(handle, start, end - start + 1)
                cache.count("bytes_served", end - start + 1)
        except OSError as error:
            self.abort_transfer(error)
        finally:
            handle.close()
            cache.release(digest)

    def send_object_headers(self, status, digest, kind, media_type, length, extra=()):
        self.send_response(status)
        self.send_header("Content-Type",
                         media_type if kind == "manifests" else "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Docker-Content-Digest", digest)
        self.send_header("ETag", '"%s"' % digest)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        for name, value in list(extra) + self.cache_headers():
            self.send_header(name, value)
        self.end_headers()

    def cache_headers(self):
        if self.record.cache == "stale":
            return [("Warning", STALE_WARNING), ("X-Docxy-Cache", "stale")]
        return [("X-Docxy-Cache", self.record.cache)] if self.record.cache != "-" else []

    def send_file(self, handle, offset, count, check=None):
        """Send part of a file: os.sendfile on plain HTTP, else fixed-size chunks (through TLS,
        or when a ReadBackCheck must see the bytes). False when the check failed: the piece
        with the object's last byte is then not sent."""
        if check is None and not self.server.tls_context and hasattr(os, "sendfile"):
            self.wfile.flush()
            self.send_file_zero_copy(handle, offset, count)
            return True
        handle.seek(offset)
        buffer = transfer_buffer(count, self.mirror.transfers())
        view = memoryview(buffer)
        try:
            while count > 0:
                n = handle.readinto(view[:min(count, len(buffer))])
                if not n:
                    raise OSError("cached object shorter than expected")
                if check and not check.passes(view[:n]):
                    return False
                self.wfile.write(view[:n])
                self.record.sent += n
                count -= n
            return True
        finally:
            view.release()
            release_buffer(buffer)

    def send_file_zero_copy(self, handle, offset, count):
        """os.sendfile, counting each piece as it goes: socket.sendfile loses the count when it
        times out, and waits for room in the socket even after the last byte went."""
        writable = select.poll()
        writable.register(self.connection.fileno(), select.POLLOUT)
        timeout = self.mirror.config.client_timeout * 1000
        while count > 0:
            try:
                sent = os.sendfile(self.connection.fileno(), handle.fileno(), offset, count)
            except BlockingIOError:     # the socket's buffer is full: wait for the client
                if not writable.poll(timeout):
                    raise socket.timeout("timed out")
                continue
            if not sent:
                raise OSError("cached object shorter than expected")
            offset, count, self.record.sent = offset + sent, count - sent, self.record.sent + sent


class TokenRoutes:
    """Handler mixin: /auth/token and /auth/<registry>/token, the token realm that this
    mirror's challenges name: a pull's token request written by docxy itself, a client's
    own login passed through."""

    def proxy_token(self, name, query):
        """/auth/<registry>/token: forward a token request to the realm that registry named.

        A scope may name another registry by prefix (repository:ghcr.io/owner/image:pull,
        after `docker pull mirror/ghcr.io/owner/image` saw docker.io's challenge): the
        request then goes to that registry's realm, without the client's credentials,
        which were meant for the first one."""
        registry = self.mirror.default if name is None else self.mirror.registries.get(name)
        if registry is None:
            raise RegistryError(404, "NAME_UNKNOWN", "this mirror does not serve that registry",
                                name[:200])
        try:
            self.forward_token_request(registry, query)
        except UpstreamError as error:
            if not self.mirror.cache:
                raise
            # The cache serves shared content with docxy's own login, whatever token a client
            # shows, so a placeholder lets clients pull cached images while the realm is down.
            log("token service of %s unreachable, handing out a placeholder: %s"
                % (registry.name, error.message))
            self.record.cache = "stale"
            self.send_json(200, {"token": NO_TOKEN, "access_token": NO_TOKEN, "expires_in": 60},
                           self.cache_headers())

    def forward_token_request(self, registry, query):
        """A client's own login (an Authorization header, or an OAuth2 password or refresh
        grant in a POST form) goes to the realm as the client wrote it, scopes renamed for
        the upstream. Anything else is a pull, and docxy writes the token request itself:
        the service the upstream's own challenge named, each repository scope cut down to pull,
        nothing else the client sent (offline_token would buy a refresh token for the
        operator's account), and no refresh token in the answer."""
        params = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if self.command == "POST":
            params = urllib.parse.parse_qsl(self.body.decode("latin-1"), keep_blank_values=True)
        # A scope parameter may hold several scopes, space-separated (OAuth2's form).
        scopes = [scope for key, value in params if key == "scope" for scope in value.split()]
        target = registry
        named = [split_scope(scope) for scope in scopes if split_scope(scope)]
        if named:
            target = self.mirror.registry_by_prefix(named[0][0])[0] or registry
        challenge = self.mirror.upstream.challenge(target, discover=True)
        if challenge is None:
            # A registry without token auth, reached by prefix after docker.io's challenge: the
            # client still wants a token. A placeholder does; docxy drops it again upstream.
            return self.send_json(200, {"token": NO_TOKEN, "access_token": NO_TOKEN,
                                        "expires_in": 300})
        renamed = self.rename_scopes(scopes, registry, target)
        headers = {"User-Agent": self.forward_headers()["User-Agent"]}
        grant = dict(params).get("grant_type") if self.command == "POST" else None
        own_login = "Authorization" in self.headers or grant in ("password", "refresh_token")
        if target is registry and own_login:
            return self.forward_client_login(target, challenge, params, renamed, headers)
        return self.forward_pull_token(target, challenge, renamed, headers)

    def rename_scopes(self, scopes, registry, target):
        """Each of the client's repository scopes for `target` (by prefix, or as `registry`'s
        own) as the target's upstream calls it: {client's scope: upstream's scope}."""
        renamed = {}
        for scope in scopes:
            if split_scope(scope):
                owner, name, actions = self.scope_owner(scope)
                if (owner or registry) is target and len(name) <= MAX_NAME \
                        and NAME.fullmatch(name):
                    name = upstream_name(name, target.library)
                    renamed[scope] = "repository:%s:%s" % (name, actions)
        return renamed

    def forward_pull_token(self, target, challenge, renamed, headers):
        """The token request docxy writes itself for a pull: the challenge's service, the scopes
        cut down to pull, the operator's login if any; the answer without a refresh token."""
        pulls = [pull_only(scope) for scope in renamed.values()]
        query = [("service", challenge["service"])] if challenge.get("service") else []
        query += [("scope", scope) for scope in pulls if scope]
        if target.username:
            headers["Authorization"] = basic_authorization(target)
        answer = self.mirror.upstream.fetch(target, "GET", with_query(challenge["realm"], query),
                                            headers, self.record)
        if answer.status != 200:
            return self.send_upstream(target, "GET", answer, rewrite_challenge=False)
        try:
            body = answer.read_small()
        finally:
            answer.release()
        given = token_answer(body)
        self.remember_pull_tokens(json.loads(given.decode()), token_of(body)[1])
        self.send_json(200, given)

    def remember_pull_tokens(self, answer, lifetime):
        """Both tokens a token answer may give (clients take either), for a little longer than
        they live, as clients use one up to its end (IssuedTokens)."""
        lifetime = min(lifetime, 3600.0) if lifetime >= 0 else 0.0     # NaN: 0
        for field in ("token", "access_token"):
            token = answer.get(field)
            if isinstance(token, str) and token:
                self.mirror.upstream.issued.add("Bearer " + token, lifetime + 60)

    def scope_owner(self, scope):
        """'repository:ghcr.io/owner/image:pull' -> (ghcr.io's Registry, 'owner/image', 'pull');
        (None, name, actions) for a name with no registry prefix."""
        name, actions = split_scope(scope)
        owner, name = self.mirror.registry_by_prefix(name)
        return owner, name, actions

    def forward_client_login(self, target, challenge, params, renamed, headers):
        """The client's own credentials buy what they buy: passed through as a `docker login`
        expects, with only the scopes renamed (and those for other registries left out)."""
        scoped = []
        for key, value in params:
            if key == "scope":
                value = " ".join(renamed.get(scope, scope) for scope in value.split()
                                 if scope in renamed or not split_scope(scope))
                if not value:
                    continue
            scoped.append((key, value))
        if "Authorization" in self.headers:
            headers["Authorization"] = self.headers["Authorization"]
        realm, body = challenge["realm"], None
        if self.command == "POST":
            body = urllib.parse.urlencode(scoped).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            url = realm
        else:
            url = with_query(realm, scoped)
        self.relay(target, self.command, url, headers, body=body, rewrite_challenge=False)


class OperatorPages:
    """Handler mixin: /metrics (Prometheus) and the status page (HTML or JSON), from the whole
    server's figures (Mirror.server_figures), copies taken under their owners' locks."""

    def send_metrics(self):
        if not in_networks(plain_address(self.client), self.mirror.config.metrics_allow):
            raise RegistryError(403, "DENIED",
                                "metrics are not served to your address (--metrics-allow)")
        body = exposition(*self.mirror.server_figures()).encode()
        self.send_body(200, "text/plain; version=0.0.4; charset=utf-8", body)

    def status_figures(self):
        """What the status page shows: live figures, nothing secret or internal."""
        figures, cache = self.mirror.server_figures()
        counters = figures["counters"]
        if cache:
            cache = status_cache_figures(dict(cache, events=cache_events(counters)))
        return {
            "version": __version__,
            "uptime_seconds": int(time.time() - figures["started"]),
            "workers": figures["levels"]["docxy_workers"],
            "requests": counter_total(counters, "docxy_requests_total"),
            "bytes_sent": counter_total(counters, "docxy_sent_bytes_total"),
            "registries": [dict(name=r.name, upstream=public_upstream(r), **status_quota(
                self.mirror.upstream.quotas.entry(r.name, identity_of(r))))
                for r in self.mirror.registries.values()],
            "login_required": bool(self.mirror.config.users),
            "cache": cache,
        }

    def send_health(self):
        """/health: 200 while this node can serve, 503 once it stops or when it cannot; as JSON
        whose `"status": "ok"` line a balancer's check can match (and whose other lines say why
        to a person). Answered to whoever asks, before access control: the details that tell
        of upstreams go to --metrics-allow clients only."""
        try:
            operator = in_networks(plain_address(self.forwarded_client()),
                                   self.mirror.config.metrics_allow)
        except RegistryError:   # an X-Forwarded-For that names no address: no details
            operator = False
        status, document = health(self.mirror, operator)
        body = json.dumps(document, indent=1).encode() + b"\n"
        self.send_json(status, body, [("Cache-Control", "no-store")])

    def send_status(self):
        figures = self.status_figures()
        try:
            figures["url"] = self.public_base()
        except RegistryError:
            figures["url"] = None
        if "text/html" in ",".join(self.headers.get_all("Accept") or []):
            page = status_page(figures, self.mirror)
            return self.send_body(200, "text/html; charset=utf-8", page.encode())
        self.send_body(200, "application/json", json.dumps(figures, indent=1).encode())


class MirrorHandler(OperatorPages, TokenRoutes, CacheRoutes, UpstreamRelay,
                    RegistryRequestHandler):
    """docxy's handler: who is asking (--allow, --trusted-proxy, --users), which registry a
    request is for, and the routes: /health, /metrics, the status page, /v2/, tokens, and
    the registry API, passed through or answered from the cache. Like its mixins, it keeps
    per-request state on itself, its thread's alone; what is shared is in self.mirror."""

    def route(self):
        path, _, query = self.path.partition("?")
        token_path = TOKEN_PATH.fullmatch(path)
        try:
            self.frame_request()
            self.body = self.read_body(self.command == "POST" and token_path is not None)
            if path == "/health" and self.command in ("GET", "HEAD"):
                return self.send_health()      # for balancers, whoever asks
            self.client = self.forwarded_client()
            if path == "/metrics" and self.command in ("GET", "HEAD"):
                return self.send_metrics()
            self.check_access(path, path == "/v2" or path.startswith("/v2/"))
            if path == "/" and self.command in ("GET", "HEAD"):
                return self.send_status()
            if self.command not in ("GET", "HEAD") and not (self.command == "POST" and token_path):
                raise RegistryError(405, "UNSUPPORTED", "this mirror is read-only", self.command)
            if path in ("/v2", "/v2/"):
                return self.proxy_base(query)
            if token_path and not self.mirror.config.users:
                return self.proxy_token(token_path.group("registry"), query)
            if path.startswith("/v2/"):
                return self.proxy_registry(path, query)
            raise RegistryError(404, "NOT_FOUND", "no such endpoint", path[:200])
        except RegistryError as error:
            self.send_registry_error(error.status, error.code, error.message, error.detail,
                                     error.headers)
        except QuotaSpent as error:     # logged once, when the 429 came (note_quota)
            self.send_registry_error(
                429, "TOOMANYREQUESTS", error.message,
                {"registry": self.record.registry, "retry_after": int(error.retry_after())},
                [("Retry-After", error.retry_after())])
        except UpstreamError as error:
            log("upstream error from %s: %s (%s)"
                % (self.record.registry, error.message, error.detail))
            # The error's detail can name the CDN a redirect led to: it is for the operator's log
            # only. The client learns which registry failed, and how.
            cause = upstream_cause(error, self.mirror.config.upstream_timeout)
            self.send_registry_error(error.status, "UNAVAILABLE", error.message,
                                     {"registry": self.record.registry, "cause": cause})

    def trusted_peer(self):
        return in_networks(self.peer, self.mirror.config.trusted_proxy)

    def forwarded_client(self):
        """The client's address (client_address): the TCP peer's, or from X-Forwarded-For."""
        if not self.trusted_peer():
            return self.peer_text
        return client_address(self.peer, self.headers.get_all("X-Forwarded-For") or [],
                              self.mirror.config.trusted_proxy)

    def check_access(self, path, registry_request):
        """--allow, then --users: refused clients never cause an upstream request."""
        allow = self.mirror.config.allow
        if allow and not in_networks(plain_address(self.client), allow):
            raise RegistryError(403, "DENIED", "this mirror does not serve your address",
                                self.client)
        if self.mirror.config.users and registry_request:
            login = self.headers.get("Authorization", "")
            self.record.user = self.mirror.check_login(login, self.client)
            if not self.record.user:
                raise RegistryError(401, "UNAUTHORIZED", "log in to this mirror (docker login)",
                                    None, [("WWW-Authenticate", 'Basic realm="docxy"')])

    def registry_for(self, query, path=None):
        """Which registry a request is for (Mirror.registry_for), and the path without its
        prefix."""
        ns = dict(urllib.parse.parse_qsl(query)).get("ns")
        host = None if ns is not None else without_port(self.public_host() or "").lower()
        registry, path = self.mirror.registry_for(ns, host, path)
        self.record.registry = registry.name
        return registry, path

    def proxy_base(self, query):
        """GET /v2/: the version check, whose challenge tells clients where to get tokens."""
        if self.mirror.config.users:    # the login was checked already; upstream logins are docxy's
            return self.send_json(200, {})
        registry, _ = self.registry_for(query)
        upstream, cache = self.mirror.upstream, self.mirror.cache
        if cache and upstream.answered_lately(registry):
            self.record.cache = "hit"
            return self.send_ping(registry)
        if cache and upstream.is_down(registry):    # failed moments ago: not asked again
            self.record.cache = "stale"
            return self.send_ping(registry)
        try:
            self.relay(registry, self.command, origin_url(registry.upstream) + "/v2/",
                       self.forward_headers())
        except UpstreamError as error:
            if not cache:
                raise
            upstream.mark_down(registry, error, "/v2/")
            self.record.cache = "stale"
            return self.send_ping(registry)
        if cache and self.status in (200, 401):
            upstream.answered(registry)

    def send_ping(self, registry):
        """/v2/ without asking upstream (cache mode): the challenge it gave last, or none, in
        which case clients skip the token dance and pull what the cache holds."""
        challenge = self.mirror.upstream.challenge(registry)
        if challenge:
            header = self.rewrite_challenge(
                registry, format_challenge("Bearer", list(challenge.items())))
            return self.send_registry_error(401, "UNAUTHORIZED", "authentication required", None,
                                            [("WWW-Authenticate", header)] + self.cache_headers())
        self.send_json(200, {}, self.cache_headers())

    def proxy_registry(self, path, query):
        registry, path = self.registry_for(query, path)
        upstream_path, name, kind, ref = parse_registry_path(path, query, registry.library)
        if kind == "manifests" and self.mirror.limiter:
            wait = self.mirror.limiter.wait_needed(self.client)
            if wait:
                raise RegistryError(429, "TOOMANYREQUESTS", "too many manifest requests; slow down",
                                    {"retry_after": wait}, [("Retry-After", str(wait))])
        verify = ref if kind in ("blobs", "manifests") and DIGEST.fullmatch(ref or "") else None
        headers = self.forward_headers()
        if kind == "manifests":     # what the tag records are keyed by, and nothing else
            headers.pop("Accept", None)
            accepted = manifest_accept(self.headers.get_all("Accept") or [])
            if accepted:
                headers["Accept"] = ", ".join(accepted)
        scope = login_scope(headers, name)
        url = origin_url(registry.upstream) + upstream_path
        if self.mirror.cache and verify:
            return self.serve_object(registry, url, name, kind, verify, headers)
        if self.mirror.cache and kind == "manifests":
            return self.serve_tag(registry, url, name, ref, headers)
        self.relay(registry, self.command, url, headers, verify=verify, scope=scope,
                   resumable=kind == "blobs")

    def public_host(self):
        """The host clients address: the Host header, or X-Forwarded-Host from a trusted proxy."""
        host = self.headers.get("Host", "")
        forwarded = self.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
        if forwarded and self.trusted_peer():
            host = forwarded
        return host if valid_host_header(host) else None

    def public_base(self):
        if self.mirror.config.public_url:
            return self.mirror.config.public_url
        host = self.public_host()
        if not host:
            raise RegistryError(400, "UNSUPPORTED", "missing or invalid Host header; "
                                "set --public-url to serve clients that send none")
        scheme = "https" if self.server.tls_context else "http"
        proto = self.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https") and self.trusted_peer():
            scheme = proto
        return "%s://%s" % (scheme, host)


STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>docxy registry mirror</title>
<style>
*{box-sizing:border-box}
body{font:16px/1.5 system-ui,sans-serif;margin:0 auto;max-width:52rem;padding:1rem;color:#222}
h1{font-size:1.5rem;margin:.5rem 0}h2{font-size:1.1rem;margin-top:1.6rem}
pre{background:#f4f4f4;padding:.7rem;border-radius:4px;font-size:.85rem;white-space:pre-wrap;
overflow-wrap:anywhere;max-width:100%%;overflow-x:auto}
code{overflow-wrap:anywhere}td,th{overflow-wrap:break-word}
.registries{overflow-x:auto}
table{border-collapse:collapse;width:100%%}
td,th{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #ddd}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(9rem,1fr));gap:.5rem}
.figures div{background:#f4f4f4;border-radius:4px;padding:.5rem .8rem;min-width:0}
.figures b{display:block;font-size:1.3rem}small{color:#666}
</style></head><body>
<h1>docxy registry mirror</h1>
<p>This server is a pull-through mirror of the container registries below, at <code>%(url)s</code>.
Point your container runtime at it; pulls then come through here%(login)s.</p>
<div class="figures"><div><b>%(uptime)s</b>uptime</div><div><b>%(requests)s</b>requests</div>
<div><b>%(sent)s</b>sent</div>%(cache_figures)s</div>
<h2>Registries</h2><div class="registries"><table>
<tr><th>name</th><th>upstream</th><th>pull quota</th></tr>%(registries)s</table></div>
<h2>Docker</h2><p><code>/etc/docker/daemon.json</code> (Docker Hub images), then restart Docker:</p>
<pre>{
  "registry-mirrors": ["%(url)s"]%(insecure)s
}</pre>
<p>Or pull straight from the mirror:</p><pre>docker pull %(host)s/library/busybox
docker pull %(host)s/%(other)s/owner/image:tag</pre>
<h2>containerd and Kubernetes nodes</h2>
<p><code>/etc/containerd/certs.d/docker.io/hosts.toml</code> on each node
(likewise a folder per registry, e.g. <code>certs.d/ghcr.io</code>
with its own <code>server</code>):</p>
<pre>server = "https://registry-1.docker.io"
[host."%(url)s"]
  capabilities = ["pull", "resolve"]</pre>
<p>containerd reads these files when its CRI config has
<code>config_path = "/etc/containerd/certs.d"</code>.</p>
<h2>podman</h2><p><code>/etc/containers/registries.conf</code>:</p>
<pre>[[registry]]
prefix = "docker.io"
location = "docker.io"
[[registry.mirror]]
location = "%(host)s"%(podman_insecure)s</pre>
<p><small>docxy %(version)s &middot; <a href="/health">health</a> &middot;
figures as JSON: send <code>Accept: application/json</code></small></p>
</body></html>
"""


def status_page(figures, mirror):
    escape = html.escape
    url = figures["url"] or "http://this-mirror:5000"
    host = urllib.parse.urlsplit(url).netloc
    cache = figures["cache"]
    cache_figures = "" if not cache else (
        "<div><b>%s</b>cache of %s</div><div><b>%.0f%%%%</b>cache hits</div>"
        % (human_bytes(cache["size_bytes"]), human_bytes(cache["max_size_bytes"]),
           cache["hit_ratio"] * 100))
    rows = "".join("<tr><td>%s</td><td>%s</td><td>%s</td></tr>" % (
        breakable(r["name"]), breakable(r["upstream"]), quota_text(r))
        for r in figures["registries"])
    others = [r["name"] for r in figures["registries"] if r["name"] != mirror.default.name]
    login = " (log in first: <code>docker login %s</code>)" % escape(host)
    uptime = figures["uptime_seconds"]
    plain = url.startswith("http:")
    return (STATUS_PAGE % {
        "url": escape(url), "host": escape(host), "version": escape(figures["version"]),
        "login": login if figures["login_required"] else "",
        "uptime": "%dd %dh %dm" % (uptime // 86400, uptime // 3600 % 24, uptime // 60 % 60),
        "requests": figures["requests"], "sent": human_bytes(figures["bytes_sent"]),
        "cache_figures": cache_figures, "registries": rows,
        "other": escape(others[0] if others else "ghcr.io"),
        "insecure": ',\n  "insecure-registries": ["%s"]' % escape(host) if plain else "",
        "podman_insecure": "\ninsecure = true" if plain else "",
    }).replace("%%", "%")


def status_quota(entry):
    """What the status page tells of docxy's quota at a registry (UpstreamQuotas.entry):
    the figures its registry last reported, and the wait after a 429; None where unknown."""
    known = lambda value: value if entry and value >= 0 else None
    wait = entry and max(0.0, entry["until"] - time.monotonic())
    return {"ratelimit_remaining": known(entry and entry["remaining"]),
            "ratelimit_limit": known(entry and entry["limit"]),
            "ratelimit_window_seconds": known(entry and entry["window"]),
            "retry_in_seconds": int(wait + 0.999) if wait else None}


def quota_text(registry):
    """'76 of 100 pulls left in this 6 h window', from a registry's status figures, and the
    wait after a 429."""
    left, limit = registry["ratelimit_remaining"], registry["ratelimit_limit"]
    texts = []
    if left is not None:
        texts.append("%d of %d pulls left" % (left, limit) if limit is not None
                     else "%d pulls left" % left)
        window = registry["ratelimit_window_seconds"]
        if window:
            unit = next((u for u in ((3600, "h"), (60, "min"), (1, "s")) if window % u[0] == 0))
            texts[0] += " in this %d %s window" % (window // unit[0], unit[1])
    if registry["retry_in_seconds"]:
        texts.append("refused (429): asking again in %d s" % registry["retry_in_seconds"])
    return "; ".join(texts) or "&ndash;"


def public_upstream(registry):
    """A registry's upstream as the status page shows it: a preset's is public knowledge; a
    custom one may be internal."""
    url = origin_url(registry.upstream)
    preset = PRESETS.get(registry.name)
    return url if preset and url == preset[0] else "(private)"


def health(mirror, operator):
    """(status, document) of /health. Draining (after SIGTERM) or unhealthy, 503: a listener
    stopped accepting, or the cache directory takes no writes. An upstream that fails is told
    but keeps the node in: every node shares it, and cached content is still served. Which
    registries this node asks, and how they fare, is for an `operator` (--metrics-allow) only:
    anyone may ask /health."""
    problems = []
    if mirror.stopping.is_set():
        problems.append("stopping: take this node out of rotation")
    problems += ["not accepting connections on port %d" % listener.server_address[1]
                 for listener in mirror.listeners if not listener.accepting()]
    cache_problem = mirror.cache and mirror.cache.write_probe.check()
    if cache_problem:
        problems.append("the cache directory takes no writes: %s" % cache_problem)
    status = "draining" if mirror.stopping.is_set() else "unhealthy" if problems else "ok"
    document = {"status": status, "problems": problems,
                "cache": None if not mirror.cache else {"writable": not cache_problem}}
    if operator:
        now = time.time()
        document.update({
            "upstreams": {name: mirror.upstream.last_contact(registry, now)   # since start
                          for name, registry in mirror.registries.items()
                          if name in mirror.upstream.contacts},
            "worker": mirror.worker,
            "version": __version__,
        })
    return (200 if status == "ok" else 503), document


def status_cache_figures(figures):
    """The cache's part of the status page. Hits are answers that cost the upstream nothing;
    misses fetched or checked upstream."""
    events = collections.Counter(figures["events"])
    hits = sum(events[e] for e in ("hits", "tag_hit", "coalesced", "tag_stale"))
    misses = sum(events[e] for e in ("misses", "tag_miss", "tag_revalidated"))
    return {"size_bytes": figures["size"], "max_size_bytes": figures["max_size"],
            "objects": figures["objects"], "hit_ratio": round(hits / max(1, hits + misses), 3),
            "bytes_served": events["bytes_served"], "stale_serves": events["tag_stale"]}


def breakable(text):
    """HTML for a host name or URL that a narrow screen may break after a dot or a slash, and
    nowhere else: registry.k8s.io, never registry.k8 / s.io."""
    return html.escape(text).replace(".", ".<wbr>").replace("/", "/<wbr>")


def human_bytes(count):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (count, unit)
        count /= 1024


ACME_PREFIX = "/.well-known/acme-challenge/"
ACME_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")     # one bounded run: linear


class RedirectHandler(StrictRequestParser, UnsafeHeaderGuard, ResponseHead,
                      http.server.BaseHTTPRequestHandler):
    """The plain-HTTP listener next to HTTPS: every request is sent to the https:// URL, but
    for ACME HTTP-01 challenge files (--acme-webroot). One request a connection; no state of
    its own beyond the request's."""

    protocol_version = "HTTP/1.1"
    server_version = MirrorHandler.server_version
    version_string = MirrorHandler.version_string

    def setup(self):
        # One request a connection, read whole in WaitingConnections before this thread took
        # it: slow clients on port 80 never hold a place of this listener's small budget
        # (REDIRECT_CONNECTIONS), and never one of the mirror's.
        self.connection = self.request
        timeout = self.server.mirror.config.client_timeout
        self.connection.settimeout(timeout)
        pending = self.server.pending.pop(self.connection, b"")
        self.rfile = RequestReader(self.connection, timeout, pending)
        self.rfile.deadline = time.monotonic() + timeout
        self.wfile = ResponseWriter(self.connection)

    def handle(self):
        self.close_connection = True
        self.handle_one_request()

    def do_GET(self):
        mirror = self.server.mirror
        if self.path.startswith(ACME_PREFIX) and mirror.config.acme_webroot:
            return self.send_acme_file(mirror.config.acme_webroot, self.path[len(ACME_PREFIX):])
        if mirror.config.public_url:
            base = mirror.config.public_url
        else:
            host = self.headers.get("Host", "")
            if not valid_host_header(host):
                return self.send_error(400, "missing or invalid Host header")
            host = without_port(host)
            port = mirror.https_port
            base = "https://" + host + ("" if port == 443 else ":%d" % port)
        path = self.path if self.path.startswith("/") else "/"
        self.send_response(301)
        self.send_header("Location", base + path)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    do_HEAD = do_GET

    def send_acme_file(self, webroot, token):
        """An HTTP-01 challenge file, for webroot renewals while docxy holds port 80. Only
        token-shaped names: no path can leave the challenge folder."""
        body = None
        if ACME_TOKEN.fullmatch(token):
            try:
                path = os.path.join(webroot, ".well-known", "acme-challenge", token)
                with open(path, "rb") as handle:
                    body = handle.read(65536)
            except OSError:
                pass
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        log('%s "%s %s" %s redirect'
            % (self.client_address[0], self.command, self.path[:300], code))

    def log_message(self, format, *args):
        log("%s %s" % (self.client_address[0], format % args))


# ================================================================================================
# Server: listeners, waiting connections, the connection budget
#
# A connection waits in WaitingConnections (one selector, no thread) until a request has
# arrived whole; then ConnectionBudget gives it one of --max-connections threads (Listener).
# ================================================================================================

PARK_AFTER = 0.5    # seconds of silence before a keep-alive connection gives up its thread
REDIRECT_CONNECTIONS = 16   # the --http-redirect listener's own budget of connections at once
MAX_QUEUED = 4096           # whole requests waiting for a thread; past that, 503 at once
QUEUE_POLL = 0.02           # seconds between looks for a place another worker let go
WAITING_BYTES = 64 << 20    # what all waiting connections may hold of their requests together


def open_file_limit():
    """Raise the soft limit on open files to the hard one (capped at 65536), as Go and nginx
    setups do; parked connections are bounded by what is left. Returns the limit."""
    try:
        import resource     # Unix only
    except ImportError:
        return 2048
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return 65536 if soft == resource.RLIM_INFINITY else soft


def parking_capacity(config):
    # Descriptors the rest needs: each served client and its upstream connection, the
    # upstream pool, and some for listeners, cache files and logs.
    return max(16, open_file_limit() - 2 * config.max_connections - IDLE_TOTAL - 64)


def plain_answer(status, reason, message):
    """A complete response, written before any handler exists: always HTTP/1.1 with a status
    line and a registry-style JSON body, and the connection closes after it."""
    body = error_body("UNSUPPORTED" if status != 408 else "TIMEOUT", message)
    head = "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" \
           "Connection: close\r\n\r\n" % (status, reason, len(body))
    return head.encode() + body


def answer_and_close(sock, data):
    """Best effort: the socket is non-blocking, and a small answer fits its buffer. Writing is
    shut first, so what the client still sends does not turn the close into a reset."""
    try:
        sock.send(data)
        sock.shutdown(socket.SHUT_WR)
    except (OSError, ValueError):
        pass
    sock.close()


class Waiting:
    """A connection in WaitingConnections: its listener and address, its descriptor (the
    selector's key, the same before and after a TLS wrap), when it went quiet (or was
    accepted), when the request it is sending began, and what came of it so far. Only the
    selector's thread touches it."""

    __slots__ = ("listener", "address", "fd", "quiet_since", "started", "reader", "handshaking")

    def __init__(self, listener, address, quiet_since, reader, handshaking):
        self.listener, self.address, self.reader = listener, address, reader
        self.fd = reader.sock.fileno()
        self.quiet_since = self.started = quiet_since
        self.handshaking = handshaking


class WaitingConnections:
    """Connections that have no whole request yet, held in one selector instead of a thread
    each: new connections, keep-alive ones between requests, and slow ones. Here a TLS
    handshake is made and a request (head, and the small body docxy reads) is collected as
    its bytes come, so a client that trickles its request never holds one of the
    --max-connections threads: a whole request waits only for whole requests before it.

    A thread waiting in a read also holds its stack and, over TLS, OpenSSL's state in its own
    malloc arena. A request whole goes to its listener (Listener.admit). One not whole within
    --client-timeout of its start gets 408; a connection silent for --client-timeout between
    requests is closed, and so is the longest-quiet one when more wait than there are file
    descriptors for, or the one holding most when all hold more than WAITING_BYTES. The lock
    guards the selector's registrations and `held`; only the selector's thread reads."""

    def __init__(self, timeout, capacity):
        self.timeout, self.capacity = timeout, capacity
        self.selector = None
        self.lock = threading.Lock()
        self.held = 0           # bytes of requests the waiting connections hold

    def start(self):
        """Wait in the process that serves: a worker's selector must be its own, never one
        inherited from the supervisor (an epoll set survives a fork, shared)."""
        self.selector = selectors.DefaultSelector()
        threading.Thread(target=self.run, name="waiting", daemon=True).start()

    def count(self):
        with self.lock:
            return len(self.selector.get_map()) if self.selector else 0

    def add(self, listener, sock, address, quiet_since=None, pending=b"", continued=False):
        """A new connection, or (with quiet_since) a keep-alive one that went quiet, with what
        came of its next request (and whether "100 Continue" went out for it). A TLS
        connection is new until its handshake is made."""
        now = time.monotonic()
        handshaking = listener.tls_context is not None and not isinstance(sock, ssl.SSLSocket)
        reader = RequestReader(sock, self.timeout, pending)
        reader.continued = continued
        entry = Waiting(listener, address, quiet_since or now, reader, handshaking)
        if pending:
            entry.started = now
        sock.setblocking(False)
        oldest = None
        with self.lock:
            keys = self.selector.get_map()
            if len(keys) >= self.capacity:  # full: the longest-quiet client reconnects when it must
                oldest = min(keys.values(), key=lambda key: key.data.quiet_since).data
                self.forget(oldest)
            self.selector.register(entry.fd, selectors.EVENT_READ, entry)
            self.held += len(pending)
        if oldest:
            oldest.reader.sock.close()

    def forget(self, entry):
        """Unregister a connection (the lock held)."""
        self.selector.unregister(entry.fd)
        self.held -= len(entry.reader.pending)

    def run(self):
        next_expiry = time.monotonic() + 1
        while True:
            try:
                # epoll sees sockets registered while it waits; a select()-based selector sees
                # them at the next turn, a second later at most
                for key, _ in self.selector.select(1.0):
                    self.serve(key.data)
                if time.monotonic() >= next_expiry:     # once a second: it looks at them all
                    next_expiry = time.monotonic() + 1
                    self.expire()
            except Exception as error:     # a defect here must not stop every client's service
                log("waiting connections: %r" % (error,), logging.ERROR)

    def serve(self, entry):
        try:
            self.read(entry)
        except Exception as error:     # this client, not all
            log("%s: %r" % (entry.address[0], error), logging.ERROR)
            self.close(entry)

    def read(self, entry):
        if entry.handshaking and not self.handshake(entry):
            return
        reader, sock = entry.reader, entry.reader.sock
        try:
            while len(reader.pending) <= MAX_REQUEST_HEAD + MAX_REQUEST_BODY:
                data = sock.recv(65536)
                if not data:
                    return self.close(entry)
                if not reader.pending:
                    entry.started = time.monotonic()
                reader.pending += data
                with self.lock:
                    self.held += len(data)
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()) and len(data) < 65536:
                    break
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except OSError:
            return self.close(entry)
        if reader.request_arrived():
            self.hand_over(entry)
        elif self.held > WAITING_BYTES:
            self.shed()

    def handshake(self, entry):
        """Move a TLS connection's handshake on; True once it is made. Plain HTTP sent to the
        HTTPS port gets a readable 400, as nginx gives, not a reset."""
        sock = entry.reader.sock
        if not isinstance(sock, ssl.SSLSocket):
            first = sock.recv(1, socket.MSG_PEEK)
            if first != b"\x16":
                if first:
                    self.refused(entry, 400, "plain HTTP sent to the HTTPS port")
                    self.forget_locked(entry)
                    answer_and_close(sock, plain_answer(400, "Bad Request",
                                                        "this port speaks HTTPS"))
                    return False
                return self.close(entry)
            self.forget_locked(entry)      # first: a failed wrap closes the descriptor
            try:
                tls = entry.listener.tls_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError) as error:
                sock.close()    # unless the wrapped socket took the descriptor and closed it
                return self.handshake_failed(entry, error)
            entry.reader.sock = sock = tls
            with self.lock:
                self.selector.register(entry.fd, selectors.EVENT_READ, entry)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            return self.wait_for(entry, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            return self.wait_for(entry, selectors.EVENT_WRITE)
        except (OSError, ValueError) as error:
            self.close(entry)
            return self.handshake_failed(entry, error)
        entry.handshaking = False
        self.wait_for(entry, selectors.EVENT_READ)
        return True

    @staticmethod
    def handshake_failed(entry, error):
        reason = getattr(error, "reason", None) or error
        log("%s TLS handshake failed: %s" % (entry.address[0], reason))
        return False

    def wait_for(self, entry, event):
        """Wait for this event only: a registration left on EVENT_WRITE would wake the selector
        at every turn while the client takes its time."""
        with self.lock:
            if self.selector.get_map().get(entry.fd) is not None:
                self.selector.modify(entry.fd, event, entry)
        return False

    def hand_over(self, entry):
        self.forget_locked(entry)
        entry.listener.admit(entry.reader.sock, entry.address, bytes(entry.reader.pending))

    def forget_locked(self, entry):
        with self.lock:
            key = self.selector.get_map().get(entry.fd)
            if key is not None and key.data is entry:
                self.forget(entry)

    def expire(self):
        now = time.monotonic()
        with self.lock:
            expired = []
            for key in list(self.selector.get_map().values()):
                entry = key.data
                busy = entry.reader.pending or entry.handshaking
                if now - (entry.started if busy else entry.quiet_since) > self.timeout:
                    self.forget(entry)
                    expired.append(entry)
        for entry in expired:
            if entry.reader.pending and not entry.handshaking:
                self.refused(entry, 408, "request not received in time")
                answer_and_close(entry.reader.sock, plain_answer(408, "Request Timeout",
                                                                 "request not received in time"))
            else:
                entry.reader.sock.close()

    @staticmethod
    def refused(entry, status, why):
        """A request answered here, before any thread: counted and logged as requests are."""
        entry.listener.mirror.metrics.request_done("other", status, 0,
                                                   time.monotonic() - entry.started)
        log('%s "- -" %d 0B (%s)' % (entry.address[0], status, why))

    def shed(self):
        """Over WAITING_BYTES: close the connection that holds the most."""
        with self.lock:
            largest = max(self.selector.get_map().values(),
                          key=lambda key: len(key.data.reader.pending)).data
            self.forget(largest)
        log("%s: too many bytes of unfinished requests wait; closed" % largest.address[0])
        largest.reader.sock.close()

    def close(self, entry):
        self.forget_locked(entry)
        entry.reader.sock.close()
        return False

    def close_all(self):
        with self.lock:
            entries = [key.data for key in list(self.selector.get_map().values())]
            for entry in entries:
                self.forget(entry)
        for entry in entries:
            entry.reader.sock.close()


class ConnectionBudget:
    """Connections served at once, each by a thread (--max-connections, or the redirect
    listener's own), whole-server: each worker holds its places in its slot of the WorkerShare
    (`share`, `places` naming which budget), and takes one when the places of all leave one.
    A connection whose request arrived whole while all were taken waits in this worker's
    queue, first come first served; while it is not empty, with other workers, a place one of
    them let go is looked for every QUEUE_POLL seconds (they cannot wake this process). The
    lock guards `queue` and `poller`."""

    def __init__(self, capacity, share=None, places="mirror"):
        self.capacity, self.share, self.places = capacity, share or WorkerShare(), PLACES[places]
        self.queue, self.lock = collections.deque(), threading.Lock()
        self.queued = threading.Event()     # the queue has connections: look for places
        self.poller = None

    @property
    def serving(self):
        """Places this process holds."""
        return self.share.places(self.places)

    def admit(self, listener, sock, address, pending):
        with self.lock:
            place = not self.queue and self.share.take_place(self.places, self.capacity)
            if not place and len(self.queue) < MAX_QUEUED:
                self.queue.append((listener, sock, address, pending))
                self.look_for_places()
                return
        if not place:
            answer_and_close(sock, plain_answer(503, "Service Unavailable",
                                                "too many requests waiting"))
        elif not listener.serve(sock, address, pending):
            self.done()

    def done(self):
        """A served connection let go of its place: the first one in line that can be
        served takes it (a loop, not a recursion, when one after another cannot)."""
        while True:
            with self.lock:
                if not self.queue:
                    self.share.release_place(self.places)
                    return
                listener, sock, address, pending = self.queue.popleft()
            if listener.serve(sock, address, pending):
                return

    def look_for_places(self):
        """The queue has connections (the lock held): with other workers, whose connections
        may end first, look for places they let go."""
        if self.share.workers > 1:
            self.queued.set()
            if self.poller is None:
                self.poller = threading.Thread(target=self.poll, name="budget", daemon=True)
                self.poller.start()

    def poll(self):
        while True:
            self.queued.wait()
            time.sleep(QUEUE_POLL)
            try:
                self.serve_queued()
            except Exception as error:     # a defect here must not stop the queue for good
                log("connection queue: %r" % (error,), logging.ERROR)

    def serve_queued(self):
        """Queued connections take the places that are free, first come first served."""
        while True:
            with self.lock:
                if not self.queue:
                    self.queued.clear()
                    return
                if not self.share.take_place(self.places, self.capacity):
                    return
                listener, sock, address, pending = self.queue.popleft()
            if not listener.serve(sock, address, pending):
                self.done()

    def close_queued(self):
        with self.lock:
            queued, self.queue = list(self.queue), collections.deque()
        for _, sock, _, _ in queued:
            sock.close()


class Listener(http.server.ThreadingHTTPServer):
    """One listening socket. Accepting never blocks on a client: a new connection waits for its
    request in WaitingConnections, without a thread (TLS handshakes happen there too), and a
    request that arrived whole is served on a thread of its own, at most as many at once as
    the listener's ConnectionBudget allows (--max-connections, shared by the mirror's
    listeners). `pending` hands each thread what arrived of its request: the selector's
    thread adds an entry and the serving thread pops it, each one dict operation, atomic
    under the GIL, and never the same socket at once. `accept_thread`, set once it serves,
    tells /health whether it still accepts."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024   # the default 5 left most of a 500-connection burst unanswered

    def __init__(self, address, handler, mirror, tls_context=None, v6only=False, budget=None,
                 workers=1):
        self.mirror, self.tls_context, self.v6only = mirror, tls_context, v6only
        self.budget = budget or mirror.budget
        self.pending = {}       # socket -> the bytes of its request, until its thread takes them
        self.accept_thread = None   # the thread in serve_forever (start_serving)
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.reuse_port = workers > 1 and hasattr(socket, "SO_REUSEPORT")
        super().__init__(address, handler)
        # Accepting only when the selector says a connection is there, it never blocks; and
        # a socket a worker inherited may have had its connection taken (see sockets).
        self.socket.setblocking(False)
        # With workers, one listening socket each, all bound to the address with SO_REUSEPORT:
        # the kernel spreads new connections evenly over them. On one socket shared by all,
        # the worker that woke first took most of them (15 or 16 of 16, measured with wrk).
        # Without SO_REUSEPORT, they share the one: those that lose the race for a connection
        # get EAGAIN, which socketserver ignores.
        self.sockets = [self.socket] + [self.bound_socket() if self.reuse_port else self.socket
                                        for _ in range(workers - 1)]

    def server_bind(self):
        if self.reuse_port:
            self.server_address = self.free_address(self.server_address)
        self.prepare(self.socket)
        socketserver.TCPServer.server_bind(self)   # HTTPServer's would do a slow reverse DNS lookup
        self.server_name, self.server_port = self.server_address[:2]

    def free_address(self, address):
        """SO_REUSEPORT would let this server bind an address where another server listens
        (by the same user), and take half of its connections. So the address is bound first
        without it, which fails as usual when it is taken, and picks the port for port 0."""
        probe = socket.socket(self.address_family, socket.SOCK_STREAM)
        try:
            if self.address_family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(self.v6only))
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as the real ones
            probe.bind(address[:2])
            return address[0], probe.getsockname()[1]
        finally:
            probe.close()

    def prepare(self, sock):
        if self.address_family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(self.v6only))
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    def bound_socket(self):
        """Another listening socket on this one's address (a worker's, with SO_REUSEPORT)."""
        sock = socket.socket(self.address_family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.prepare(sock)
            sock.bind(self.server_address[:2])
            sock.listen(self.request_queue_size)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def take_socket(self, slot):
        """In a worker, right after its fork: accept on its own socket, and close the others,
        so that a connection the kernel gave one of them never waits on this worker."""
        self.socket = self.sockets[slot]
        for sock in self.sockets:
            if sock is not self.socket:
                sock.close()

    def close_sockets(self):
        for sock in self.sockets:
            sock.close()

    def accepting(self):
        """Whether this listener accepts connections: its thread is in serve_forever."""
        thread = self.accept_thread
        return bool(thread and thread.is_alive()) and not self.mirror.draining.is_set()

    def url(self):
        host = self.server_address[0]
        return "%s://%s:%d" % ("https" if self.tls_context else "http",
                               "[%s]" % host if ":" in host else host, self.server_address[1])

    def get_request(self):
        sock, address = self.socket.accept()
        # Else a small answer written in two pieces waits for the client's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request(self, request, client_address):
        self.mirror.waiting.add(self, request, client_address)

    def admit(self, sock, address, pending):
        """A connection whose request arrived whole: served as soon as the budget allows."""
        self.budget.admit(self, sock, address, pending)

    def serve(self, sock, address, pending):
        """Serve a connection on a thread of its own, holding a place in the budget. False
        when it cannot be (draining, no thread to be had): the place is not taken."""
        if self.mirror.draining.is_set():
            sock.close()
            return False
        self.pending[sock] = pending
        try:
            super().process_request(sock, address)
            return True
        except Exception as error:     # e.g. no thread to be had: this client, not all
            self.pending.pop(sock, None)
            log("could not serve %s: %s" % (address[0], error), logging.ERROR)
            sock.close()
            return False

    def process_request_thread(self, request, client_address):
        parked = None
        try:
            try:
                parked = self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            if parked is not None and not self.mirror.draining.is_set():
                self.mirror.waiting.add(self, request, client_address, *parked)
            else:
                self.shutdown_request(request)
        except Exception:
            self.handle_error(request, client_address)
            request.close()
        finally:
            self.budget.done()      # exactly once, whatever happened

    def finish_request(self, request, client_address):
        """Serve a connection. When it went quiet and is to wait for its next request without
        a thread, still open, returns when it went quiet, what came of that request, and
        whether "100 Continue" went out for it."""
        handler = self.RequestHandlerClass(request, client_address, self)
        if getattr(handler, "parked", False):
            reader = handler.reader
            return handler.quiet_since, bytes(reader.pending), reader.continued
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
    listeners = [listen_on((host, port), MirrorHandler, mirror, config.tls,
                           v6only=port in ipv4_ports, workers=config.workers)
                 for host, port in config.listen]
    if config.http_redirect:
        mirror.https_port = listeners[0].server_address[1]
        budget = ConnectionBudget(REDIRECT_CONNECTIONS, mirror.share, "redirect")
        listeners.append(listen_on(config.http_redirect, RedirectHandler, mirror, budget=budget,
                                   workers=config.workers))
    mirror.waiting = WaitingConnections(config.client_timeout, parking_capacity(config))
    mirror.listeners = listeners
    return listeners


class ListenError(Exception):
    """An address docxy cannot listen on: one line naming it and the reason, exit status 1."""


def listen_on(address, *arguments, **options):
    try:
        return Listener(address, *arguments, **options)
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno == errno.EACCES:
            reason += " (a port below 1024 needs root or CAP_NET_BIND_SERVICE)"
        reason = reason[:1].lower() + reason[1:]
        raise ListenError("cannot listen on %s: %s" % (format_address(address), reason))


def format_address(address):
    """(host, port) as the operator writes it: 0.0.0.0:5000, [::]:443."""
    return ("[%s]:%d" if ":" in address[0] else "%s:%d") % address[:2]


# ================================================================================================
# Commands and main
#
# Serving (main), --check, prefetch and hash-password; reloads on SIGHUP, certificate
# renewals, and draining on SIGTERM; with --workers, the Supervisor of the worker processes.
# ================================================================================================

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
    netloc = urllib.parse.urlsplit(url).netloc
    docker = {"registry-mirrors": [url]}
    if url.startswith("http://"):
        docker["insecure-registries"] = [netloc]
    default = mirror.default
    server = PRESETS[default.name][0] if default.name in PRESETS else origin_url(default.upstream)
    lines = ["Docker, /etc/docker/daemon.json (mirrors %s):" % default.name,
             "  " + json.dumps(docker),
             "containerd, /etc/containerd/certs.d/%s/hosts.toml (likewise for each registry):"
             % default.name,
             '  server = "%s"' % server,
             '  [host."%s"]' % url,
             '    capabilities = ["pull", "resolve"]']
    others = [name for name in mirror.registries if name != default.name]
    if others:
        lines.append("Any client: docker pull %s/%s/<image>" % (netloc, others[0]))
    return lines


def access_summary(config, listeners):
    """A few (level, line) on who may use the mirror; loud when that is the whole internet."""
    lines = []
    for registry in config.registries.values():
        lines.append("registry %s -> %s%s%s" % (
            registry.name, origin_url(registry.upstream),
            " (library/ rule)" if registry.library else "",
            " (upstream login as %s)" % registry.username if registry.username else ""))
    if config.allow:
        lines.append("clients allowed from: %s" % ", ".join(map(str, config.allow)))
    if config.users:
        lines.append("clients must log in: %d user(s) in %s" % (len(config.users), "--users"))
    if config.rate_limit:
        lines.append("manifest requests limited to %d per client, refilled at %.3g/s"
                     % config.rate_limit)
    lines = [(logging.INFO, line) for line in lines]
    public = [l.url() for l in listeners
              if not ipaddress.ip_address(l.server_address[0]).is_loopback]
    if public and not (config.allow or config.users):
        lines.append((logging.WARNING, "OPEN MIRROR: anyone who reaches %s can pull through it "
                      "(use --allow or --users)" % ", ".join(public)))
    return lines


def check_command(config):
    """--check: the configuration was read and validated; say what it amounts to."""
    def say(line, prefix=""):
        report(line, config.log_format, prefix)

    say("configuration ok", "docxy: ")
    for registry in config.registries.values():
        say("registry %s: upstream %s, library/ rule %s, credentials %s" % (
            registry.name, origin_url(registry.upstream), "on" if registry.library else "off",
            "for user %s" % registry.username if registry.username else "none"))
    say("listen: %s; tls: %s" % (", ".join(map(format_address, config.listen)),
                                 "yes" if config.tls else "no"))
    return 0


def warn_of_kubernetes_variables(config):
    if config.kubernetes_variables:
        log("ignoring %s: Kubernetes sets these for a Service named like docxy; they are no "
            "settings" % ", ".join(config.kubernetes_variables), logging.WARNING)


MANIFEST_TYPES = ("application/vnd.oci.image.index.v1+json",
                  "application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json",
                  "application/vnd.docker.distribution.manifest.v2+json")


def prefetch_command(argv):
    """docxy.py prefetch IMAGE[:TAG|@DIGEST] [--platform OS/ARCH] [flags]: fill the cache by
    pulling through an in-process docxy on loopback, the very path a client's pull takes."""
    platform = None
    if "--platform" in argv:
        at = argv.index("--platform")
        platform, argv = argv[at + 1:at + 2], argv[:at] + argv[at + 2:]
        platform = platform[0] if platform else ""
    images, flags = argv[:1], argv[1:]
    usage = ("usage: docxy.py prefetch IMAGE[:TAG|@DIGEST] [--platform OS/ARCH] --cache-dir DIR"
             " [flags]")
    if images and images[0] in ("-h", "--help"):
        print(usage + "\n\nPull IMAGE (one platform of it with --platform) through docxy into the "
              "cache.\nThe flags are docxy's own, as for serving (see docxy.py --help).")
        return 0
    if not images or images[0].startswith("-") or platform == "":
        print(usage, file=sys.stderr)
        return 2
    try:
        config = read_config(flags, os.environ)
    except ConfigError as error:
        return log_errors(error, error.log_format, 2)
    configure_logging(config.log_format)
    warn_of_kubernetes_variables(config)
    try:
        if not config.cache_dir:
            raise ConfigError("prefetch needs --cache-dir (or DOCXY_CACHE_DIR)")
        # This client is docxy itself.
        config.users, config.allow, config.rate_limit, config.workers = None, [], None, 1
        mirror = Mirror(config)
        listener = listen_on(("127.0.0.1", 0), MirrorHandler, mirror)
        mirror.waiting = WaitingConnections(config.client_timeout, parking_capacity(config))
        mirror.waiting.start()
    except ConfigError as error:
        return log_errors(error, config.log_format, 2)
    except ListenError as error:
        return log_errors(error, config.log_format, 1)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    try:
        prefetch_image(listener.server_address[1], images[0], platform,
                       lambda line: report(line, config.log_format))
        return 0
    except (OSError, ValueError, KeyError, http.client.HTTPException) as error:
        log("prefetch failed: %s" % error, logging.ERROR)
        return 1
    finally:
        listener.shutdown()


def log_errors(error, log_format, status):
    """Report a failure to start, each of its lines an error, and return the exit status."""
    configure_logging(log_format or "text")
    for line in str(error).splitlines():
        log(line, logging.ERROR)
    return status


def prefetch_image(port, image, platform, say):
    first, _, rest = image.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        first, rest = DEFAULT_REGISTRY, image
    name, ref = (rest.split("@", 1) if "@" in rest else
                 (rest.rsplit(":", 1) if ":" in rest.rsplit("/", 1)[-1] else (rest, "latest")))
    base = "/v2/%s/%s" % (first, name)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def get(path, accept="*/*"):
        connection.request("GET", path, headers={"Accept": accept})
        response = connection.getresponse()
        size = 0
        body = b""
        while True:
            chunk = response.read(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            body = body + chunk if size <= 4 << 20 else b""
        if response.status != 200:
            raise ValueError("%s answered %d %s"
                             % (path, response.status, body[:200].decode("latin-1")))
        return body, size, response.getheader("X-Docxy-Cache", "-")

    document = json.loads(get(base + "/manifests/" + ref, ", ".join(MANIFEST_TYPES))[0])
    manifests = [document]
    if "manifests" in document:
        wanted = [m for m in document["manifests"]
                  if not platform or platform in platform_names(m.get("platform", {}))]
        if not wanted:
            raise ValueError("%s has no %s manifest" % (image, platform))
        manifests = [json.loads(get(base + "/manifests/" + m["digest"],
                                    m.get("mediaType", MANIFEST_TYPES[1]))[0])
                     for m in wanted]
    for manifest in manifests:
        for blob in [manifest["config"]] + manifest.get("layers", []):
            _, size, status = get(base + "/blobs/" + blob["digest"])
            say("prefetch: %s %.1f MiB %s" % (blob["digest"], size / 1048576, status))


def platform_names(platform):
    """What --platform may call an index entry's platform: os/architecture[/variant], and
    os/architecture."""
    full = "/".join(filter(None, (platform.get(k) for k in ("os", "architecture", "variant"))))
    return (full, "%s/%s" % (platform.get("os"), platform.get("architecture")))


def hash_password_command(argv):
    """docxy.py hash-password: read a password, print the line to put after 'name:' in --users."""
    argparse.ArgumentParser(
        prog="docxy.py hash-password",
        description="Read a password (typed twice on a terminal, without echo; or one line from a "
        "pipe) and print its salted PBKDF2-SHA256 hash. A --users file holds one NAME:HASH "
        "line per user.").parse_args(argv)
    try:
        password = read_new_password()
    except (EOFError, KeyboardInterrupt):
        # Ctrl-D or Ctrl-C at a prompt: the cursor is still on the prompt's line.
        return hash_password_failed("no password read", sys.stdin.isatty())
    if password is None:
        return hash_password_failed("the passwords differ")
    if not password:
        return hash_password_failed("empty password")
    print(hash_password(password))
    return 0


def read_new_password():
    """The password, from a pipe or typed twice at the terminal; None when the two differ."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    import getpass
    password = getpass.getpass("Password: ")
    return password if getpass.getpass("Again: ") == password else None


def hash_password_failed(reason, new_line=False):
    print("%sdocxy: error: %s" % ("\n" if new_line else "", reason), file=sys.stderr)
    return 1


# What a reload cannot change in a running process; a changed value is reported, not applied.
NEEDS_RESTART = ("listen", "http_redirect", "cache_dir", "cache_max_size", "max_connections",
                 "ipv4_only", "upstream_timeout", "cert_check_interval", "workers")


def reload(mirror, listeners, argv):
    """SIGHUP: read the configuration, certificate and users file again. A broken new one is
    refused with a log line, and the running one stays; connections are never dropped."""
    try:
        config = read_config(argv, os.environ)
    except ConfigError as error:
        log("reload refused, the running configuration stays: %s"
            % "; ".join(str(error).splitlines()))
        return False
    except SystemExit:
        log("reload refused: the configuration does not parse")
        return False
    for name in NEEDS_RESTART:
        if getattr(config, name) != getattr(mirror.config, name):
            log("reload: %s changed; that takes a restart" % name.replace("_", "-"))
            setattr(config, name, getattr(mirror.config, name))
    if bool(config.tls) != bool(mirror.config.tls):
        log("reload: switching TLS on or off takes a restart")
        config.tls, config.tls_stamp = mirror.config.tls, mirror.config.tls_stamp
    for listener in listeners:
        if listener.tls_context and config.tls:
            listener.tls_context = config.tls    # new connections only; open ones keep theirs
    mirror.configure(config)
    if mirror.cache:
        mirror.cache.tag_ttl = config.tag_ttl
    configure_logging(config.log_format, mirror.worker)
    log("reloaded configuration%s" % (" and certificate" if config.tls else ""))
    return True


def watch_certificate(mirror, listeners, stop, interval):
    """Reload the certificate when its files change on disk, so acme.sh and certbot renewals
    apply without a restart. A half-written pair fails to load; writing its other half
    changes the files again, and then it loads. The files are compared with the ones the
    running certificate was loaded from, so a worker forked after they changed loads them
    too."""
    tried = None
    while not stop.wait(interval):
        config = mirror.config
        now = certificate_stamp(config.cert, config.key)
        if now is None or now == config.tls_stamp or now == tried:
            continue
        tried = now
        try:
            context = server_tls_context(config.cert, config.key)
        except ConfigError as error:
            log("certificate changed on disk but does not load; keeping the old one: %s" % error)
            continue
        for listener in listeners:
            if listener.tls_context:
                listener.tls_context = context
        config.tls, config.tls_stamp = context, now
        log("certificate changed on disk: reloaded")


def stop_serving(mirror, listeners, hurry):
    """A stop's phases, each logged. /health answers 503 while docxy goes on accepting and
    serving for --drain-delay: a balancer sends requests until its checks see that, and they
    would be refused. Then drain. `hurry` (a second SIGTERM) cuts short the phase it comes in
    and every one after. True when no transfer had to be cut."""
    config = mirror.config
    mirror.stopping.set()
    if config.drain_delay and not hurry.is_set():
        log("stopping: /health answers 503; serving on for %gs (--drain-delay) while balancers "
            "take this node out" % config.drain_delay)
        hurry.wait(config.drain_delay)
    log("stopping: no longer accepting; idle connections closed, transfers in flight have up "
        "to %gs" % (0 if hurry.is_set() else config.drain_seconds))
    clean = drain(mirror, listeners, hurry)
    if hurry.is_set():
        log("stopped at once: asked a second time")
    else:
        log("stopped" if clean else "stopped with transfers still running")
    return clean


CUT_GRACE = 1.0     # seconds the transfers cut at a stop's end have to log their access lines


def drain(mirror, listeners, hurry):
    """Stop accepting, close idle keep-alive connections, let transfers finish (until
    --drain-seconds are over or `hurry` is set); then cut those still running, and give
    them CUT_GRACE to log that they were."""
    mirror.draining.set()
    mirror.waiting.close_all()
    for listener in listeners:
        listener.budget.close_queued()
    stoppers = [threading.Thread(target=listener.shutdown) for listener in listeners]
    for stopper in stoppers:
        stopper.start()
    for stopper, listener in zip(stoppers, listeners):
        stopper.join()
        listener.server_close()
    deadline = time.monotonic() + mirror.config.drain_seconds
    while time.monotonic() < deadline and not hurry.is_set():
        with mirror.lock:
            handlers = list(mirror.connections.values())
        if not handlers:
            return True
        shut_connections(handler for handler in handlers if handler.idle)
        time.sleep(0.05)
    with mirror.lock:
        shut_connections(list(mirror.connections.values()))
    deadline = time.monotonic() + CUT_GRACE
    while mirror.connections and time.monotonic() < deadline:
        time.sleep(0.05)
    return False


def shut_connections(handlers):
    """End the handlers' connections: a read or write there fails at once, and a transfer
    under way ends as one cut short (abort_transfer), with its access line."""
    for handler in handlers:
        try:
            socket.socket.shutdown(handler.connection, socket.SHUT_RDWR)
        except OSError:
            pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    read_upstream_headers_quickly()
    if argv[:1] == ["hash-password"]:
        return hash_password_command(argv[1:])
    if argv[:1] == ["prefetch"]:
        return prefetch_command(argv[1:])
    try:
        config = read_config(argv, os.environ)
    except ConfigError as error:
        return log_errors(error, error.log_format, 2)
    configure_logging(config.log_format)
    warn_of_kubernetes_variables(config)
    if config.check:
        return check_command(config)
    try:
        mirror = Mirror(config)
        listeners = open_listeners(mirror)
    except ConfigError as error:
        return log_errors(error, config.log_format, 2)
    except ListenError as error:
        return log_errors(error, config.log_format, 1)
    if config.workers > 1:
        announce(mirror, listeners)
        return Supervisor(mirror, listeners, argv).run()
    stop, reload_asked, hurry = threading.Event(), threading.Event(), threading.Event()
    handle_signals(stop, reload_asked, hurry)
    start_serving(mirror, listeners, stop)
    announce(mirror, listeners)
    return serve_until_stopped(mirror, listeners, argv, (stop, reload_asked, hurry))


def announce(mirror, listeners):
    """The start-up lines: version, who may use the mirror, where it listens, what clients
    need."""
    log("docxy %s" % __version__)
    for level, line in access_summary(mirror.config, listeners):
        log(line, level)
    for listener in listeners:
        if listener.RequestHandlerClass is RedirectHandler:
            log("redirecting %s to https" % listener.url())
        else:
            log("listening on %s" % listener.url())
    for line in client_snippet(mirror, listeners):
        log(line)


def handle_signals(stop, reload_asked, hurry, worker=False):
    """SIGTERM and SIGINT stop, and a second one hurries the stop; SIGHUP (systemd's
    ExecReload) reloads: each sets its event, for the main thread (serve_until_stopped) to act
    on. A handler only sets an event: logging there could wait for a lock its thread holds.
    A worker takes stop and hurry from its supervisor only, as WORKER_STOP and WORKER_HURRY:
    a signal to the whole process group (Ctrl-C, systemd's default KillMode) reaches it too,
    and would count twice with the supervisor's."""
    def stop_asked(*_):
        (hurry if stop.is_set() else stop).set()
    if worker:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(WORKER_STOP, lambda *_: stop.set())
        signal.signal(WORKER_HURRY, lambda *_: hurry.set())
    else:
        signal.signal(signal.SIGTERM, stop_asked)
        signal.signal(signal.SIGINT, stop_asked)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: reload_asked.set())


def start_serving(mirror, listeners, stop):
    """Start the threads that serve, in the process that serves: the waiting connections, the
    accept loops, the certificate watcher, the cache's sweep; and, in a worker, the publisher
    of its figures."""
    mirror.waiting.start()
    if mirror.config.tls:
        threading.Thread(target=watch_certificate, name="certificate", daemon=True,
                         args=(mirror, listeners, stop, mirror.config.cert_check_interval)).start()
    for listener in listeners:
        listener.accept_thread = threading.Thread(target=listener.serve_forever, name="accept",
                                                  daemon=True)
        listener.accept_thread.start()
    if mirror.cache:
        threading.Thread(target=mirror.cache.sweep_every, name="cache-sweep", daemon=True,
                         args=(stop,)).start()
    if mirror.worker:
        threading.Thread(target=publish_figures, name="figures", daemon=True,
                         args=(mirror, stop)).start()


def publish_figures(mirror, stop):
    """A worker's figures into its slot every PUBLISH_EVERY seconds, for the /metrics and status
    pages the other workers answer."""
    while not stop.wait(PUBLISH_EVERY):
        try:
            mirror.publish_figures()
        except Exception as error:     # the next try may do better; serving goes on anyway
            log("publishing this worker's figures failed: %r" % (error,), logging.ERROR)


def serve_until_stopped(mirror, listeners, argv, events, supervisor=None):
    """Serve until SIGTERM or SIGINT, reloading on SIGHUP; then stop (stop_serving). `events`:
    those handle_signals sets. A worker also stops when its supervisor (that pid) is gone: it
    would never be told to stop, nor replaced."""
    stop, reload_asked, hurry = events
    while not stop.wait(0.2):
        if reload_asked.is_set():
            reload_asked.clear()
            reload(mirror, listeners, argv)
        if supervisor and os.getppid() != supervisor:
            log("the supervisor (pid %d) is gone" % supervisor, logging.ERROR)
            break
    stop_serving(mirror, listeners, hurry)
    return 0


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT) + (
    (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())
WORKER_STOP, WORKER_HURRY = signal.SIGUSR1, signal.SIGUSR2  # a supervisor's, to its workers
# Held back from a new worker until it has its handlers: SIGUSR1's default would kill it.
FORK_BLOCKED = FORWARDED_SIGNALS + (WORKER_STOP, WORKER_HURRY)
STEADY_AFTER = 10           # seconds a worker lives before its death no longer counts as a crash
RESTART_PAUSE_MAX = 30      # seconds: the longest pause before a crashing worker's replacement


class Supervisor:
    """The process that --workers N starts in: it read the configuration, made the Mirror and
    bound the listeners, and now forks the N workers that serve them, serving nothing itself.
    It replaces a worker that dies: at once, but after a pause that doubles while replacements
    keep dying right after their start. On SIGHUP it reloads its own configuration (which the
    workers it forks later start with) and passes the signal on to each worker; on SIGTERM or
    SIGINT it tells each to stop (WORKER_STOP; WORKER_HURRY the second time), then stops
    replacing workers and exits once the last has exited.
    One thread: the signal handlers only note the signal, for run()'s loop to act on; no lock."""

    def __init__(self, mirror, listeners, argv):
        self.mirror, self.listeners, self.argv = mirror, listeners, argv
        self.pids = {}          # slot -> pid of the worker running in it
        self.started = {}       # slot -> when its worker was forked (time.monotonic)
        self.crashes = collections.Counter()    # slot -> its workers' deaths right after start
        self.due = {}           # slot -> when to fork a worker for it
        self.signals = []       # signals received, for the loop
        self.stopping = False

    def run(self):
        for number in FORWARDED_SIGNALS:
            signal.signal(number, lambda number, _: self.signals.append(number))
        for slot in range(self.mirror.share.workers):
            self.start(slot)
        log("%d workers serving" % len(self.pids))
        while self.pids or not self.stopping:
            while self.signals:
                self.act_on(self.signals.pop(0))
            self.reap()
            now = time.monotonic()
            for slot, when in sorted(self.due.items()):
                if when <= now and not self.stopping:
                    self.start(slot)
            time.sleep(0.1)
        log("stopped: every worker has exited")
        return 0

    def act_on(self, number):
        if number == getattr(signal, "SIGHUP", None):
            reload(self.mirror, self.listeners, self.argv)
            self.tell_workers(number)
        elif not self.stopping:
            self.stopping = True
            config = self.mirror.config
            log("stopping: %d workers answer /health with 503 and serve on for %gs "
                "(--drain-delay), then drain their transfers for up to %gs"
                % (len(self.pids), config.drain_delay, config.drain_seconds))
            for listener in self.listeners:     # the workers close theirs as they drain
                listener.close_sockets()
            self.tell_workers(WORKER_STOP)
        else:
            log("stopping at once: asked a second time")
            self.tell_workers(WORKER_HURRY)

    def tell_workers(self, number):
        for pid in self.pids.values():
            try:
                os.kill(pid, number)
            except ProcessLookupError:      # dead already: reaped at the next turn
                pass

    def start(self, slot):
        """Fork the slot's worker. Signals wait until the worker has its own handlers."""
        supervisor = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED)
        try:
            pid = os.fork()
        except OSError as error:
            log("cannot start worker %d: %s; trying again in 1s"
                % (slot + 1, error.strerror or error), logging.ERROR)
            self.due[slot] = time.monotonic() + 1
            return
        finally:
            if os.getpid() == supervisor:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED)
        if pid == 0:
            os._exit(run_worker(self.mirror, self.listeners, self.argv, slot + 1, supervisor))
        self.pids[slot], self.started[slot] = pid, time.monotonic()
        self.due.pop(slot, None)
        self.mirror.share.started(slot, pid)
        log("worker %d (pid %d) started" % (slot + 1, pid))

    def reap(self):
        """Note the workers that exited; plan the replacement of those that died."""
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((slot for slot, known in self.pids.items() if known == pid), None)
            if slot is None:
                continue
            del self.pids[slot]
            self.mirror.share.worker_gone(slot)
            self.ended(slot, pid, status)

    def ended(self, slot, pid, status):
        name, how = "worker %d (pid %d)" % (slot + 1, pid), exit_description(status)
        if self.stopping:
            if how != "exited":
                log("%s %s" % (name, how), logging.WARNING)
            return
        if time.monotonic() - self.started[slot] < STEADY_AFTER:
            self.crashes[slot] += 1
        else:
            self.crashes[slot] = 1
        pause = 0 if self.crashes[slot] < 2 else min(RESTART_PAUSE_MAX,
                                                       2 ** (self.crashes[slot] - 2))
        what = "died: %s" % how if how != "exited" else "exited, though not told to"
        if pause:
            log("%s %s, %d times in a row right after its start; starting a new one in %ds"
                % (name, what, self.crashes[slot], pause), logging.ERROR)
        else:
            log("%s %s; starting a new one" % (name, what), logging.ERROR)
        self.due[slot] = time.monotonic() + pause


def exit_description(status):
    """How a process ended, from its wait status: 'killed by signal 9', 'exited with status
    1', or 'exited' (status 0)."""
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    code = os.WEXITSTATUS(status)
    return "exited with status %d" % code if code else "exited"


def run_worker(mirror, listeners, argv, worker, supervisor):
    """A worker's life, in the child of the supervisor's fork, to its exit status: it makes its
    own what the fork copied, serves as a lone docxy would, and drains on SIGTERM or when its
    supervisor is gone."""
    try:
        configure_logging(mirror.config.log_format, worker)
        for listener in listeners:
            listener.take_socket(worker - 1)
        mirror.after_fork(worker)
        events = stop, reload_asked, hurry = threading.Event(), threading.Event(), threading.Event()
        handle_signals(stop, reload_asked, hurry, worker=True)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED)
        start_serving(mirror, listeners, stop)
        return serve_until_stopped(mirror, listeners, argv, events, supervisor)
    except BaseException as error:     # whatever it is: said, and the supervisor replaces it
        log("failed: %r" % (error,), logging.ERROR)
        import traceback
        traceback.print_exc(file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
