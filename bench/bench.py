#!/usr/bin/env python3
"""Benchmark docxy against nginx and the CNCF distribution registry (issue 6).

    python3 bench/bench.py                 # full run: about 10 minutes on 2 cores
    python3 bench/bench.py --quick         # smoke run (~1.5 minutes): small sizes, short cells, 3 rounds
    python3 bench/bench.py --only blob,pull --rounds 5

Everything runs on loopback and is started here, in a temporary directory, on free ports,
and stopped again at the end (also on Ctrl-C or an error):

  direct       the upstream itself: nginx serving files laid out at registry paths with
               sendfile (a stdlib socket.sendfile server when nginx is missing)
  nginx        nginx proxy_pass to direct, tuned fairly (upstream keep-alive, buffering off,
               1 MiB buffers), over HTTP and over HTTPS (a test CA made with openssl)
  registry     `docker-registry serve` (CNCF distribution) in pull-through proxy: mode,
               measured as miss (fresh storage) and hit
  docxy        docxy over HTTP, over HTTPS, and with --cache-dir (miss and hit)

Measures: 1 single-stream GET of a large blob; 2 concurrent GETs of a medium blob (aggregate
MiB/s, peak RSS, CPU s/GiB); 3 manifest HEAD/GET by tag at 1/16/64 keep-alive connections
(GET with wrk when installed; HEAD with a stdlib epoll client, as wrk cannot parse answers to
HEAD); 4 RSS with 500 idle keep-alive connections and the time a new client
waits for /v2/; 5 cold and warm pull of a 6-layer image by a client that behaves like dockerd.

Targets are measured interleaved, round by round; every figure is the median [min-max] over
the rounds and every ratio is computed within a round, then summarised the same way. A target
whose tool is missing is reported as skipped. Standard library only; not part of CI.
"""

import argparse
import concurrent.futures
import ctypes
import hashlib
import http.client
import http.server
import json
import os
import platform
import random
import re
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

MiB = 1 << 20
GiB = 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))

HASH_ROW = "sha256 alone (in memory)"

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = ", ".join((INDEX_TYPE, "application/vnd.docker.distribution.manifest.list.v2+json",
                    MANIFEST_TYPE, "application/vnd.docker.distribution.manifest.v2+json"))
USER_AGENT = "docxy-bench/1"

MEASURES = ("blob", "concurrent", "manifest", "idle", "pull")
MEASURE_TITLES = {
    "blob": "1. single-stream GET of a large blob",
    "concurrent": "2. concurrent GETs of a medium blob",
    "manifest": "3. manifest requests by tag over keep-alive connections",
    "idle": "4. idle keep-alive connections",
    "pull": "5. whole-image pull by a dockerd-like client",
}
TARGETS = ("direct", "nginx", "nginx-https", "registry", "docxy", "docxy-https", "docxy-cache")

FULL = dict(big=1 * GiB, mid=32 * MiB, streams=32, layers=(8, 16, 24, 32, 48, 64), cell=3, idle=500,
            conns=(1, 16, 64))
QUICK = dict(big=128 * MiB, mid=4 * MiB, streams=32, layers=(1, 2, 3, 4, 6, 8), cell=0.2, idle=100,
             conns=(1, 16, 64))


def say(message):
    sys.stderr.write("bench: %s\n" % message)
    sys.stderr.flush()


class Skip(Exception):
    """A target or measure that cannot run here; the reason is printed, nothing is faked."""


# ------------------------------------------------------------------ processes we start

STARTED = []            # every Popen this run started, stopped in cleanup()
_LIBC = None


def _die_with_parent():
    """Child side of Popen: get SIGKILL if the benchmark itself is killed (Linux prctl)."""
    try:
        _LIBC.prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except Exception:
        pass


def spawn(argv, log_path, env=None, cwd=None):
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True,
                                preexec_fn=_die_with_parent if _LIBC else None)
    finally:
        log.close()
    STARTED.append(proc)
    return proc


def stop_process(proc, sig=signal.SIGTERM, grace=8.0):
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        except OSError:
            pass
    if proc in STARTED:
        STARTED.remove(proc)


def cleanup():
    for proc in list(reversed(STARTED)):
        stop_process(proc, grace=5.0)


def clean_env():
    """The servers' environment: no proxies (everything is loopback), no DOCXY_ settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DOCXY_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy",
                                                               "no_proxy")}
    return env


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ /proc accounting

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid):
    """pid and all its descendants (nginx: master and workers)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, stack = [pid], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            tree.append(child)
            stack.append(child)
    return tree


def cpu_seconds(pids):
    """utime+stime of the processes, including their reaped children."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def machine_cpu():
    """(busy, all) CPU seconds of the whole machine so far, from /proc/stat: every process
    counts, the load client and the upstream too."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]            # idle and iowait
    return (sum(fields) - idle) / CLK_TCK, sum(fields) / CLK_TCK


def busy_share(before, after):
    """How much of the machine's CPU was busy between two machine_cpu() readings (0..1)."""
    if not before or not after or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def settle():
    """Write back what the last cell left dirty (a cache miss writes 1 GiB) before the next cell
    runs: the kernel's write-back took CPU from whichever target came next, one round a run."""
    os.sync()


def hash_speed(size, chunk=MiB):
    """sha256 over `size` bytes in memory on one core (MiB/s, CPU s/GiB): the ceiling of
    any proxy that checks one stream's digest on the way through."""
    block = os.urandom(chunk)
    hasher = hashlib.sha256()
    cpu0, start = time.process_time(), time.perf_counter()
    for _ in range(size // chunk):
        hasher.update(block)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return size / MiB / seconds, cpu / (size / GiB)


def status_kib(pid, field):
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rss_mib(pids):
    return sum(status_kib(pid, "VmRSS") for pid in pids) / 1024.0


def reset_peak(pids):
    """Reset VmHWM (Linux >= 4.0: 5 > clear_refs). False where that is not allowed."""
    ok = True
    for pid in pids:
        try:
            with open("/proc/%d/clear_refs" % pid, "w") as handle:
                handle.write("5")
        except OSError:
            ok = False
    return ok


class RssSampler(threading.Thread):
    """Polls the summed VmRSS of some processes while a measurement runs."""

    def __init__(self, pids, interval=0.01):
        super().__init__(daemon=True)
        self.pids, self.interval, self.peak = pids, interval, 0.0
        self.halt = threading.Event()
        self.hwm_ok = reset_peak(pids)

    def run(self):
        while not self.halt.is_set():
            self.peak = max(self.peak, rss_mib(self.pids))
            self.halt.wait(self.interval)

    def finish(self):
        self.halt.set()
        self.join()
        self.peak = max(self.peak, rss_mib(self.pids))
        if self.hwm_ok:     # the kernel's own peak: exact for one process, an upper bound for several
            return max(self.peak, sum(status_kib(pid, "VmHWM") for pid in self.pids) / 1024.0)
        return self.peak


# ------------------------------------------------------------------ test data at registry paths

def write_blob(root, repo, size, seed):
    folder = os.path.join(root, "v2", "library", repo, "blobs")
    os.makedirs(folder, exist_ok=True)
    block = bytearray(random.Random(seed).randbytes(MiB))
    view = memoryview(block)
    hasher = hashlib.sha256()
    temporary = os.path.join(folder, ".partial")
    with open(temporary, "wb") as handle:
        index, remaining = 0, size
        while remaining:
            block[:8] = index.to_bytes(8, "big")     # every MiB differs
            n = min(MiB, remaining)
            hasher.update(view[:n])
            handle.write(view[:n])
            index, remaining = index + 1, remaining - n
    digest = "sha256:" + hasher.hexdigest()
    os.rename(temporary, os.path.join(folder, digest))
    return digest


def make_data(root, sizes):
    """Blobs, an OCI index, its one-platform manifest and config, laid out at /v2/ paths.
    Returns a description of the content, including the headers every path is served with."""
    say("writing test data (%d MiB)" % ((sizes["big"] + sizes["mid"]) // MiB + sum(sizes["layers"])))
    data = {"root": root, "paths": {}}
    data["big"] = write_blob(root, "big", sizes["big"], 1)
    data["mid"] = write_blob(root, "big", sizes["mid"], 2)
    data["big_size"], data["mid_size"] = sizes["big"], sizes["mid"]
    for key in ("big", "mid"):
        data["paths"]["/v2/library/big/blobs/" + data[key]] = ("application/octet-stream", data[key])
    layers = []
    for number, size in enumerate(sizes["layers"]):
        digest = write_blob(root, "app", size * MiB, 100 + number)
        layers.append({"mediaType": LAYER_TYPE, "digest": digest, "size": size * MiB})
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]}},
                        sort_keys=True).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                           "config": {"mediaType": CONFIG_TYPE, "digest": sha256(config), "size": len(config)},
                           "layers": layers}, sort_keys=True).encode()
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE,
                        "manifests": [{"mediaType": MANIFEST_TYPE, "digest": sha256(manifest),
                                       "size": len(manifest),
                                       "platform": {"architecture": "amd64", "os": "linux"}}]},
                       sort_keys=True).encode()
    blobs = os.path.join(root, "v2", "library", "app", "blobs")
    with open(os.path.join(blobs, sha256(config)), "wb") as handle:
        handle.write(config)
    for layer in layers + [{"digest": sha256(config)}]:
        data["paths"]["/v2/library/app/blobs/" + layer["digest"]] = ("application/octet-stream", layer["digest"])
    manifests = os.path.join(root, "v2", "library", "app", "manifests")
    os.makedirs(manifests, exist_ok=True)
    for name, body, kind in ((sha256(index), index, INDEX_TYPE), ("latest", index, INDEX_TYPE),
                             (sha256(manifest), manifest, MANIFEST_TYPE)):
        with open(os.path.join(manifests, name), "wb") as handle:
            handle.write(body)
        data["paths"]["/v2/library/app/manifests/" + name] = (kind, sha256(body))
    data["index"], data["manifest"], data["config"] = sha256(index), sha256(manifest), sha256(config)
    data["layers"] = [l["digest"] for l in layers]
    data["image_bytes"] = sum(l["size"] for l in layers) + len(config) + len(manifest) + len(index)
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return data


def sha256(body):
    return "sha256:" + hashlib.sha256(body).hexdigest()


def make_certificates(folder):
    """A test CA and a server certificate for 127.0.0.1/127.0.0.2/localhost (ECDSA P-256)."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise Skip("openssl not installed: no test certificate for the HTTPS targets")
    os.makedirs(folder, exist_ok=True)

    def run(*args):
        subprocess.run([openssl] + list(args), cwd=folder, check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=docxy bench CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    with open(os.path.join(folder, "ext.cnf"), "w") as handle:
        handle.write("subjectAltName=IP:127.0.0.1,IP:127.0.0.2,DNS:localhost\n"
                     "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                     "extendedKeyUsage=serverAuth\n")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-out", "server.pem", "-extfile", "ext.cnf")
    return {k: os.path.join(folder, v) for k, v in (("ca", "ca.pem"), ("cert", "server.pem"),
                                                      ("key", "server.key"))}


# ------------------------------------------------------------------ the servers

def http_call(port, method, path, https=False, ca=None, headers=None, timeout=5):
    if https:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                                 context=ssl.create_default_context(cafile=ca))
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers=dict({"User-Agent": USER_AGENT}, **(headers or {})))
        response = connection.getresponse()
        body = response.read()
        return response.status, dict(response.getheaders()), body
    finally:
        connection.close()


def wait_ready(proc, port, name, log_path, https=False, ca=None, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with %s at start-up:\n%s" % (name, proc.returncode, tail(log_path)))
        try:
            if http_call(port, "GET", "/v2/", https, ca, timeout=2)[0] in (200, 401):
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("%s did not answer /v2/ within %ds:\n%s" % (name, timeout, tail(log_path)))
        time.sleep(0.05)


def tail(path, lines=15):
    try:
        with open(path, "rb") as handle:
            return b"\n".join(handle.read().splitlines()[-lines:]).decode("utf-8", "replace")
    except OSError:
        return "(no log)"


class Server:
    """One server process (tree) that serves one or more targets."""

    name = "?"

    def __init__(self, work):
        self.work, self.proc, self.log = work, None, None

    def pids(self):
        return process_tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc:
            stop_process(self.proc)
            self.proc = None


NGINX_COMMON = """
worker_processes auto;
worker_rlimit_nofile 16384;
error_log %(err)s warn;
pid %(pid)s;
daemon off;
events { worker_connections 8192; }
"""
NGINX_HTTP = """
    client_body_temp_path %(tmp)s/body;
    proxy_temp_path %(tmp)s/proxy;
    fastcgi_temp_path %(tmp)s/fastcgi;
    uwsgi_temp_path %(tmp)s/uwsgi;
    scgi_temp_path %(tmp)s/scgi;
    access_log %(access)s;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
"""


class NginxDirect(Server):
    """The upstream: nginx serving the data directory with sendfile, registry headers per path."""

    name = "direct"

    def __init__(self, work, data):
        super().__init__(work)
        self.data, self.port = data, free_port()
        self.access = os.path.join(work, "direct-access.log")
        self.kind = "nginx static, sendfile on"

    def config(self):
        tmp = os.path.join(self.work, "nginx-direct")
        os.makedirs(tmp, exist_ok=True)
        values = dict(err=os.path.join(self.work, "direct-error.log"), pid=os.path.join(tmp, "nginx.pid"),
                      tmp=tmp, access=self.access)
        manifests = []
        for path, (kind, digest) in sorted(self.data["paths"].items()):
            if "/manifests/" in path:
                manifests.append(
                    "        location = %s { types { } default_type %s; add_header Docker-Content-Digest %s; "
                    "add_header Docker-Distribution-API-Version registry/2.0; }" % (path, kind, digest))
        return (NGINX_COMMON % values) + "http {\n" + (NGINX_HTTP % values) + """
    sendfile on;
    tcp_nopush on;
    types { }
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:%d backlog=4096;
        root %s;
        location = /v2/ {
            default_type application/json;
            add_header Docker-Distribution-API-Version registry/2.0 always;
            return 200 '{}';
        }
        location ~ "^/v2/.+/blobs/(sha256:[0-9a-f]{64})$" {
            add_header Docker-Content-Digest $1;
            add_header Docker-Distribution-API-Version registry/2.0;
        }
%s
        location / { return 404; }
    }
}
""" % (self.port, self.data["root"], "\n".join(manifests))

    def start(self):
        path = os.path.join(self.work, "nginx-direct.conf")
        with open(path, "w") as handle:
            handle.write(self.config())
        self.log = os.path.join(self.work, "direct-error.log")
        self.proc = spawn(["nginx", "-e", self.log, "-c", path, "-p", self.work], self.log, env=clean_env())
        wait_ready(self.proc, self.port, "nginx (direct)", self.log)


class StdlibDirect(Server):
    """The upstream without nginx: this file's own socket.sendfile server (mode _direct)."""

    name = "direct"

    def __init__(self, work, data):
        super().__init__(work)
        self.data, self.port = data, free_port()
        self.access = os.path.join(work, "direct-access.log")
        self.kind = "stdlib socket.sendfile server (nginx not installed)"

    def start(self):
        meta = os.path.join(self.work, "direct-paths.json")
        with open(meta, "w") as handle:
            json.dump(self.data["paths"], handle)
        self.log = os.path.join(self.work, "direct-error.log")
        self.proc = spawn([sys.executable, os.path.abspath(__file__), "_direct", self.data["root"], str(self.port),
                           meta, self.access], self.log, env=clean_env())
        wait_ready(self.proc, self.port, "stdlib direct server", self.log)


class NginxProxy(Server):
    name = "nginx"

    def __init__(self, work, direct_port, certs):
        super().__init__(work)
        self.direct_port, self.certs = direct_port, certs
        self.port = free_port()
        self.tls_port = free_port() if certs else None

    def config(self):
        tmp = os.path.join(self.work, "nginx-proxy")
        os.makedirs(tmp, exist_ok=True)
        values = dict(err=os.path.join(self.work, "nginx-error.log"), pid=os.path.join(tmp, "nginx.pid"),
                      tmp=tmp, access=os.path.join(self.work, "nginx-access.log"))
        location = """
        location / {
            proxy_pass http://direct;
        }"""
        servers = "    server {\n        listen 127.0.0.1:%d backlog=4096;%s\n    }\n" % (self.port, location)
        if self.certs:
            servers += ("    server {\n        listen 127.0.0.1:%d ssl backlog=4096;\n"
                        "        ssl_certificate %s;\n        ssl_certificate_key %s;\n"
                        "        ssl_protocols TLSv1.2 TLSv1.3;%s\n    }\n"
                        % (self.tls_port, self.certs["cert"], self.certs["key"], location))
        return (NGINX_COMMON % values) + "http {\n" + (NGINX_HTTP % values) + """
    upstream direct {
        server 127.0.0.1:%d;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 120s;
    }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    proxy_buffer_size 1m;
    proxy_buffers 4 1m;
    proxy_busy_buffers_size 2m;
%s}
""" % (self.direct_port, servers)

    def start(self):
        path = os.path.join(self.work, "nginx-proxy.conf")
        with open(path, "w") as handle:
            handle.write(self.config())
        self.log = os.path.join(self.work, "nginx-error.log")
        self.proc = spawn(["nginx", "-e", self.log, "-c", path, "-p", self.work], self.log, env=clean_env())
        wait_ready(self.proc, self.port, "nginx (proxy)", self.log)
        if self.tls_port:
            wait_ready(self.proc, self.tls_port, "nginx (proxy, https)", self.log, True, self.certs["ca"])


class Registry(Server):
    """docker-registry in pull-through mode; restarted with fresh storage for every cold measure."""

    name = "registry"

    def __init__(self, work, direct_port):
        super().__init__(work)
        self.direct_port, self.port, self.generation, self.root = direct_port, free_port(), 0, None

    def start(self):
        self.generation += 1
        self.root = os.path.join(self.work, "registry-%d" % self.generation)
        os.makedirs(self.root)
        config = os.path.join(self.root, "config.yml")
        with open(config, "w") as handle:
            handle.write("version: 0.1\nlog:\n  level: error\n"
                         "storage:\n  filesystem:\n    rootdirectory: %s\n"
                         "  cache:\n    blobdescriptor: inmemory\n"
                         "  maintenance:\n    uploadpurging:\n      enabled: false\n"
                         "http:\n  addr: 127.0.0.1:%d\n  secret: bench-%d\n"
                         "health:\n  storagedriver:\n    enabled: false\n"
                         "proxy:\n  remoteurl: http://127.0.0.1:%d\n"
                         % (os.path.join(self.root, "data"), self.port, random.getrandbits(48), self.direct_port))
        self.log = os.path.join(self.work, "registry.log")
        self.proc = spawn(["docker-registry", "serve", config], self.log, env=clean_env())
        wait_ready(self.proc, self.port, "docker-registry", self.log)

    def fresh(self):
        self.stop()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
        self.start()

    def stored(self, digest, size=None):
        hexdigest = digest.split(":")[1]
        path = os.path.join(self.root, "data", "docker", "registry", "v2", "blobs", "sha256", hexdigest[:2],
                            hexdigest, "data")
        try:
            return size is None or os.path.getsize(path) == size
        except OSError:
            return False


class Docxy(Server):
    def __init__(self, work, script, direct_port, name, certs=None, cache=False):
        super().__init__(work)
        self.script, self.direct_port, self.name = script, direct_port, name
        self.certs, self.cache = certs, cache
        self.port, self.generation, self.cache_dir = free_port(), 0, None

    def start(self):
        self.generation += 1
        argv = [sys.executable, self.script, "--listen", "127.0.0.1:%d" % self.port,
                "--upstream", "http://127.0.0.1:%d" % self.direct_port, "--registries", "docker.io"]
        if self.certs:
            argv += ["--cert", self.certs["cert"], "--key", self.certs["key"]]
        if self.cache:
            self.cache_dir = os.path.join(self.work, "%s-%d" % (self.name, self.generation))
            argv += ["--cache-dir", self.cache_dir, "--cache-max-size", "8G"]
        self.log = os.path.join(self.work, "%s.log" % self.name)
        self.proc = spawn(argv, self.log, env=clean_env())
        wait_ready(self.proc, self.port, self.name, self.log, bool(self.certs),
                   self.certs and self.certs["ca"])

    def fresh(self):
        self.stop()
        if self.cache_dir:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.start()

    def stored(self, digest, size=None):
        algorithm, hexdigest = digest.split(":")
        path = os.path.join(self.cache_dir, "objects", algorithm, hexdigest[:2], hexdigest)
        try:
            return size is None or os.path.getsize(path) == size
        except OSError:
            return False


class Target:
    def __init__(self, name, server, port, https=False, ca=None):
        self.name, self.server, self.port, self.https, self.ca = name, server, port, https, ca

    def url(self, path):
        return "%s://127.0.0.1:%d%s" % ("https" if self.https else "http", self.port, path)

    def pids(self):
        return self.server.pids()


def wait_until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after %ds waiting for %s" % (timeout, what))
        time.sleep(0.05)


# ------------------------------------------------------------------ clients (separate processes)

def run_client(mode, spec, timeout):
    """Run a client mode of this file in its own process; returns its JSON answer."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, json.dumps(spec)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    STARTED.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError("%s client did not finish within %ds" % (mode, timeout))
    finally:
        if proc in STARTED:
            STARTED.remove(proc)
    if proc.returncode != 0:
        raise RuntimeError("%s client failed: %s" % (mode, err.decode("utf-8", "replace").strip()[-500:]))
    return json.loads(out.decode().strip().splitlines()[-1])


def client_connection(url, ca, timeout=20):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=ssl.create_default_context(cafile=ca))
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def client_get(spec):
    """GET one URL on `streams` connections at once, reading with readinto into a 1 MiB buffer.
    Connections (and TLS handshakes) are made before the clock starts."""
    url, streams = spec["url"], spec.get("streams", 1)
    path = urllib.parse.urlsplit(url).path
    headers = dict({"User-Agent": USER_AGENT, "Accept": "*/*"}, **spec.get("headers", {}))
    barrier = threading.Barrier(streams)
    results = [None] * streams

    def one(number):
        result = {"status": None, "bytes": 0, "cache": None, "error": None, "start": None, "end": None}
        results[number] = result
        try:
            connection = client_connection(url, spec.get("ca"))
            connection.connect()
        except Exception as error:
            result["error"] = "connect: %s" % error
            barrier.abort()
            return
        try:
            barrier.wait()
            buffer = bytearray(MiB)
            view = memoryview(buffer)
            if number == 0:
                machine[0] = machine_cpu()
            result["start"] = time.perf_counter()
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            result["status"], result["cache"] = response.status, response.getheader("X-Docxy-Cache")
            total = 0
            while True:
                n = response.readinto(view)
                if not n:
                    break
                total += n
            result["end"] = time.perf_counter()
            result["bytes"] = total
        except Exception as error:
            result["error"] = "%s: %s" % (type(error).__name__, error)
        finally:
            connection.close()

    machine = [None]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    busy = busy_share(machine[0], machine_cpu())
    starts = [r["start"] for r in results if r["start"]]
    ends = [r["end"] for r in results if r["end"]]
    seconds = (max(ends) - min(starts)) if starts and ends else None
    return {"seconds": seconds, "bytes": sum(r["bytes"] for r in results),
            "statuses": sorted(set(r["status"] for r in results if r["status"] is not None)),
            "cache": sorted(set(r["cache"] for r in results if r["cache"])),
            "errors": sorted(set(r["error"] for r in results if r["error"]))[:3],
            "short": sum(1 for r in results if r["bytes"] != spec.get("expect", r["bytes"])), "busy": busy}


def client_pull(spec):
    """Pull an image the way dockerd does: /v2/, HEAD the tag, GET the index and the manifest by
    digest, GET the config, then the layers, up to 3 at once, each digest verified."""
    base, ca, repo, tag = spec["base"], spec.get("ca"), spec["repo"], spec["tag"]
    local = threading.local()
    counter = {"requests": 0, "bytes": 0}
    lock = threading.Lock()

    def request(method, path, headers=None):
        for attempt in (1, 2):
            connection = getattr(local, "connection", None)
            if connection is None:
                connection = local.connection = client_connection(base, ca)
            try:
                connection.request(method, path, headers=dict({"User-Agent": USER_AGENT}, **(headers or {})))
                with lock:
                    counter["requests"] += 1
                return connection.getresponse()
            except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
                connection.close()
                local.connection = None
                if attempt == 2:
                    raise

    def fetch(path, digest, accept=None):
        response = request("GET", path, {"Accept": accept} if accept else None)
        if response.status != 200:
            body = response.read()[:200]
            raise RuntimeError("GET %s: %d %r" % (path, response.status, body))
        hasher, size = hashlib.sha256(), 0
        buffer = bytearray(MiB)
        view = memoryview(buffer)
        keep = []
        while True:
            n = response.readinto(view)
            if not n:
                break
            hasher.update(view[:n])
            size += n
            if accept:
                keep.append(bytes(view[:n]))
        if "sha256:" + hasher.hexdigest() != digest:
            raise RuntimeError("GET %s: digest mismatch" % path)
        with lock:
            counter["bytes"] += size
        return b"".join(keep)

    started = time.perf_counter()
    response = request("GET", "/v2/")
    response.read()
    if response.status != 200:
        raise RuntimeError("/v2/ answered %d" % response.status)
    response = request("HEAD", "/v2/%s/manifests/%s" % (repo, tag), {"Accept": ACCEPT})
    response.read()
    digest = response.getheader("Docker-Content-Digest")
    if response.status != 200 or not digest:
        raise RuntimeError("HEAD manifest by tag: %d, digest %r" % (response.status, digest))
    document = json.loads(fetch("/v2/%s/manifests/%s" % (repo, digest), digest, ACCEPT))
    if document.get("mediaType") == INDEX_TYPE or "manifests" in document:
        chosen = [m for m in document["manifests"]
                  if m.get("platform", {}).get("os") == "linux" and m["platform"].get("architecture") == "amd64"]
        digest = chosen[0]["digest"]
        document = json.loads(fetch("/v2/%s/manifests/%s" % (repo, digest), digest, ACCEPT))
    fetch("/v2/%s/blobs/%s" % (repo, document["config"]["digest"]), document["config"]["digest"])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for future in [pool.submit(fetch, "/v2/%s/blobs/%s" % (repo, layer["digest"]), layer["digest"])
                       for layer in document["layers"]]:
            future.result()
    return {"seconds": time.perf_counter() - started, "requests": counter["requests"], "bytes": counter["bytes"]}


def client_load(spec):
    """Keep-alive load on `conns` connections from one process, one epoll loop, requests
    composed once: the stdlib stand-in for wrk, and the HEAD client (wrk 4.1 cannot parse
    answers to HEAD: it waits for the Content-Length body that never comes). Runs a list of
    cells, each starting at an agreed wall-clock time so that several processes run together."""
    parts = urllib.parse.urlsplit(spec["url"])
    https = parts.scheme == "https"
    context = ssl.create_default_context(cafile=spec.get("ca")) if https else None
    length_header = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
    answers = []

    def connect():
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if https:
            sock = context.wrap_socket(sock, server_hostname=parts.hostname)
        sock.setblocking(False)
        return sock

    def send(sock, data):
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view):]
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                time.sleep(0.0001)

    for cell in spec["cells"]:
        request = ("%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nAccept: %s\r\n\r\n" % (
            cell["method"], parts.path, parts.netloc, USER_AGENT, ACCEPT)).encode()
        head = cell["method"] == "HEAD"
        selector = selectors.DefaultSelector()
        connections = []
        for _ in range(cell["conns"]):
            connection = {"sock": connect(), "buffer": bytearray(), "start": 0.0}
            connections.append(connection)
            selector.register(connection["sock"], selectors.EVENT_READ, connection)
        latencies, errors, reconnects = [], 0, 0
        delay = cell["start"] - time.time()
        if delay > 0:
            time.sleep(delay)
        clock = time.perf_counter
        deadline = clock() + cell["seconds"]
        for connection in connections:
            connection["start"] = clock()
            send(connection["sock"], request)
        while True:
            now = clock()
            if now >= deadline:
                break
            for key, _ in selector.select(deadline - now):
                connection = key.data
                sock, buffer = connection["sock"], connection["buffer"]
                closed = False
                while True:
                    try:
                        data = sock.recv(262144)
                    except (BlockingIOError, ssl.SSLWantReadError):
                        break
                    except OSError:
                        data = b""
                    if not data:
                        closed = True
                        break
                    buffer += data
                    if not https or not sock.pending():
                        break
                while True:
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    size = end + 4
                    if not head:
                        match = length_header.search(buffer, 0, end + 2)
                        size += int(match.group(1)) if match else 0
                    if len(buffer) < size:
                        break
                    done = clock()
                    if buffer[9:12] != b"200":
                        errors += 1
                    latencies.append(done - connection["start"])
                    del buffer[:size]
                    if done < deadline:
                        connection["start"] = done
                        send(sock, request)
                if closed:
                    errors += 1 if buffer else 0
                    reconnects += 1
                    selector.unregister(sock)
                    sock.close()
                    connection["sock"], connection["buffer"] = connect(), bytearray()
                    selector.register(connection["sock"], selectors.EVENT_READ, connection)
                    connection["start"] = clock()
                    send(connection["sock"], request)
        for connection in connections:
            connection["sock"].close()
        selector.close()
        answers.append({"count": len(latencies), "errors": errors, "reconnects": reconnects,
                        "latencies": [round(x * 1e6) for x in latencies]})
    return answers


def direct_server(root, port, meta_path, access_path):
    """The stdlib upstream: registry paths from the data directory, socket.sendfile bodies."""
    with open(meta_path) as handle:
        paths = json.load(handle)
    log = open(access_path, "a", buffering=1)
    log_lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.serve(True)

        def do_HEAD(self):
            self.serve(False)

        def serve(self, body):
            path = self.path.partition("?")[0]
            with log_lock:
                log.write('%s "%s %s"\n' % (self.client_address[0], self.command, path))
            if path == "/v2/":
                return self.small(200, b"{}", "application/json", body)
            if path not in paths:
                return self.small(404, b"not found\n", "text/plain", body)
            kind, digest = paths[path]
            file_path = os.path.join(root, path.lstrip("/"))
            size = os.path.getsize(file_path)
            start, end, status = 0, size - 1, 200
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if match and int(match.group(1)) < size:
                start, status = int(match.group(1)), 206
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Docker-Content-Digest", digest)
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, size))
            self.end_headers()
            if body:
                self.wfile.flush()
                with open(file_path, "rb") as handle:
                    self.connection.sendfile(handle, start, end - start + 1)

        def small(self, status, payload, kind, body):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 4096

        def get_request(self):
            sock, address = self.socket.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, address

    Server(("127.0.0.1", port), Handler).serve_forever()


# ------------------------------------------------------------------ results

class Results:
    """values[measure][table][row][metric] = {round: value}; notes per (measure, table, row)."""

    def __init__(self):
        self.values, self.notes, self.skipped = {}, {}, {}

    def put(self, measure, table, row, rnd, **metrics):
        cell = self.values.setdefault(measure, {}).setdefault(table, {}).setdefault(row, {})
        for metric, value in metrics.items():
            cell.setdefault(metric, {})[rnd] = value

    def note(self, measure, table, row, text):
        notes = self.notes.setdefault((measure, table, row), [])
        if text not in notes:
            notes.append(text)

    def series(self, measure, table, row, metric):
        return self.values.get(measure, {}).get(table, {}).get(row, {}).get(metric, {})

    def ratios(self, measure, table, row, metric, ref_row, ref_table=None):
        """Per-round ratio row/ref_row, only for rounds in which both were measured."""
        mine = self.series(measure, table, row, metric)
        ref = self.series(measure, ref_table or table, ref_row, metric)
        return {r: mine[r] / ref[r] for r in mine if r in ref and mine[r] is not None and ref[r]
                and ref[r] is not None}


def summary(values, digits=0, suffix=""):
    """'median [min–max]' of a {round: value} mapping."""
    values = [v for v in (values.values() if isinstance(values, dict) else values) if v is not None]
    if not values:
        return "–"
    fmt = "%%.%df" % digits
    if len(values) == 1:
        return (fmt % values[0]) + suffix
    return "%s [%s–%s]%s" % (fmt % statistics.median(values), fmt % min(values), fmt % max(values), suffix)


def percent(values):
    return summary({key: 100 * value for key, value in values.items() if value is not None}, 0, "%")


def median(values):
    values = [v for v in (values.values() if isinstance(values, dict) else values) if v is not None]
    return statistics.median(values) if values else None


def table(headers, rows):
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)] if rows else map(len, headers)
    widths = list(widths)
    lines = ["  " + "  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  " + "  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


# ------------------------------------------------------------------ the benchmark

class Bench:
    def __init__(self, args):
        self.args = args
        self.sizes = dict(QUICK if args.quick else FULL)
        if args.cell:
            self.sizes["cell"] = args.cell
        self.results = Results()
        self.targets, self.skips = {}, {}
        self.servers = []
        self.wrk = shutil.which("wrk")
        self.lua = {}

    # -- setup

    def setup(self):
        args = self.args
        self.work = tempfile.mkdtemp(prefix="docxy-bench-")
        os.chmod(self.work, 0o755)
        say("working in %s" % self.work)
        script = os.path.abspath(args.docxy)
        if not os.path.isfile(script):
            raise SystemExit("bench: docxy not found at %s (use --docxy PATH)" % script)
        # A copy: the file under test cannot change between the rounds of one run.
        self.docxy = os.path.join(self.work, "docxy.py")
        shutil.copyfile(script, self.docxy)
        with open(self.docxy, "rb") as handle:
            self.docxy_sha = hashlib.sha256(handle.read()).hexdigest()[:16]
        self.docxy_help = subprocess.run([sys.executable, self.docxy, "--help"], stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, timeout=30).stdout.decode()
        self.data = make_data(os.path.join(self.work, "data"), self.sizes)
        try:
            self.certs = make_certificates(os.path.join(self.work, "certs"))
        except Skip as error:
            self.certs = None
            self.skips["nginx-https"] = self.skips["docxy-https"] = str(error)
        except subprocess.CalledProcessError as error:
            self.certs = None
            self.skips["nginx-https"] = self.skips["docxy-https"] = "openssl failed: %s" % error.stderr[-200:]
        have_nginx = shutil.which("nginx")
        direct = (NginxDirect if have_nginx else StdlibDirect)(self.work, self.data)
        self.start(direct)
        self.direct = direct
        self.targets["direct"] = Target("direct", direct, direct.port)
        wanted = set(args.targets.split(",")) if args.targets else set(TARGETS)
        if not have_nginx:
            self.skips["nginx"] = self.skips["nginx-https"] = "nginx not installed"
        elif wanted & {"nginx", "nginx-https"}:
            proxy = NginxProxy(self.work, direct.port, self.certs)
            self.start(proxy)
            if "nginx" in wanted:
                self.targets["nginx"] = Target("nginx", proxy, proxy.port)
            if self.certs and "nginx-https" in wanted:
                self.targets["nginx-https"] = Target("nginx-https", proxy, proxy.tls_port, True, self.certs["ca"])
        if not shutil.which("docker-registry"):
            self.skips["registry"] = "docker-registry (CNCF distribution) not installed"
        elif "registry" in wanted:
            self.registry = Registry(self.work, direct.port)
            self.start(self.registry)
            self.targets["registry"] = Target("registry", self.registry, self.registry.port)
        if "docxy" in wanted:
            server = Docxy(self.work, self.docxy, direct.port, "docxy")
            self.start(server)
            self.targets["docxy"] = Target("docxy", server, server.port)
        if self.certs and "docxy-https" in wanted:
            server = Docxy(self.work, self.docxy, direct.port, "docxy-https", certs=self.certs)
            self.start(server)
            self.targets["docxy-https"] = Target("docxy-https", server, server.port, True, self.certs["ca"])
        if "--cache-dir" not in self.docxy_help:
            self.skips["docxy-cache"] = "this docxy has no --cache-dir"
        elif "docxy-cache" in wanted:
            server = Docxy(self.work, self.docxy, direct.port, "docxy-cache", cache=True)
            self.start(server)
            self.targets["docxy-cache"] = Target("docxy-cache", server, server.port)
        for name in TARGETS:
            if name not in wanted and name != "direct":
                self.skips.setdefault(name, "not selected (--targets)")
        if not self.wrk:
            say("wrk not installed: manifest requests use the stdlib threaded client (slower; compare "
                "figures only within this run)")

    def start(self, server):
        server.start()
        self.servers.append(server)

    def fresh(self, *names):
        """Restart stateful targets with empty storage: the next fetch is a true miss."""
        for name in names:
            target = self.targets.get(name)
            if target:
                target.server.fresh()

    def have(self, *names):
        return all(name in self.targets for name in names)

    def skip_reason(self, name):
        return self.skips.get(name, "not started")

    # -- machine

    def machine(self):
        def version(argv):
            try:
                out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10).stdout
                return out.decode("utf-8", "replace").strip().splitlines()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                return "not installed"
        model = "?"
        try:
            with open("/proc/cpuinfo") as handle:
                for line in handle:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        try:
            with open("/proc/meminfo") as handle:
                memory = "%.1f GiB" % (int(handle.readline().split()[1]) / 1024 / 1024)
        except (OSError, ValueError, IndexError):
            memory = "?"
        return [
            ("cpus", "%d (nproc %d), %s" % (os.cpu_count(), len(os.sched_getaffinity(0)), model)),
            ("memory", memory),
            ("kernel", "%s %s" % (platform.system(), platform.release())),
            ("python", sys.version.split()[0]),
            ("docxy", "%s (sha256 %s…)" % (version([sys.executable, self.docxy, "--version"]), self.docxy_sha)),
            ("nginx", version(["nginx", "-v"])),
            ("docker-registry", version(["docker-registry", "--version"])),
            ("wrk", version(["wrk", "--version"]) if self.wrk else "not installed (stdlib client)"),
            ("openssl", version(["openssl", "version"])),
            ("direct", self.direct.kind),
            ("file writes", self.write_speed()),
            ("load average", "%.2f %.2f %.2f at start" % os.getloadavg()),
        ]

    def write_speed(self):
        """Page-cache write speed of the work directory: what bounds every cache miss that
        writes what it streams (docxy-cache miss); the registry stores on a second fetch."""
        path = os.path.join(self.work, "write-test")
        block = os.urandom(MiB)
        size = (64 if self.args.quick else 256) * MiB
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            started = time.perf_counter()
            for _ in range(size // MiB):
                os.write(descriptor, block)
            seconds = time.perf_counter() - started
        finally:
            os.close(descriptor)
            os.unlink(path)
        return "%.0f MiB/s (%d MiB of 1 MiB os.write calls to the work directory, no fsync)" % (
            size / MiB / seconds, size // MiB)

    # -- helpers

    def get(self, target, path, streams=1, headers=None, expect=None, status=200):
        """Run the GET client against a target; returns (MiB/s, server CPU s/GiB, peak RSS MiB, cache)."""
        pids = target.pids()
        if not pids:
            raise RuntimeError("%s is not running" % target.name)
        cpu0 = cpu_seconds(pids)
        sampler = RssSampler(pids)
        sampler.start()
        try:
            size = expect * streams
            answer = run_client("_get", {"url": target.url(path), "streams": streams, "headers": headers or {},
                                         "ca": target.ca, "expect": expect},
                                timeout=120 + size / (20 * MiB))
        finally:
            peak = sampler.finish()
        cpu = cpu_seconds(pids) - cpu0
        self.last_busy = answer.get("busy")
        if answer["errors"] or answer["statuses"] != [status] or answer["short"] or answer["bytes"] != size:
            raise RuntimeError("GET %s: statuses %s, %d of %d bytes, %d short streams, errors %s" % (
                path, answer["statuses"], answer["bytes"], size, answer["short"], answer["errors"]))
        return (answer["bytes"] / MiB / answer["seconds"], cpu / (answer["bytes"] / GiB), peak,
                ",".join(answer["cache"]))

    def warm_up(self, path, size):
        """One unmeasured transfer from `direct` before a round's first cell: the first GiB after
        restarting the stateful targets ran at half speed (twice the CPU per byte, whichever
        target came first), once a round."""
        settle()
        if self.have("direct"):
            try:
                self.get(self.targets["direct"], path, 1, None, size)
            except (RuntimeError, OSError, http.client.HTTPException, ValueError) as error:
                say("  warm-up failed: %s" % error)

    def attempt(self, measure, tbl, row, rnd, function):
        """Run one cell; a failure is recorded (and printed) as such, never as a figure."""
        try:
            function()
        except Skip as error:
            self.results.note(measure, tbl, row, "skipped: %s" % error)
        except (RuntimeError, OSError, http.client.HTTPException, ValueError, KeyError) as error:
            text = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            self.results.note(measure, tbl, row, "round %d: %s" % (rnd, text))
            say("  %s / %s: FAILED: %s" % (tbl or measure, row, text))

    def rotate(self, units, rnd):
        shift = rnd % len(units) if units else 0
        return units[shift:] + units[:shift]

    # -- measure 1: one large blob, one stream

    def measure_blob(self, rnd):
        data, measure = self.data, "blob"
        path = "/v2/library/big/blobs/" + data["big"]
        size = data["big_size"]
        self.fresh("registry", "docxy-cache")
        self.warm_up(path, size)

        def plain(row, name, headers=None, status=200, expect_cache=None):
            def run():
                target = self.targets[name]
                mibs, cpu, _, cache = self.get(target, path, 1, headers, size, status)
                self.results.put(measure, "", row, rnd, mibs=mibs, cpu=cpu, busy=self.last_busy)
                if expect_cache and cache != expect_cache:
                    self.results.note(measure, "", row, "round %d: X-Docxy-Cache was %r, not %r"
                                      % (rnd, cache, expect_cache))
                say("  blob %-26s %8.0f MiB/s  %.2f CPU s/GiB  machine %3.0f%% busy%s" % (
                    row, mibs, cpu, 100 * (self.last_busy or 0), "  cache=" + cache if cache else ""))
            self.attempt(measure, "", row, rnd, run)

        def registry_pair():
            plain("registry (miss)", "registry")
            try:
                wait_until(lambda: self.registry.stored(data["big"], size), 180, "the registry to store the blob")
            except RuntimeError as error:
                self.results.note(measure, "", "registry (hit)", "round %d: %s" % (rnd, error))
                return
            plain("registry (hit)", "registry")

        def cache_pair():
            plain("docxy-cache (miss)", "docxy-cache", expect_cache="miss")
            server = self.targets["docxy-cache"].server
            try:
                wait_until(lambda: server.stored(data["big"], size), 180, "docxy to commit the blob")
            except RuntimeError as error:
                self.results.note(measure, "", "docxy-cache (hit)", "round %d: %s" % (rnd, error))
                return
            plain("docxy-cache (hit)", "docxy-cache", expect_cache="hit")

        units = []
        for name, row in (("direct", "direct"), ("nginx", "nginx"), ("nginx-https", "nginx (https)"),
                          ("docxy", "docxy"), ("docxy-https", "docxy (https)")):
            if self.have(name):
                units.append(lambda name=name, row=row: plain(row, name))
        if self.have("docxy"):
            units.append(lambda: plain("docxy (range, unverified)", "docxy", {"Range": "bytes=0-"}, 206))

        def ceiling():
            mibs, cpu = hash_speed(size)
            self.results.put(measure, "", HASH_ROW, rnd, mibs=mibs, cpu=cpu, busy=None)
            say("  blob %-26s %8.0f MiB/s  %.2f CPU s/GiB" % (HASH_ROW, mibs, cpu))
        units.append(ceiling)
        if self.have("registry"):
            units.append(registry_pair)
        if self.have("docxy-cache"):
            units.append(cache_pair)
        for unit in self.rotate(units, rnd):
            unit()
            settle()

    # -- measure 2: concurrent GETs of one medium blob

    def measure_concurrent(self, rnd):
        data, measure = self.data, "concurrent"
        path = "/v2/library/big/blobs/" + data["mid"]
        size, streams = data["mid_size"], self.sizes["streams"]
        self.fresh("registry", "docxy-cache")

        def run(row, name, expect_cache=None):
            def go():
                mibs, cpu, peak, cache = self.get(self.targets[name], path, streams, None, size)
                self.results.put(measure, "", row, rnd, mibs=mibs, cpu=cpu, rss=peak, busy=self.last_busy)
                if expect_cache and cache != expect_cache:
                    self.results.note(measure, "", row, "round %d: X-Docxy-Cache was %r, not %r"
                                      % (rnd, cache, expect_cache))
                say("  %dx %-26s %8.0f MiB/s  peak RSS %5.1f MiB  %.2f CPU s/GiB  machine %3.0f%% busy%s" % (
                    streams, row, mibs, peak, cpu, 100 * (self.last_busy or 0), "  cache=" + cache if cache else ""))
            self.attempt(measure, "", row, rnd, go)

        def registry_hit():
            def warm():
                self.get(self.targets["registry"], path, 1, None, size)
                wait_until(lambda: self.registry.stored(data["mid"], size), 120, "the registry to store the blob")
            self.attempt(measure, "", "registry (hit)", rnd, warm)
            run("registry (hit)", "registry")

        def cache_pair():
            run("docxy-cache (miss, coalesced)", "docxy-cache")
            server = self.targets["docxy-cache"].server
            self.attempt(measure, "", "docxy-cache (hit)", rnd,
                         lambda: wait_until(lambda: server.stored(data["mid"], size), 120, "docxy to commit"))
            run("docxy-cache (hit)", "docxy-cache", expect_cache="hit")

        units = []
        for name, row in (("direct", "direct"), ("nginx", "nginx"), ("nginx-https", "nginx (https)"),
                          ("docxy", "docxy"), ("docxy-https", "docxy (https)")):
            if self.have(name):
                units.append(lambda name=name, row=row: run(row, name))
        if self.have("registry"):
            units.append(registry_hit)
        if self.have("docxy-cache"):
            units.append(cache_pair)
        for unit in self.rotate(units, rnd):
            unit()
            settle()

    # -- measure 3: manifests by tag

    def lua_script(self, method):
        if method not in self.lua:
            path = os.path.join(self.work, "wrk-%s.lua" % method.lower())
            with open(path, "w") as handle:
                handle.write('wrk.method = "%s"\nwrk.headers["Accept"] = "%s"\nwrk.headers["User-Agent"] = "%s"\n'
                             % (method, ACCEPT, USER_AGENT))
                handle.write("function done(summary, latency, requests)\n"
                             "  local e = summary.errors\n"
                             '  io.write(string.format("BENCHWRK %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f\\n",\n'
                             "    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),\n"
                             "    e.connect, e.read, e.write, e.status, e.timeout))\nend\n")
            self.lua[method] = path
        return self.lua[method]

    def wrk_cell(self, target, method, conns, seconds):
        """(req/s, p50 ms, p99 ms, errors) from wrk: `conns` keep-alive connections, 2 threads."""
        url = target.url("/v2/library/app/manifests/latest")
        argv = ["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", "%ds" % max(1, round(seconds)),
                "--timeout", "5s", "--latency", "-s", self.lua_script(method), url]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        STARTED.append(proc)
        try:
            out, _ = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError("wrk did not finish")
        finally:
            if proc in STARTED:
                STARTED.remove(proc)
        text = out.decode("utf-8", "replace")
        match = re.search(r"^BENCHWRK (.*)$", text, re.M)
        if not match:
            raise RuntimeError("wrk failed: %s" % text.strip()[-300:])
        requests, duration, p50, p99, *errors = [float(x) for x in match.group(1).split()]
        if not requests:
            raise RuntimeError("wrk completed no request in %gs" % seconds)
        return requests / (duration / 1e6), p50 / 1000, p99 / 1000, int(sum(errors))

    def load_cells(self, target, cells, seconds):
        """Run cells [(method, conns)] with the stdlib load client: two processes (like wrk -t 2),
        connections split between them, every cell starting at the same agreed instant.
        Returns {(method, conns): (req/s, p50 ms, p99 ms, errors)}."""
        processes, gap = 2, (0.12 if self.args.quick else 0.5)
        first = time.time() + (0.35 if self.args.quick else 0.5)
        specs = []
        for number in range(processes):
            plan = []
            for index, (method, conns) in enumerate(cells):
                share = conns // processes + (1 if number < conns % processes else 0)
                plan.append({"method": method, "conns": share, "seconds": seconds,
                             "start": first + index * (seconds + gap)})
            specs.append({"url": target.url("/v2/library/app/manifests/latest"), "ca": target.ca, "cells": plan})
        timeout = 60 + len(cells) * (seconds + gap)
        with concurrent.futures.ThreadPoolExecutor(processes) as pool:
            answers = list(pool.map(lambda spec: run_client("_load", spec, timeout), specs))
        results = {}
        for index, cell in enumerate(cells):
            parts = [answer[index] for answer in answers]
            latencies = sorted(x for part in parts for x in part["latencies"])
            count = sum(part["count"] for part in parts)
            if not count:
                raise RuntimeError("%s c=%d: no request completed" % cell)
            pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1000.0
            results[cell] = (count / seconds, pick(0.50), pick(0.99), sum(part["errors"] for part in parts))
        return results

    def measure_manifest(self, rnd):
        measure, seconds = "manifest", self.sizes["cell"]
        path = "/v2/library/app/manifests/latest"
        wrk = self.wrk and not self.args.quick      # wrk cells are whole seconds

        def record(name, method, conns, figures):
            rps, p50, p99, errors = figures
            tbl = "%s c=%d" % (method, conns)
            self.results.put(measure, tbl, name, rnd, rps=rps, p50=p50, p99=p99)
            if errors:
                self.results.note(measure, tbl, name, "round %d: %d errors or non-200 answers" % (rnd, errors))
            say("  %-5s c=%-3d %-12s %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms%s" % (
                method, conns, name, rps, p50, p99, "  ERRORS %d" % errors if errors else ""))

        def unit(name):
            target = self.targets[name]

            def warm():     # the stateful targets learn the tag and the manifest first
                for method in ("GET", "HEAD", "GET"):
                    status = http_call(target.port, method, path, target.https, target.ca,
                                       {"Accept": ACCEPT})[0]
                    if status != 200:
                        raise RuntimeError("%s %s answered %d" % (method, path, status))
            self.attempt(measure, "HEAD c=1", name, rnd, warm)
            stdlib = [("HEAD", c) for c in self.sizes["conns"]]
            if not wrk:
                stdlib += [("GET", c) for c in self.sizes["conns"]]

            def run_stdlib():
                for (method, conns), figures in self.load_cells(target, stdlib, seconds).items():
                    record(name, method, conns, figures)
            self.attempt(measure, "HEAD c=%d" % self.sizes["conns"][0], name, rnd, run_stdlib)
            if wrk:
                for conns in self.sizes["conns"]:
                    self.attempt(measure, "GET c=%d" % conns, name, rnd,
                                 lambda: record(name, "GET", conns, self.wrk_cell(target, "GET", conns, seconds)))

        names = [n for n in ("direct", "nginx", "nginx-https", "registry", "docxy", "docxy-https", "docxy-cache")
                 if self.have(n)]
        for name in self.rotate(names, rnd):
            unit(name)

    # -- measure 4: idle keep-alive connections

    def measure_idle(self, rnd):
        measure, count = "idle", self.sizes["idle"]

        def unit(name):
            target = self.targets[name]

            def run():
                pids = target.pids()
                before = rss_mib(pids)
                connections = []
                try:
                    context = ssl.create_default_context(cafile=target.ca) if target.https else None
                    for _ in range(count):
                        connection = (http.client.HTTPSConnection("127.0.0.1", target.port, timeout=30,
                                                                  context=context)
                                      if target.https else http.client.HTTPConnection("127.0.0.1", target.port,
                                                                                      timeout=30))
                        connections.append(connection)
                        connection.request("GET", "/v2/", headers={"User-Agent": USER_AGENT})
                        response = connection.getresponse()
                        response.read()
                        if response.status != 200:
                            raise RuntimeError("/v2/ answered %d on connection %d" % (response.status,
                                                                                     len(connections)))
                    time.sleep(0.3 if self.args.quick else 1.0)
                    pids = target.pids()
                    during = rss_mib(pids)
                    probes = []
                    for _ in range(5):
                        started = time.perf_counter()
                        status = http_call(target.port, "GET", "/v2/", target.https, target.ca, timeout=10)[0]
                        probes.append((time.perf_counter() - started) * 1000)
                        if status != 200:
                            raise RuntimeError("new client: /v2/ answered %d" % status)
                        time.sleep(0.05)
                    for connection in connections[:: max(1, count // 20)]:    # still open and served?
                        connection.request("GET", "/v2/", headers={"User-Agent": USER_AGENT})
                        response = connection.getresponse()
                        response.read()
                finally:
                    for connection in connections:
                        connection.close()
                new = statistics.median(probes)
                self.results.put(measure, "", name, rnd, rss=during, base=before, delta=during - before,
                                 new=new, worst=max(probes))
                say("  idle %-12s RSS %6.1f MiB (before %5.1f) with %d idle; new client %.1f ms (worst %.1f)"
                    % (name, during, before, count, new, max(probes)))
            self.attempt(measure, "", name, rnd, run)
            time.sleep(0.2 if self.args.quick else 0.5)

        names = [n for n in ("direct", "nginx", "nginx-https", "registry", "docxy", "docxy-https", "docxy-cache")
                 if self.have(n)]
        for name in self.rotate(names, rnd):
            unit(name)

    # -- measure 5: whole-image pull

    def direct_requests(self):
        try:
            return os.path.getsize(self.direct.access), self.count_lines(0)
        except OSError:
            return 0, 0

    def count_lines(self, offset):
        with open(self.direct.access, "rb") as handle:
            handle.seek(offset)
            return handle.read().count(b"\n")

    def measure_pull(self, rnd):
        measure, data = "pull", self.data
        self.fresh("registry", "docxy-cache")

        def pull(row, name):
            def run():
                target = self.targets[name]
                pids = target.pids()
                cpu0 = cpu_seconds(pids)
                offset = os.path.getsize(self.direct.access)
                log_offset = os.path.getsize(target.server.log) if isinstance(target.server, Docxy) else None
                answer = run_client("_pull", {"base": target.url(""), "ca": target.ca, "repo": "library/app",
                                              "tag": "latest"}, timeout=300)
                time.sleep(0.2)     # let the access log catch up
                upstream = self.count_lines(offset)
                cpu = cpu_seconds(pids) - cpu0
                self.results.put(measure, "", row, rnd, wall=answer["seconds"], upstream=upstream, cpu=cpu,
                                 requests=answer["requests"])
                extra = ""
                if log_offset is not None:
                    with open(target.server.log, "rb") as handle:
                        handle.seek(log_offset)
                        lines = [l for l in handle.read().decode("utf-8", "replace").splitlines()
                                 if " upstream=" in l]
                    asked = [l for l in lines if not re.search(r" upstream=-(\s|$)", l)]
                    self.results.put(measure, "", row, rnd, docxy_upstream=len(asked))
                    extra = "  docxy log: %d of %d requests went upstream" % (len(asked), len(lines))
                say("  pull %-22s %6.2f s  %d requests  upstream (at direct) %d%s" % (
                    row, answer["seconds"], answer["requests"], upstream, extra))
            self.attempt(measure, "", row, rnd, run)

        def stored_all(server):
            digests = data["layers"] + [data["config"], data["manifest"], data["index"]]
            if isinstance(server, Registry):
                digests = data["layers"] + [data["config"]]
            return lambda: all(server.stored(d) for d in digests)

        def pair(name):
            def run():
                pull("%s (cold)" % name, name)
                self.attempt(measure, "", "%s (warm)" % name, rnd,
                             lambda: wait_until(stored_all(self.targets[name].server), 120,
                                                "%s to store the image" % name))
                pull("%s (warm)" % name, name)
            return run

        units = []
        for name in ("direct", "nginx", "nginx-https", "docxy", "docxy-https"):
            if self.have(name):
                units.append(lambda name=name: pull(name, name))
        for name in ("registry", "docxy-cache"):
            if self.have(name):
                units.append(pair(name))
        for unit in self.rotate(units, rnd):
            unit()
            settle()

    # -- the run

    def run(self):
        measures = self.args.measures
        rounds = self.args.rounds
        started = time.monotonic()
        for rnd in range(1, rounds + 1):
            for measure in measures:
                say("round %d/%d: %s" % (rnd, rounds, MEASURE_TITLES[measure]))
                began = time.monotonic()
                getattr(self, "measure_" + measure)(rnd)
                say("  (%s took %.0f s)" % (measure, time.monotonic() - began))
                for server in self.servers:
                    if not server.alive():
                        say("WARNING: %s died; restarting it" % server.name)
                        self.results.note("_", "", server.name, "round %d: the process died (see its log)" % rnd)
                        server.start()
            say("round %d done after %.0fs" % (rnd, time.monotonic() - started))
        self.elapsed = time.monotonic() - started

    # -- the report

    def report(self):
        out = []
        w = out.append
        sizes, res = self.sizes, self.results
        w("docxy benchmark — %s run, %d rounds, targets interleaved round by round" % (
            "quick" if self.args.quick else "full", self.args.rounds))
        w("every figure: median [min–max] over the rounds; every ratio: computed within each round, "
          "then summarised the same way")
        w("")
        w("machine")
        for key, value in self.machine_info:
            w("  %-16s %s" % (key, value))
        w("  %-16s %.2f %.2f %.2f at end; run took %.0f s" % (("load average",) + os.getloadavg() + (self.elapsed,)))
        if self.skips:
            w("")
            w("skipped targets")
            for name in TARGETS:
                if name in self.skips:
                    w("  %-12s %s" % (name, self.skips[name]))

        def ratio(measure, tbl, row, metric, ref, digits=2, ref_table=None):
            if ref is None or row == ref:
                return ""
            values = res.ratios(measure, tbl, row, metric, ref, ref_table)
            return summary(values, digits, "×") if values else "–"

        def notes_for(measure, rows, tables=("",)):
            lines = []
            for tbl in tables:
                for row in rows:
                    for text in res.notes.get((measure, tbl, row), []):
                        lines.append("  note: %s%s: %s" % (tbl + " " if tbl else "", row, text))
            return lines

        def https_of(row):
            return "(https)" in row or row.endswith("-https")

        selected = self.args.measures
        if "blob" in selected:
            rows = ["direct", "nginx", "nginx (https)", "registry (miss)", "registry (hit)", "docxy",
                    "docxy (range, unverified)", "docxy (https)", "docxy-cache (miss)", "docxy-cache (hit)",
                    HASH_ROW]
            registry_ref = {"docxy-cache (miss)": "registry (miss)", "docxy-cache (hit)": "registry (hit)",
                            "docxy": "registry (miss)"}
            body = []
            for row in rows:
                if not res.series("blob", "", row, "mibs") and not res.notes.get(("blob", "", row)):
                    continue
                body.append((row, summary(res.series("blob", "", row, "mibs")),
                             ratio("blob", "", row, "mibs", "nginx (https)" if https_of(row) else "nginx"),
                             ratio("blob", "", row, "mibs", "direct"),
                             ratio("blob", "", row, "mibs", registry_ref.get(row)),
                             summary(res.series("blob", "", row, "cpu"), 2),
                             percent(res.series("blob", "", row, "busy"))))
            w("")
            w("%s: %d MiB, client reads with readinto into a 1 MiB buffer, own process"
              % (MEASURE_TITLES["blob"], sizes["big"] // MiB))
            w(table(("target", "MiB/s", "× nginx*", "× direct", "× registry**", "server CPU s/GiB", "machine busy"),
                    body))
            w("  * https rows vs nginx (https).  ** cache rows vs the registry's miss/hit; docxy vs registry (miss)")
            w("  machine busy: the share of all cores in use while the bytes flowed, load client and upstream included.")
            w("  %s: no server; the bench itself hashes the blob's size in memory on one core. No proxy that"
              % HASH_ROW)
            w("  checks a stream's sha256 on the way through can pass that stream faster.")
            w("  registry (miss): distribution 2.8 streams the blob to the client and fetches it a second time in the")
            w("  background to store it; its hit is measured once that stored copy exists. docxy-cache (miss) writes")
            w("  what it streams: see 'file writes' under machine for this disk's page-cache write speed")
            out.extend(notes_for("blob", rows))

        if "concurrent" in selected:
            rows = ["direct", "nginx", "nginx (https)", "registry (hit)", "docxy", "docxy (https)",
                    "docxy-cache (miss, coalesced)", "docxy-cache (hit)"]
            body = []
            for row in rows:
                if not res.series("concurrent", "", row, "mibs") and not res.notes.get(("concurrent", "", row)):
                    continue
                body.append((row, summary(res.series("concurrent", "", row, "mibs")),
                             ratio("concurrent", "", row, "mibs", "nginx (https)" if https_of(row) else "nginx"),
                             ratio("concurrent", "", row, "mibs", "direct"),
                             summary(res.series("concurrent", "", row, "rss"), 1),
                             summary(res.series("concurrent", "", row, "cpu"), 2),
                             percent(res.series("concurrent", "", row, "busy"))))
            w("")
            w("%s: %d × %d MiB at once" % (MEASURE_TITLES["concurrent"], sizes["streams"], sizes["mid"] // MiB))
            w(table(("target", "aggregate MiB/s", "× nginx*", "× direct", "peak RSS MiB", "server CPU s/GiB",
                     "machine busy"), body))
            w("  * https rows vs nginx (https). Peak RSS: all server processes (nginx: master + workers), "
              "VmHWM reset before each run")
            out.extend(notes_for("concurrent", rows))

        if "manifest" in selected:
            names = ["direct", "nginx", "nginx-https", "registry", "docxy", "docxy-https", "docxy-cache"]
            tables = ["%s c=%d" % (m, c) for m in ("HEAD", "GET") for c in sizes["conns"]]
            w("")
            w("%s: library/app:latest (an OCI index), %g s per cell, Accept as dockerd sends it" % (
                MEASURE_TITLES["manifest"], sizes["cell"]))
            w("  HEAD: stdlib epoll keep-alive client, 2 processes (wrk 4.1 cannot parse answers to HEAD)")
            w("  GET:  %s" % ("wrk -t 2 --latency with a Lua script" if self.wrk and not self.args.quick else
                             "the same stdlib client (%s)" % ("--quick: cells shorter than wrk's 1 s"
                                                              if self.wrk else "wrk not installed")))
            for method in ("HEAD", "GET"):
                body = []
                for conns in sizes["conns"]:
                    tbl = "%s c=%d" % (method, conns)
                    for name in names:
                        if not res.series("manifest", tbl, name, "rps") and not res.notes.get(("manifest", tbl, name)):
                            continue
                        body.append(("%s c=%d" % (method, conns), name,
                                     summary(res.series("manifest", tbl, name, "rps")),
                                     ratio("manifest", tbl, name, "rps", "nginx-https" if https_of(name) else "nginx"),
                                     ratio("manifest", tbl, name, "rps", "registry"),
                                     summary(res.series("manifest", tbl, name, "p50"), 2),
                                     summary(res.series("manifest", tbl, name, "p99"), 2)))
                w(table(("cell", "target", "req/s", "× nginx*", "× registry", "p50 ms", "p99 ms"), body))
            w("  * https rows vs nginx-https")
            out.extend(notes_for("manifest", names, tables))

        if "idle" in selected:
            names = ["direct", "nginx", "nginx-https", "registry", "docxy", "docxy-https", "docxy-cache"]
            body = []
            for name in names:
                if not res.series("idle", "", name, "rss") and not res.notes.get(("idle", "", name)):
                    continue
                body.append((name, summary(res.series("idle", "", name, "rss"), 1),
                             summary(res.series("idle", "", name, "base"), 1),
                             ratio("idle", "", name, "rss", "nginx-https" if https_of(name) else "nginx"),
                             summary(res.series("idle", "", name, "new"), 1),
                             summary(res.series("idle", "", name, "worst"), 1)))
            w("")
            w("%s: %d connections, each after one GET /v2/, then a new client's GET /v2/ (5 probes)" % (
                MEASURE_TITLES["idle"], sizes["idle"]))
            w(table(("target", "RSS MiB with idle", "RSS MiB before", "RSS × nginx*", "new client ms (median)",
                     "new client ms (worst)"), body))
            w("  * https rows vs nginx-https")
            out.extend(notes_for("idle", names))

        if "pull" in selected:
            rows = ["direct", "nginx", "nginx-https", "registry (cold)", "registry (warm)", "docxy", "docxy-https",
                    "docxy-cache (cold)", "docxy-cache (warm)"]
            registry_ref = {"docxy-cache (cold)": "registry (cold)", "docxy-cache (warm)": "registry (warm)",
                            "docxy": "registry (cold)"}
            body = []
            for row in rows:
                if not res.series("pull", "", row, "wall") and not res.notes.get(("pull", "", row)):
                    continue
                body.append((row, summary(res.series("pull", "", row, "wall"), 3),
                             ratio("pull", "", row, "wall", "direct"),
                             ratio("pull", "", row, "wall", "nginx-https" if https_of(row) else "nginx"),
                             ratio("pull", "", row, "wall", registry_ref.get(row)),
                             summary(res.series("pull", "", row, "upstream")),
                             summary(res.series("pull", "", row, "docxy_upstream")),
                             summary(res.series("pull", "", row, "cpu"), 2)))
            w("")
            w("%s: %d layers (%s MiB) in an OCI index with one platform; 3 layers at once; digests verified" % (
                MEASURE_TITLES["pull"], len(sizes["layers"]), "+".join(map(str, sizes["layers"]))))
            w(table(("target", "wall s", "× direct", "× nginx*", "× registry", "requests at direct",
                     "upstream= in docxy log", "server CPU s"), body))
            w("  ratios are time ratios: lower is faster; * https rows vs nginx-https. "
              "'requests at direct': lines the upstream's access log gained during the pull")
            out.extend(notes_for("pull", rows))

        died = [text for (m, _, row), texts in res.notes.items() if m == "_" for text in texts]
        if died:
            w("")
            w("processes that died: " + "; ".join(died))
        out.extend(self.targets_block())
        out.extend(self.log_summary())
        return "\n".join(out)

    def targets_block(self):
        res = self.results
        out = ["", "targets (issue 6): PASS when the median of the per-round figures meets the bound; "
                   "per-round figures listed"]

        def line(title, values, bound, higher=True, digits=2, unit="×", strict=False):
            values = {r: v for r, v in values.items() if v is not None}
            if not values:
                out.append("  SKIP  %s: not measured" % title)
                return
            m = statistics.median(values.values())
            ok = (m > bound if strict else m >= bound) if higher else (m < bound if strict else m <= bound)
            fmt = "%%.%df" % digits
            per_round = " ".join(fmt % values[r] for r in sorted(values))
            out.append("  %s  %s: %s%s (rounds: %s)" % ("PASS" if ok else "FAIL", title, fmt % m, unit, per_round))

        line("large blob over HTTPS, docxy (https) ≥ 1.0× nginx (https)",
             res.ratios("blob", "", "docxy (https)", "mibs", "nginx (https)"), 1.0)
        line("large blob, plain HTTP, docxy ≥ 1.0× nginx", res.ratios("blob", "", "docxy", "mibs", "nginx"), 1.0)
        line("large blob, plain HTTP, stretch: docxy ≥ 1.3× nginx",
             res.ratios("blob", "", "docxy", "mibs", "nginx"), 1.3)
        line("32 concurrent downloads, docxy ≥ 0.95× nginx aggregate",
             res.ratios("concurrent", "", "docxy", "mibs", "nginx"), 0.95)
        line("32 concurrent downloads, docxy peak RSS ≤ 64 MiB", res.series("concurrent", "", "docxy", "rss"),
             64, False, 1, " MiB")
        line("%d idle keep-alive connections, docxy RSS ≤ 64 MiB" % self.sizes["idle"],
             res.series("idle", "", "docxy", "rss"),
             64, False, 1, " MiB")
        line("%d idle keep-alive connections, docxy (https) RSS ≤ 64 MiB" % self.sizes["idle"],
             res.series("idle", "", "docxy-https", "rss"), 64, False, 1, " MiB")
        line("%d idle keep-alive connections, new client answered by docxy in < 50 ms" % self.sizes["idle"],
             res.series("idle", "", "docxy", "new"), 50, False, 1, " ms", strict=True)
        line("%d idle keep-alive connections, new client answered by docxy (https) in < 50 ms" % self.sizes["idle"],
             res.series("idle", "", "docxy-https", "new"), 50, False, 1, " ms", strict=True)
        conns = self.sizes["conns"]
        line("manifests, docxy ≥ 4,500 HEAD req/s at %d connection" % conns[0],
             res.series("manifest", "HEAD c=%d" % conns[0], "docxy", "rps"), 4500, True, 0, " req/s")
        for method in ("HEAD", "GET"):
            line("manifests, docxy ≥ 5× registry, %s at %d connections" % (method, conns[1]),
                 res.ratios("manifest", "%s c=%d" % (method, conns[1]), "docxy", "rps", "registry"), 5.0)
        for method in ("HEAD", "GET"):
            line("manifests, docxy p99 ≤ 60 ms, %s at %d connections" % (method, conns[2]),
                 res.series("manifest", "%s c=%d" % (method, conns[2]), "docxy", "p99"), 60, False, 2, " ms")
        line("(docxy-cache) manifests ≥ 4,500 HEAD req/s at %d connection" % conns[0],
             res.series("manifest", "HEAD c=%d" % conns[0], "docxy-cache", "rps"), 4500, True, 0, " req/s")
        line("(docxy-cache) manifests ≥ 5× registry, HEAD at %d connections" % conns[1],
             res.ratios("manifest", "HEAD c=%d" % conns[1], "docxy-cache", "rps", "registry"), 5.0)
        line("(docxy-cache) manifests p99 ≤ 60 ms, HEAD at %d connections" % conns[2],
             res.series("manifest", "HEAD c=%d" % conns[2], "docxy-cache", "p99"), 60, False, 2, " ms")
        line("cache hit of a large blob, plain HTTP, docxy-cache ≥ 0.8× direct",
             res.ratios("blob", "", "docxy-cache (hit)", "mibs", "direct"), 0.8)
        line("cache hit of a large blob, plain HTTP, docxy-cache ≥ 2× registry (hit)",
             res.ratios("blob", "", "docxy-cache (hit)", "mibs", "registry (hit)"), 2.0)
        line("warm whole-image pull with the cache: zero upstream requests (counted at direct)",
             res.series("pull", "", "docxy-cache (warm)", "upstream"), 0, False, 0, " requests")
        line("warm whole-image pull with the cache: wall time ≤ 1.2× direct",
             res.ratios("pull", "", "docxy-cache (warm)", "wall", "direct"), 1.2, False)
        return out

    def log_summary(self):
        """What the servers complained about: the lines a reader should look at."""
        out = []
        patterns = re.compile(r"transfer aborted|internal error|upstream error|Traceback|cache paused|"
                              r"\[error\]|\[crit\]|\[alert\]|\[emerg\]|level=error|level=fatal|panic")
        for name in ("docxy", "docxy-https", "docxy-cache", "registry", "nginx-error", "direct-error"):
            path = os.path.join(self.work, name + ".log")
            if not os.path.exists(path):
                continue
            counts, examples = {}, {}
            with open(path, "rb") as handle:
                for raw in handle:
                    line = raw.decode("utf-8", "replace").rstrip()
                    match = patterns.search(line)
                    if match:
                        key = match.group(0)
                        if key == "transfer aborted":   # one group per reason, digests left out
                            key = re.sub(r"sha256:[0-9a-f]+", "<digest>", line.split("transfer aborted", 1)[1])[:70]
                            key = "transfer aborted" + key
                        counts[key] = counts.get(key, 0) + 1
                        examples.setdefault(key, line[:240])
            for key, n in sorted(counts.items()):
                out.append("  %s: %d × '%s', e.g. %s" % (name, n, key, examples[key]))
        if any("EOF occurred in violation of protocol" in line for line in out):
            out.append("  (EOF in violation of protocol: a client closed a TLS connection with an answer in flight; "
                       "the load clients do that when a cell ends. Over plain HTTP docxy does not log the same event)")
        if out:
            out.insert(0, "")
            out.insert(1, "server logs: lines worth a look (logs in the work directory%s)" % (
                ", kept" if self.args.keep else ", deleted at exit; --keep keeps them"))
        return out


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Benchmark docxy against nginx and the distribution registry "
                                                 "(issue 6). Loopback only; starts and stops everything itself.")
    parser.add_argument("--quick", action="store_true", help="smoke run (~1.5 min): small blobs, 0.2 s cells, 100 idle connections, 3 rounds")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3, at least 3 for the table)")
    parser.add_argument("--only", default="", metavar="a,b",
                        help="measures to run: %s (or 1-5); default all" % ",".join(MEASURES))
    parser.add_argument("--targets", default="", metavar="a,b",
                        help="targets to start: %s; default all (direct always runs)" % ",".join(TARGETS))
    parser.add_argument("--docxy", default=os.path.join(HERE, "..", "docxy.py"), metavar="PATH",
                        help="docxy.py to measure (default ../docxy.py next to this script)")
    parser.add_argument("--cell", type=float, default=0, metavar="SECONDS",
                        help="seconds per manifest cell (default 3; 0.2 with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (data, configs, logs)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    measures = []
    for item in filter(None, (x.strip() for x in args.only.split(","))):
        if item.isdigit() and 1 <= int(item) <= len(MEASURES):
            item = MEASURES[int(item) - 1]
        if item not in MEASURES:
            parser.error("unknown measure %r (choose from %s)" % (item, ", ".join(MEASURES)))
        measures.append(item)
    args.measures = [m for m in MEASURES if m in measures] if measures else list(MEASURES)
    for item in filter(None, args.targets.split(",")):
        if item not in TARGETS:
            parser.error("unknown target %r (choose from %s)" % (item, ", ".join(TARGETS)))
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_get", "_pull", "_load"):
        spec = json.loads(argv[1])
        result = {"_get": client_get, "_pull": client_pull, "_load": client_load}[argv[0]](spec)
        print(json.dumps(result))
        return 0
    if argv and argv[0] == "_direct":
        direct_server(argv[1], int(argv[2]), argv[3], argv[4])
        return 0
    args = parse_args(argv)
    try:
        sys.stdout.reconfigure(errors="replace")
    except AttributeError:
        pass

    def interrupted(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    bench = Bench(args)
    try:
        bench.setup()
        bench.machine_info = bench.machine()
        bench.run()
        report = bench.report()
    except KeyboardInterrupt:
        say("interrupted: stopping everything this run started")
        return 130
    finally:
        cleanup()
        work = getattr(bench, "work", None)
        if work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif work:
            say("work directory kept: %s" % work)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
