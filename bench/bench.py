#!/usr/bin/env python3
"""Benchmark docxy against nginx and the CNCF distribution registry, all on loopback, and
docxy nodes behind HAProxy against one docxy.

    python3 bench/bench.py                                  # full run: about 10 min on 2 cores
    python3 bench/bench.py --quick                          # smoke run: about 1.5 min
    python3 bench/bench.py --json bench/results.json --markdown     # keep every cell, and
                                                            # write bench/RESULTS.md from them
    python3 bench/bench.py --markdown --from bench/results.json     # render again, no run
    python3 bench/bench.py --baseline-docxy OLD.py          # an older docxy beside this one
    python3 bench/bench.py --only blob,pull --targets docxy,nginx --rounds 5

What is measured is data, at the top of this file: TARGETS (the servers and what they are),
MEASURES (what each measure does, its table, what it shows), FIGURES (units) and HEADLINES
(the ratios the README reports, and the goals of issue 6). Every process is started here, in a
temporary directory, on free loopback ports, and stopped again at the end (also on Ctrl-C or
an error). Targets are measured interleaved, round by round, so that drift on a shared machine
hits all of them alike; every figure is the median [min-max] over the rounds, and every ratio
is computed within a round, then summarised the same way. A target whose tool is missing is
reported as skipped, never faked. Standard library only; not part of CI.
"""

import argparse
import concurrent.futures
import ctypes
import datetime
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
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
HAPROXY_CFG = os.path.join(HERE, "..", "deploy", "haproxy", "haproxy.cfg")
SCHEMA = 1      # the layout of the --json document; raise it when a field changes meaning

# ================================================================== data: what is measured

# The targets, in the order of every table. `server` is the process that serves the target
# (None: no server), `script` which docxy.py runs it ("docxy": --docxy, "baseline":
# --baseline-docxy), `stateful` targets are measured empty (miss, cold) and then filled (hit,
# warm), `twin` names the target a baseline target is the older version of, `workers` is the
# docxy's --workers, `measures` the measures a target takes part in (default: all), `nodes` the
# number of docxy nodes behind HAProxy (server "fleet").
TARGETS = (
    dict(name="direct", server="direct",
         about="The upstream itself: nginx serving the blobs and manifests from disk at their "
               "registry paths, `sendfile on` (a stdlib `socket.sendfile` server when nginx is "
               "not installed). The limit of this machine."),
    dict(name="nginx", server="nginx",
         about="nginx `proxy_pass` in front of `direct`, tuned fairly: upstream keep-alive, "
               "`proxy_buffering off`, 1 MiB buffers."),
    dict(name="nginx-https", server="nginx", tls=True,
         about="The same nginx, with TLS to the client (a test CA made with openssl)."),
    dict(name="registry", server="registry", stateful=True,
         about="The CNCF distribution registry (Debian `docker-registry`) in pull-through "
               "`proxy:` mode in front of `direct`: a miss with fresh storage, then a hit."),
    dict(name="docxy", server="docxy", script="docxy", range=True,
         about="`docxy.py --upstream` pointing at `direct`, plain HTTP (the file under test, "
               "`--docxy`)."),
    dict(name="docxy-workers", server="docxy", script="docxy", workers=2,
         measures=("blob", "concurrent", "manifest", "idle"),
         about="The same docxy with `--workers 2`: a supervisor that serves nothing forks two "
               "workers, each accepting on a socket of its own that the supervisor bound with "
               "SO_REUSEPORT (the kernel spreads new connections over them). Its CPU and RSS "
               "are the sums over the supervisor and both workers."),
    dict(name="docxy-fleet", server="fleet", script="docxy", nodes=3,
         measures=("blob", "manifest"),
         about="HAProxy run from `deploy/haproxy/haproxy.cfg` as shipped (only the addresses "
               "of its `bind` and `server` lines changed) in front of three nodes, each a "
               "`docxy` (pass-through to `direct`, no cache) with `--drain-delay 3 "
               "--trusted-proxy 127.0.0.1/32`. `balance uri` sends every request for one path "
               "to one node, so each cell's requests reach a single node. Its CPU and RSS are "
               "the sums over HAProxy and the nodes. On this one 2-core host the nodes, "
               "HAProxy, the load client and the upstream share the cores: the ratios to "
               "`docxy` show what the balancer's hop costs, not what a fleet serves."),
    dict(name="docxy-https", server="docxy", script="docxy", tls=True,
         about="The same docxy with TLS to the client."),
    dict(name="docxy-cache", server="docxy", script="docxy", cache=True, stateful=True,
         coalesces=True,
         about="The same docxy with `--cache-dir`: a miss with an empty cache, then a hit."),
    dict(name="docxy-before", server="docxy", script="baseline", range=True, twin="docxy",
         about="`docxy` run from the older file given with `--baseline-docxy`."),
    dict(name="docxy-before-https", server="docxy", script="baseline", tls=True,
         twin="docxy-https", about="`docxy-https` run from the `--baseline-docxy` file."),
    dict(name="docxy-before-cache", server="docxy", script="baseline", cache=True,
         stateful=True, coalesces=True, twin="docxy-cache",
         about="`docxy-cache` run from the `--baseline-docxy` file."),
    dict(name="sha256", server=None, measures=("blob",),
         about="No server: the benchmark hashes the blob's size in memory on one core "
               "(`hashlib`). No proxy that checks a stream's sha256 on the way through can pass "
               "that stream faster: the ceiling of a verifying proxy on this CPU."),
)
TARGET = {spec["name"]: spec for spec in TARGETS}

# figure: (unit, digits, column heading, which way is better)
FIGURES = {
    "throughput": ("MiB/s", 0, "MiB/s", "higher"),
    "server_cpu": ("CPU s/GiB", 2, "server CPU s/GiB", "lower"),
    "busy": ("%", 0, "machine busy %", None),
    "peak_rss": ("MiB", 1, "peak RSS MiB", "lower"),
    "rps": ("req/s", 0, "req/s", "higher"),
    "p50": ("ms", 2, "p50 ms", "lower"),
    "p99": ("ms", 2, "p99 ms", "lower"),
    "rss_idle": ("MiB", 1, "RSS MiB with idle", "lower"),
    "rss_before": ("MiB", 1, "RSS MiB before", "lower"),
    "pss_idle": ("MiB", 1, "PSS MiB with idle", "lower"),
    "new_client": ("ms", 1, "new client ms (median)", "lower"),
    "new_client_worst": ("ms", 1, "new client ms (worst)", "lower"),
    "wall": ("s", 3, "wall s", "lower"),
    "requests": ("requests", 0, "client requests", None),
    "upstream_requests": ("requests", 0, "requests at direct", "lower"),
    "docxy_upstream": ("requests", 0, "upstream= in docxy log", "lower"),
    "server_cpu_s": ("CPU s", 2, "server CPU s", "lower"),
    "idle_busiest": ("connections", 0, "idle on the busiest worker", None),
    "idle_quietest": ("connections", 0, "idle on the quietest worker", None),
    "received": ("MiB", 1, "client got MiB", None),
    "upstream_blob": ("requests", 0, "blob requests at the upstream", None),
    "upstream_drops": ("drops", 0, "drops", None),
    "resumes": ("resumes", 0, "docxy resumes (/metrics)", None),
}

# Cases in table order; manifest cases ("HEAD c=16") sort after these, by method and count.
CASES = ("get", "miss", "hit", "range", "idle", "pull", "cold", "warm", "whole", "drops")

# The measures. `main` is the figure the ratio columns (x:REF) compare; REF is nginx (the
# nginx of the same scheme), direct, registry, sha256, or before (the --baseline-docxy twin);
# x:CASE (a case, not a target) compares each row with the same target's CASE row instead.
# `targets`, where given, are the only targets a measure takes (whatever TARGETS allows).
# `setup` is formatted with the run's sizes. `about` is what the measure means and shows.
MEASURES = {
    "blob": dict(
        number=1, title="Single-stream GET of a large blob", main="throughput",
        default_case="get", group="target",
        columns=("throughput", "x:nginx", "x:direct", "x:registry", "x:sha256", "x:before",
                 "server_cpu", "busy"),
        setup="One {big_mib} MiB blob, one client on one connection, reading with readinto into "
              "a 1 MiB buffer, in a process of its own.",
        about=(
            "docxy checks each blob's sha256 while streaming, so a client never gets bytes that "
            "do not match the digest it asked for; nginx and the registry do not check. The "
            "check is docxy's cost here. A body over 8 MiB is hashed on a second thread while "
            "the first one copies it.",
            "`sha256` is the ceiling: `hashlib` alone on one core of this CPU. No proxy that "
            "checks a stream's digest on the way through can pass that stream faster, so "
            "where the ceiling is below nginx, 1.0x nginx on one plain stream is out of reach "
            "for any proxy that checks, and the 1.3x stretch goal (which would need a copy "
            "that never enters the process, such as splice) even more so: a copy that is never "
            "seen cannot be checked. Compare docxy's `x sha256` with 1.0.",
            "A profile (py-spy) of one client pulling a large blob found the hashing thread "
            "spending most of its samples in `sha256.update`, and the copying thread much of "
            "its time waiting for the hashing thread: on one stream the hash is the limit.",
            "`docxy (range)` is the same path without the check: a `Range: bytes=0-` request "
            "cannot be checked against the whole blob's digest. Its distance to `docxy` is "
            "the cost of checking.",
            "Over HTTPS encryption costs both servers; the difference in server CPU s/GiB "
            "between `docxy-https` and `nginx-https` is about what hashing costs.",
            "`registry (miss)`: distribution streams the blob to the client and fetches it a "
            "second time in the background to store it; its hit is measured once that copy "
            "exists. Both the registry and docxy send a hit with `sendfile`. `docxy-cache "
            "(miss)` downloads, checks, writes and `fsync`s what it streams: the disk bounds "
            "it (see \"file writes\" in the host facts).",
            "machine busy: the share of all cores in use while the bytes flowed, load client "
            "and upstream included. Client, upstream and server share the cores here; on a "
            "real server the clients are elsewhere, and hashing gets the core they use here.",
        )),
    "concurrent": dict(
        number=2, title="Concurrent GETs of a medium blob", main="throughput",
        default_case="get", group="target",
        columns=("throughput", "x:nginx", "x:direct", "x:before", "peak_rss", "server_cpu",
                 "busy"),
        setup="{streams} clients GET the same {mid_mib} MiB blob at once; MiB/s is the "
              "aggregate.",
        about=(
            "Peak RSS is that of all the server's processes (nginx: master and workers), with "
            "VmHWM reset before each run. All of docxy's transfers share a 16 MiB budget for "
            "their buffers.",
            "`docxy-cache (miss)` is coalesced: one upstream download serves every client, "
            "which reads the growing file. The registry is measured on its hit only, after "
            "one unmeasured GET stored the blob.",
            "With more transfers than cores docxy hashes inline, and the aggregate rate is "
            "the cores divided by the CPU seconds all processes spend per GiB: compare the "
            "server CPU s/GiB column.",
            "`docxy-workers`' peak RSS and CPU are summed over its supervisor and workers; the "
            "goal is at least 1.3x `docxy`. One docxy already uses more than one core here "
            "(hashing and socket writes run outside the GIL): with the load client and the "
            "upstream on the same two cores, the machine is nearly all busy before a second "
            "worker starts, so the ratio shows the machine's limit; compare the server CPU "
            "s/GiB of the two, which is the cost a second worker adds per byte.",
        )),
    "manifest": dict(
        number=3, title="Manifest requests by tag over keep-alive connections", main="rps",
        default_case=None, group="case",
        columns=("rps", "x:nginx", "x:registry", "x:before", "p50", "p99"),
        setup="`library/app:latest` (an OCI index), {cell} s per cell, with the `Accept` "
              "header dockerd sends. HEAD: a stdlib epoll keep-alive client in 2 processes "
              "(wrk 4.1 cannot parse answers to HEAD). GET: {get_client}.",
        about=(
            "The stateful targets learn the tag first (one unmeasured GET, HEAD, GET), so "
            "these are hits for the caches and for the registry.",
            "docxy serves each request on a thread of its own, under the GIL: its request "
            "rate hardly grows with connections, and its latency grows with them instead. "
            "What counts is how often a request lets go of the GIL: a response's head waits "
            "for its body and a small answer leaves in one send, a request's head is read in "
            "one piece from a plain socket's descriptor, and the Date header is formatted "
            "once a second. "
            "Compare `x registry` (the goal: at least 5x at 16 connections) and p99 at 64 "
            "connections (the goal: at most 60 ms).",
            "`docxy-workers` runs two processes, each with a GIL of its own: the goal is at "
            "least 1.6x `docxy` for GET at 16 connections. The load client and the upstream "
            "use the same cores.",
        )),
    "idle": dict(
        number=4, title="Idle keep-alive connections", main="rss_idle",
        default_case="idle", group="target",
        columns=("rss_idle", "rss_before", "pss_idle", "x:nginx", "x:before", "new_client",
                 "new_client_worst", "idle_busiest", "idle_quietest"),
        setup="{idle} connections, each after one GET /v2/, left open; then a new client's "
              "GET /v2/ (5 probes), and every 20th idle connection is used once more.",
        about=(
            "docxy parks a connection that has been quiet for 0.5 s in one selector, with no "
            "thread, and gives it a thread again when its next request arrives: idle "
            "connections cost memory, not threads, and a new client does not wait for them.",
            "RSS is the sum over all of a server's processes: nginx's master and workers, "
            "docxy-workers' supervisor and workers (pages a fork shares are counted in each "
            "process that maps them; PSS counts a page shared by n processes 1/n in each, so "
            "its sum counts every page once). A forked worker maps most of the supervisor's "
            "pages, so its RSS counts them again: what a worker adds to the machine's memory "
            "is its PSS. The last two columns count the idle connections "
            "each worker holds: the server ends of the benchmark's connections (found in "
            "/proc/net/tcp) among the worker's file descriptors: how the kernel spread them "
            "over the workers' SO_REUSEPORT sockets.",
        )),
    "pull": dict(
        number=5, title="Whole-image pull by a dockerd-like client", main="wall",
        default_case="pull", group="target",
        columns=("wall", "x:direct", "x:nginx", "x:registry", "x:before", "upstream_requests",
                 "docxy_upstream", "server_cpu_s"),
        setup="{layer_count} layers ({layers_mib} MiB) in an OCI index with one platform: "
              "/v2/, HEAD the tag, GET the index and the manifest by digest, the config, then "
              "the layers, 3 at once, every digest verified.",
        about=(
            "Ratios here are time ratios: lower is faster.",
            "`requests at direct`: the lines the upstream's access log gained during the pull. "
            "A warm pull with the cache makes none (the goal): the tag is within `--tag-ttl`, "
            "and everything else is content-addressed.",
        )),
    "resume": dict(
        number=6, title="A large blob through an upstream that drops connections", main="wall",
        default_case=None, group="target",
        targets=("direct", "registry", "docxy", "docxy-cache", "docxy-before",
                 "docxy-before-cache"),
        columns=("wall", "x:whole", "x:before", "received", "upstream_blob", "upstream_drops",
                 "resumes", "server_cpu_s"),
        setup="One {resume_mib} MiB blob, one GET through each target by one client, which "
              "reads it all and checks its length and sha256. The upstream is the benchmark's "
              "own (stdlib, sendfile, single byte ranges): in the `drops` case it closes the "
              "connection once a response has sent {drop_mib} MiB of its body, in the `whole` "
              "case never; the same upstream serves both cases, in the same rounds.",
        about=(
            "Ratios here are time ratios: lower is faster. `× whole` divides a target's time "
            "with drops by its own time without them, in the same round: what the drops cost.",
            "`direct` is that upstream itself, read by a client that does not resume: it is "
            "left with the first cut body. `registry`, `docxy` and `docxy-cache` are processes "
            "of their own for this measure, pointed at that upstream; `registry` gets fresh "
            "storage and `docxy-cache` an empty cache before every cell, so each fetch is a "
            "miss. A body that ends short or does not match its digest is a failure, noted "
            "below with how far it got, never a time; `client got MiB` is what the client "
            "received.",
            "docxy asks for the rest of an interrupted blob with `Range: bytes=N-` (and "
            "`If-Range` with the first answer's strong ETag) and goes on with the same "
            "response to the client, whose length and digest it still checks. `docxy resumes` "
            "is the rise of `docxy_upstream_resumes_total` on its /metrics over the cell (0 "
            "for a docxy that has no such counter).",
            "`blob requests at the upstream` counts the GETs and HEADs of the blob the "
            "upstream answered during the cell (the registry's second, background fetch "
            "included), and `drops` how many of those it cut short.",
            "The registry (distribution) in `proxy:` mode does not resume: its client is left "
            "with the first cut body, to which it appends its JSON error document (so it got "
            "a little more than the cut), and its background fetch, cut as well, stores "
            "nothing. A docxy that does not resume leaves its client one byte short of the "
            "cut: it holds a checked body's last byte back until the digest matches.",
            "The client hashes what it reads on its own core, as a puller checks a layer: "
            "`direct (whole)` is as fast as this client reads, and the other times include "
            "its hashing, which shares the two cores with docxy's own.",
        )),
}
MEASURE_ORDER = ("blob", "concurrent", "manifest", "idle", "pull", "resume")

# The headline ratios and goals. A row with `versus` is a ratio of two targets' figures,
# computed within each round; one with `versus_case` is the ratio of the target's figure in
# `case` to its own figure in that case; one with `minus` is a difference, the target's figure
# less that target's, divided by `per` (default 1), within each round; one with none of them is
# the figure itself. `goal` is (operator, bound), issue 6's or 13's where it set one; a row
# without a goal is reported, not judged.
HEADLINES = (
    dict(what="Large blob, plain HTTP: docxy / nginx", measure="blob", target="docxy",
         figure="throughput", versus="nginx", goal=(">=", 1.0), stretch=(">=", 1.3)),
    dict(what="Large blob, HTTPS: docxy-https / nginx-https", measure="blob",
         target="docxy-https", figure="throughput", versus="nginx-https", goal=(">=", 1.0)),
    dict(what="Large blob: docxy / the sha256 ceiling", measure="blob", target="docxy",
         figure="throughput", versus="sha256"),
    dict(what="Large blob, unchecked (Range): docxy / nginx", measure="blob", target="docxy",
         case="range", figure="throughput", versus="nginx"),
    dict(what="Large blob: docxy-fleet / docxy", measure="blob", target="docxy-fleet",
         figure="throughput", versus="docxy"),
    dict(what="32 concurrent GETs: docxy / nginx", measure="concurrent", target="docxy",
         figure="throughput", versus="nginx", goal=(">=", 0.95)),
    dict(what="32 concurrent GETs: docxy-workers / docxy", measure="concurrent",
         target="docxy-workers", figure="throughput", versus="docxy", goal=(">=", 1.3)),
    dict(what="32 concurrent GETs: docxy-workers / nginx", measure="concurrent",
         target="docxy-workers", figure="throughput", versus="nginx"),
    dict(what="Cache hit, large blob: docxy-cache / direct", measure="blob",
         target="docxy-cache", case="hit", figure="throughput", versus="direct",
         goal=(">=", 0.8)),
    dict(what="Cache hit, large blob: docxy-cache / registry", measure="blob",
         target="docxy-cache", case="hit", figure="throughput", versus="registry",
         goal=(">=", 2.0)),
    dict(what="Cache miss, large blob: docxy-cache / registry", measure="blob",
         target="docxy-cache", case="miss", figure="throughput", versus="registry"),
    dict(what="Manifests, HEAD, 1 connection: docxy / nginx", measure="manifest",
         target="docxy", case="HEAD c=1", figure="rps", versus="nginx"),
    dict(what="Manifests, HEAD, 16 connections: docxy / registry", measure="manifest",
         target="docxy", case="HEAD c=16", figure="rps", versus="registry", goal=(">=", 5.0)),
    dict(what="Manifests, GET, 16 connections: docxy / registry", measure="manifest",
         target="docxy", case="GET c=16", figure="rps", versus="registry", goal=(">=", 5.0)),
    dict(what="Manifest GET, 16 connections: docxy-workers / docxy", measure="manifest",
         target="docxy-workers", case="GET c=16", figure="rps", versus="docxy",
         goal=(">=", 1.6)),
    dict(what="Manifest GET, 16 connections: docxy-fleet / docxy", measure="manifest",
         target="docxy-fleet", case="GET c=16", figure="rps", versus="docxy"),
    dict(what="Manifests, HEAD, 16 connections: docxy-cache / registry", measure="manifest",
         target="docxy-cache", case="HEAD c=16", figure="rps", versus="registry",
         goal=(">=", 5.0)),
    dict(what="Idle connections, RSS: docxy / nginx", measure="idle", target="docxy",
         figure="rss_idle", versus="nginx"),
    dict(what="Warm pull with the cache, wall time: docxy-cache / direct", measure="pull",
         target="docxy-cache", case="warm", figure="wall", versus="direct", goal=("<=", 1.2)),
    dict(what="Cold pull, wall time: docxy-cache / registry", measure="pull",
         target="docxy-cache", case="cold", figure="wall", versus="registry"),
    dict(what="Blob through an upstream that drops, time: docxy with drops / without",
         measure="resume", target="docxy", case="drops", figure="wall", versus_case="whole"),
    dict(what="Blob through an upstream that drops, time: docxy-cache with drops / without",
         measure="resume", target="docxy-cache", case="drops", figure="wall",
         versus_case="whole"),
    # Goals that are figures, not ratios.
    dict(what="32 concurrent GETs: docxy's peak RSS", measure="concurrent", target="docxy",
         figure="peak_rss", goal=("<=", 64)),
    dict(what="Idle connections: docxy's RSS", measure="idle", target="docxy",
         figure="rss_idle", goal=("<=", 64)),
    dict(what="Idle connections: docxy-https's RSS", measure="idle", target="docxy-https",
         figure="rss_idle", goal=("<=", 64)),
    dict(what="Idle connections: RSS per extra worker (docxy-workers less docxy)",
         measure="idle", target="docxy-workers", figure="rss_idle", minus="docxy", per=1,
         goal=("<=", 25)),
    dict(what="Idle connections: PSS per extra worker (docxy-workers less docxy)",
         measure="idle", target="docxy-workers", figure="pss_idle", minus="docxy", per=1),
    dict(what="Idle connections: a new client answered by docxy", measure="idle",
         target="docxy", figure="new_client", goal=("<", 50)),
    dict(what="Idle connections: a new client answered by docxy-https", measure="idle",
         target="docxy-https", figure="new_client", goal=("<", 50)),
    dict(what="Manifests, HEAD, 1 connection: docxy", measure="manifest", target="docxy",
         case="HEAD c=1", figure="rps", goal=(">=", 4500)),
    dict(what="Manifests, HEAD, 64 connections: docxy's p99", measure="manifest",
         target="docxy", case="HEAD c=64", figure="p99", goal=("<=", 60)),
    dict(what="Manifests, GET, 64 connections: docxy's p99", measure="manifest",
         target="docxy", case="GET c=64", figure="p99", goal=("<=", 60)),
    dict(what="Manifests, HEAD, 1 connection: docxy-cache", measure="manifest",
         target="docxy-cache", case="HEAD c=1", figure="rps", goal=(">=", 4500)),
    dict(what="Manifests, HEAD, 64 connections: docxy-cache's p99", measure="manifest",
         target="docxy-cache", case="HEAD c=64", figure="p99", goal=("<=", 60)),
    dict(what="Warm pull with the cache: requests at the upstream", measure="pull",
         target="docxy-cache", case="warm", figure="upstream_requests", goal=("<=", 0)),
)

# Sizes of a run. `cell` is seconds per manifest cell; `layers` are MiB; `resume_drop` is how
# much of a response's body the resume measure's upstream sends before it cuts the connection.
FULL = dict(big=1 * GiB, mid=32 * MiB, streams=32, layers=(8, 16, 24, 32, 48, 64), cell=3,
            idle=500, conns=(1, 16, 64), resume=256 * MiB, resume_drop=64 * MiB)
QUICK = dict(big=128 * MiB, mid=4 * MiB, streams=32, layers=(1, 2, 3, 4, 6, 8), cell=0.2,
             idle=100, conns=(1, 16, 64), resume=32 * MiB, resume_drop=8 * MiB)

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = ", ".join((INDEX_TYPE, "application/vnd.docker.distribution.manifest.list.v2+json",
                    MANIFEST_TYPE, "application/vnd.docker.distribution.manifest.v2+json"))
USER_AGENT = "docxy-bench/1"
MANIFEST_PATH = "/v2/library/app/manifests/latest"


def say(message):
    sys.stderr.write("bench: %s\n" % message)
    sys.stderr.flush()


class Skip(Exception):
    """A target or measure that cannot run here; the reason is printed, nothing is faked."""


# ================================================================== processes we start

class Processes:
    """Every process this run starts, so that each can be stopped by its own id at the end.
    Children get SIGKILL if the benchmark itself is killed (Linux prctl PDEATHSIG)."""

    def __init__(self):
        self.started = []
        try:
            self.libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            self.libc = None

    def _die_with_parent(self):
        try:
            self.libc.prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
        except Exception:
            pass

    def spawn(self, argv, log_path, env=None):
        """A server: output to its log, a session of its own."""
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
                preexec_fn=self._die_with_parent if self.libc else None)
        finally:
            log.close()
        self.started.append(proc)
        return proc

    def run(self, argv, timeout, what):
        """A client: (stdout, stderr, returncode), killed when it outlives `timeout`."""
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        self.started.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError("%s did not finish within %ds" % (what, timeout))
        finally:
            if proc in self.started:
                self.started.remove(proc)
        return out, err, proc.returncode

    def stop(self, proc, sig=signal.SIGTERM, grace=8.0):
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
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self):
        for proc in list(reversed(self.started)):
            self.stop(proc, grace=5.0)


PROCESSES = Processes()


def clean_env():
    """The servers' environment: no proxies (everything is loopback), no DOCXY_ settings."""
    proxies = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    return {k: v for k, v in os.environ.items()
            if not k.startswith("DOCXY_") and k.lower() not in proxies}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tool_version(argv):
    """The first line a tool prints about its version, or 'not installed'."""
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=10).stdout
        return out.decode("utf-8", "replace").strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "not installed"


# ================================================================== /proc accounting

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
    """Write back what the last cell left dirty (a cache miss writes 1 GiB) before the next
    cell runs: the kernel's write-back took CPU from whichever target came next."""
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


def pss_mib(pids):
    """Summed PSS: each page shared by n processes counts 1/n in each (what forked workers
    cost together, where the RSS sum counts the pages they share once per process)."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/smaps_rollup" % pid) as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            return None
    return total / 1024.0


def serving_pids(pids):
    """The processes of a tree (process_tree: the root first) that serve connections: the
    root's descendants when it has any (nginx's workers, docxy --workers' workers), else the
    root itself."""
    return pids[1:] if len(pids) > 1 else pids


def established_inodes(port, peers):
    """Socket inodes of the established TCP connections whose local port is `port` and whose
    remote port is one of `peers`: the server's ends of these clients' connections."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle, None)
                for line in handle:
                    fields = line.split()
                    if (len(fields) > 9 and fields[3] == "01"
                            and int(fields[1].rsplit(":", 1)[1], 16) == port
                            and int(fields[2].rsplit(":", 1)[1], 16) in peers):
                        inodes.add(fields[9])
        except (OSError, ValueError):
            pass
    return inodes


def connections_held(pids, port, peers):
    """How many of the connections to `port` from the local ports `peers` each process holds
    (by its file descriptors): [count per pid], in the order of pids."""
    wanted = {"socket:[%s]" % inode for inode in established_inodes(port, peers)}
    counts = []
    for pid in pids:
        held = 0
        try:
            for fd in os.listdir("/proc/%d/fd" % pid):
                try:
                    held += os.readlink("/proc/%d/fd/%s" % (pid, fd)) in wanted
                except OSError:
                    pass
        except OSError:
            pass
        counts.append(held)
    return counts


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
        if self.hwm_ok:     # the kernel's own peak: exact for one process, a bound for several
            hwm = sum(status_kib(pid, "VmHWM") for pid in self.pids) / 1024.0
            return max(self.peak, hwm)
        return self.peak


def write_speed(folder, size):
    """Page-cache write speed of the work directory (MiB/s): what bounds every cache miss
    that writes what it streams."""
    path = os.path.join(folder, "write-test")
    block = os.urandom(MiB)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(size // MiB):
            os.write(descriptor, block)
        seconds = time.perf_counter() - started
    finally:
        os.close(descriptor)
        os.unlink(path)
    return size / MiB / seconds


# ================================================================== test data

def sha256(body):
    return "sha256:" + hashlib.sha256(body).hexdigest()


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
    Returns a description of the content, with the headers every path is served with."""
    total = (sizes["big"] + sizes["mid"]) // MiB + sum(sizes["layers"])
    say("writing test data (%d MiB)" % total)
    data = {"root": root, "paths": {}}
    data["big"] = write_blob(root, "big", sizes["big"], 1)
    data["mid"] = write_blob(root, "big", sizes["mid"], 2)
    data["big_size"], data["mid_size"] = sizes["big"], sizes["mid"]
    for key in ("big", "mid"):
        data["paths"]["/v2/library/big/blobs/" + data[key]] = ("application/octet-stream",
                                                                data[key])
    layers = []
    for number, size in enumerate(sizes["layers"]):
        digest = write_blob(root, "app", size * MiB, 100 + number)
        layers.append({"mediaType": LAYER_TYPE, "digest": digest, "size": size * MiB})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers",
                                    "diff_ids": [layer["digest"] for layer in layers]}},
                        sort_keys=True).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                           "config": {"mediaType": CONFIG_TYPE, "digest": sha256(config),
                                      "size": len(config)},
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
        data["paths"]["/v2/library/app/blobs/" + layer["digest"]] = (
            "application/octet-stream", layer["digest"])
    manifests = os.path.join(root, "v2", "library", "app", "manifests")
    os.makedirs(manifests, exist_ok=True)
    for name, body, kind in ((sha256(index), index, INDEX_TYPE), ("latest", index, INDEX_TYPE),
                             (sha256(manifest), manifest, MANIFEST_TYPE)):
        with open(os.path.join(manifests, name), "wb") as handle:
            handle.write(body)
        data["paths"]["/v2/library/app/manifests/" + name] = (kind, sha256(body))
    data["index"], data["manifest"], data["config"] = sha256(index), sha256(manifest), \
        sha256(config)
    data["layers"] = [layer["digest"] for layer in layers]
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return data


def make_certificates(folder):
    """A test CA and a server certificate for 127.0.0.1/127.0.0.2/localhost (ECDSA P-256)."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise Skip("openssl not installed: no test certificate for the HTTPS targets")
    os.makedirs(folder, exist_ok=True)

    def run(*args):
        try:
            subprocess.run([openssl] + list(args), cwd=folder, check=True, timeout=60,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except subprocess.CalledProcessError as error:
            raise Skip("openssl failed: %s" % error.stderr.decode("utf-8", "replace")[-200:])

    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=docxy bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    with open(os.path.join(folder, "ext.cnf"), "w") as handle:
        handle.write("subjectAltName=IP:127.0.0.1,IP:127.0.0.2,DNS:localhost\n"
                     "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                     "extendedKeyUsage=serverAuth\n")
    run("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "ext.cnf")
    return {key: os.path.join(folder, name)
            for key, name in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))}


# ================================================================== the servers

def http_call(port, method, path, https=False, ca=None, headers=None, timeout=5):
    if https:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=timeout, context=ssl.create_default_context(cafile=ca))
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path,
                           headers=dict({"User-Agent": USER_AGENT}, **(headers or {})))
        response = connection.getresponse()
        body = response.read()
        return response.status, dict(response.getheaders()), body
    finally:
        connection.close()


def tail(path, lines=15):
    try:
        with open(path, "rb") as handle:
            return b"\n".join(handle.read().splitlines()[-lines:]).decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def wait_ready(proc, port, name, log_path, https=False, ca=None, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with %s at start-up:\n%s"
                               % (name, proc.returncode, tail(log_path)))
        try:
            if http_call(port, "GET", "/v2/", https, ca, timeout=2)[0] in (200, 401):
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("%s did not answer /v2/ within %ds:\n%s"
                               % (name, timeout, tail(log_path)))
        time.sleep(0.05)


def wait_until(check, timeout, what):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after %ds waiting for %s" % (timeout, what))
        time.sleep(0.05)


class Server:
    """One server process (tree) that serves one or more targets."""

    name = "?"
    stores_manifests = False

    def __init__(self, work):
        self.work, self.proc, self.log = work, None, None

    def pids(self):
        return process_tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def logs(self):
        """The log files worth a look at the end of a run."""
        return [self.log] if self.log else []

    def stop(self):
        if self.proc:
            PROCESSES.stop(self.proc)
            self.proc = None

    def fresh(self):
        """Restart with empty storage: the next fetch is a true miss (stateful servers)."""


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
NGINX_DIRECT = """
    sendfile on;
    tcp_nopush on;
    types { }
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:%(port)d backlog=4096;
        root %(root)s;
        location = /v2/ {
            default_type application/json;
            add_header Docker-Distribution-API-Version registry/2.0 always;
            return 200 '{}';
        }
        location ~ "^/v2/.+/blobs/(sha256:[0-9a-f]{64})$" {
            add_header Docker-Content-Digest $1;
            add_header Docker-Distribution-API-Version registry/2.0;
        }
%(manifests)s
        location / { return 404; }
    }
}
"""
NGINX_MANIFEST = """        location = %s {
            types { } default_type %s;
            add_header Docker-Content-Digest %s;
            add_header Docker-Distribution-API-Version registry/2.0;
        }"""
NGINX_PROXY = """
    upstream direct {
        server 127.0.0.1:%(direct)d;
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
%(servers)s}
"""
NGINX_SERVER = """    server {
        listen 127.0.0.1:%d%s backlog=4096;%s
        location / {
            proxy_pass http://direct;
        }
    }
"""
NGINX_TLS = """
        ssl_certificate %s;
        ssl_certificate_key %s;
        ssl_protocols TLSv1.2 TLSv1.3;"""


def nginx_head(work, label):
    """The part of an nginx configuration every nginx here shares."""
    tmp = os.path.join(work, "nginx-" + label)
    os.makedirs(tmp, exist_ok=True)
    values = dict(err=os.path.join(work, "%s-error.log" % label),
                  pid=os.path.join(tmp, "nginx.pid"), tmp=tmp,
                  access=os.path.join(work, "%s-access.log" % label))
    return (NGINX_COMMON % values) + "http {\n" + (NGINX_HTTP % values)


class NginxServer(Server):
    """An nginx process run from a configuration written into the work directory."""

    label = "?"

    def config(self):
        raise NotImplementedError

    def start(self):
        path = os.path.join(self.work, "nginx-%s.conf" % self.label)
        with open(path, "w") as handle:
            handle.write(self.config())
        self.log = os.path.join(self.work, "%s-error.log" % self.label)
        self.proc = PROCESSES.spawn(["nginx", "-e", self.log, "-c", path, "-p", self.work],
                                    self.log, env=clean_env())
        self.wait()

    def wait(self):
        wait_ready(self.proc, self.port, "nginx (%s)" % self.label, self.log)


class NginxDirect(NginxServer):
    """The upstream: nginx serving the data directory with sendfile, registry headers."""

    name = label = "direct"
    kind = "nginx static, sendfile on"

    def __init__(self, work, data):
        super().__init__(work)
        self.data, self.port = data, free_port()
        self.access = os.path.join(work, "direct-access.log")

    def config(self):
        manifests = [NGINX_MANIFEST % (path, kind, digest)
                     for path, (kind, digest) in sorted(self.data["paths"].items())
                     if "/manifests/" in path]
        return nginx_head(self.work, self.label) + NGINX_DIRECT % dict(
            port=self.port, root=self.data["root"], manifests="\n".join(manifests))


class StdlibDirect(Server):
    """The upstream without nginx: this file's own socket.sendfile server (mode _direct)."""

    name = "direct"
    kind = "stdlib socket.sendfile server (nginx not installed)"

    def __init__(self, work, data):
        super().__init__(work)
        self.data, self.port = data, free_port()
        self.access = os.path.join(work, "direct-access.log")

    def start(self):
        meta = os.path.join(self.work, "direct-paths.json")
        with open(meta, "w") as handle:
            json.dump(self.data["paths"], handle)
        self.log = os.path.join(self.work, "direct-error.log")
        argv = [sys.executable, os.path.abspath(__file__), "_direct", self.data["root"],
                str(self.port), meta, self.access]
        self.proc = PROCESSES.spawn(argv, self.log, env=clean_env())
        wait_ready(self.proc, self.port, "stdlib direct server", self.log)


class ResumeUpstream(Server):
    """The resume measure's upstream (mode _upstream of this file): one blob, whose drops
    the bench turns on and off between cells, so that both cases go through one upstream."""

    name = "resume-upstream"

    def __init__(self, work, path, digest):
        super().__init__(work)
        self.path, self.digest, self.port, self.drop = path, digest, free_port(), 0
        self.access = os.path.join(work, "resume-upstream-access.log")

    def start(self):
        self.log = os.path.join(self.work, "resume-upstream.log")
        spec = {"path": self.path, "digest": self.digest, "port": self.port,
                "log": self.access, "drop": self.drop}
        self.proc = PROCESSES.spawn([sys.executable, os.path.abspath(__file__), "_upstream",
                                     json.dumps(spec)], self.log, env=clean_env())
        wait_ready(self.proc, self.port, "resume upstream", self.log)

    def set_drop(self, drop):
        """Cut each response's body after `drop` bytes from now on (0: never)."""
        self.drop = drop        # kept for a restart
        status = http_call(self.port, "PUT", "/_bench/drop/%d" % drop)[0]
        if status != 200:
            raise RuntimeError("the resume upstream answered %d to its drop setting" % status)

    def state(self):
        """{"drop", "inflight", "requests", "drops"}: what it answered so far."""
        return json.loads(http_call(self.port, "GET", "/_bench/state")[2])

    def quiet(self, timeout):
        """Until no blob transfer runs: the registry's background fetch of one cell must not
        overlap the next."""
        wait_until(lambda: self.state()["inflight"] == 0, timeout,
                   "the resume upstream's transfers to end")


class NginxProxy(NginxServer):
    """nginx proxy_pass in front of direct, over HTTP and (with certificates) HTTPS."""

    name = label = "nginx"

    def __init__(self, work, direct_port, certs):
        super().__init__(work)
        self.direct_port, self.certs = direct_port, certs
        self.port = free_port()
        self.tls_port = free_port() if certs else None

    def config(self):
        servers = NGINX_SERVER % (self.port, "", "")
        if self.certs:
            servers += NGINX_SERVER % (self.tls_port, " ssl", NGINX_TLS % (
                self.certs["cert"], self.certs["key"]))
        return nginx_head(self.work, self.label) + NGINX_PROXY % dict(
            direct=self.direct_port, servers=servers)

    def wait(self):
        wait_ready(self.proc, self.port, "nginx (proxy)", self.log)
        if self.tls_port:
            wait_ready(self.proc, self.tls_port, "nginx (proxy, https)", self.log, True,
                       self.certs["ca"])


class Registry(Server):
    """docker-registry in pull-through mode; restarted with fresh storage for every cold
    measure."""

    name = "registry"

    def __init__(self, work, direct_port, name="registry"):
        super().__init__(work)
        self.direct_port, self.port, self.generation, self.root = direct_port, free_port(), 0, \
            None
        self.name = name

    def start(self):
        self.generation += 1
        self.root = os.path.join(self.work, "%s-%d" % (self.name, self.generation))
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
                         % (os.path.join(self.root, "data"), self.port, random.getrandbits(48),
                            self.direct_port))
        self.log = os.path.join(self.work, "%s.log" % self.name)
        self.proc = PROCESSES.spawn(["docker-registry", "serve", config], self.log,
                                    env=clean_env())
        wait_ready(self.proc, self.port, "docker-registry", self.log)

    def fresh(self):
        self.stop()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
        self.start()

    def stored(self, digest, size=None):
        hexdigest = digest.split(":")[1]
        path = os.path.join(self.root, "data", "docker", "registry", "v2", "blobs", "sha256",
                            hexdigest[:2], hexdigest, "data")
        try:
            return size is None or os.path.getsize(path) == size
        except OSError:
            return False


class Docxy(Server):
    """One docxy process: a script (the file under test or the baseline), TLS or not, with
    a cache or not."""

    stores_manifests = True

    def __init__(self, work, script, direct_port, name, certs=None, cache=False, workers=None,
                 extra=()):
        super().__init__(work)
        self.script, self.direct_port, self.name = script, direct_port, name
        self.certs, self.cache, self.workers, self.extra = certs, cache, workers, list(extra)
        self.port, self.generation, self.cache_dir = free_port(), 0, None

    def start(self):
        self.generation += 1
        argv = [sys.executable, self.script, "--listen", "127.0.0.1:%d" % self.port,
                "--upstream", "http://127.0.0.1:%d" % self.direct_port,
                "--registries", "docker.io"]
        if self.certs:
            argv += ["--cert", self.certs["cert"], "--key", self.certs["key"]]
        if self.cache:
            self.cache_dir = os.path.join(self.work, "%s-%d" % (self.name, self.generation))
            argv += ["--cache-dir", self.cache_dir, "--cache-max-size", "8G"]
        if self.workers:
            argv += ["--workers", str(self.workers)]
        argv += self.extra
        self.log = os.path.join(self.work, "%s.log" % self.name)
        self.proc = PROCESSES.spawn(argv, self.log, env=clean_env())
        wait_ready(self.proc, self.port, self.name, self.log, bool(self.certs),
                   self.certs and self.certs["ca"])
        if self.workers and self.workers > 1:
            # One worker answering /v2/ is not all of them: wait until every worker runs
            # its serving threads (the accept loop and the waiting connections' selector).
            wait_until(lambda: self.proc.poll() is not None or self.workers_serving(), 30,
                       "%s's %d workers" % (self.name, self.workers))
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited at start-up:\n%s" % (self.name, tail(self.log)))

    def workers_serving(self):
        workers = serving_pids(self.pids())
        return len(workers) == self.workers and all(
            status_kib(pid, "Threads") >= 3 for pid in workers)

    def fresh(self):
        if not self.cache:
            return
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


# What deploy/haproxy/haproxy.cfg asks of its nodes: --drain-delay 3 outlasts its checks
# (every second, out after 2 failures), and HAProxy, on 127.0.0.1, sends X-Forwarded-For.
FLEET_NODE_ARGS = ("--drain-delay", "3", "--trusted-proxy", "127.0.0.1/32")


def fleet_config(text, port, node_ports):
    """The shipped HAProxy configuration with only the address of its `bind` line and those
    of its `server` lines changed, to loopback ports. A file whose shape no longer fits (not
    one `bind`, not one `server` per node) stops the run: the fleet measured must be the one
    shipped, never one these substitutions half changed."""
    bind = re.compile(r"^([ \t]*bind[ \t]+)\S+", re.M)
    server = re.compile(r"^([ \t]*server[ \t]+\S+[ \t]+)\S+", re.M)
    binds, servers = len(bind.findall(text)), len(server.findall(text))
    if binds != 1 or servers != len(node_ports):
        raise SystemExit("bench: %s changed shape: %d `bind` and %d `server` lines, where the "
                         "fleet target substitutes 1 and %d; adapt fleet_config"
                         % (shown_path(HAPROXY_CFG), binds, servers, len(node_ports)))
    text = bind.sub(lambda m: "%s127.0.0.1:%d" % (m.group(1), port), text)
    ports = iter(node_ports)
    return server.sub(lambda m: "%s127.0.0.1:%d" % (m.group(1), next(ports)), text)


class Fleet(Server):
    """HAProxy in the foreground (-db) in front of docxy nodes: one target, whose processes
    are HAProxy's and all the nodes'."""

    def __init__(self, work, script, direct_port, name, nodes):
        super().__init__(work)
        self.name, self.port = name, free_port()
        self.nodes = [Docxy(work, script, direct_port, "%s-%d" % (name, number),
                            extra=FLEET_NODE_ARGS) for number in range(1, nodes + 1)]

    def start(self):
        """Start what does not run: everything at first, the part that died on a revive."""
        for node in self.nodes:
            if not node.alive():
                node.start()
        if super().alive():
            return
        with open(HAPROXY_CFG) as handle:
            text = fleet_config(handle.read(), self.port, [node.port for node in self.nodes])
        path = os.path.join(self.work, "%s-haproxy.cfg" % self.name)
        with open(path, "w") as handle:
            handle.write(text)
        self.log = os.path.join(self.work, "%s-haproxy.log" % self.name)
        self.proc = PROCESSES.spawn(["haproxy", "-db", "-f", path], self.log, env=clean_env())
        wait_ready(self.proc, self.port, "haproxy (%s)" % self.name, self.log)

    def alive(self):
        return super().alive() and all(node.alive() for node in self.nodes)

    def pids(self):
        return super().pids() + [pid for node in self.nodes for pid in node.pids()]

    def logs(self):
        return super().logs() + [path for node in self.nodes for path in node.logs()]

    def stop(self):
        super().stop()
        for node in self.nodes:
            node.stop()


class Target:
    """One row of TARGETS as started: where it listens, and the server behind it."""

    def __init__(self, spec, server, port=None, https=False, ca=None):
        self.spec, self.name = spec, spec["name"]
        self.server, self.port, self.https, self.ca = server, port, https, ca
        self.stateful = bool(spec.get("stateful"))

    def url(self, path):
        return "%s://127.0.0.1:%d%s" % ("https" if self.https else "http", self.port, path)

    def pids(self):
        return self.server.pids() if self.server else []

    def measures(self, measure):
        only = MEASURES[measure].get("targets")
        if only is not None and self.name not in only:
            return False
        return measure in self.spec.get("measures", MEASURE_ORDER)


class Lab:
    """The servers of one run and the targets they serve, started as TARGETS describes."""

    def __init__(self, work, data, scripts, wanted):
        self.work, self.data, self.scripts, self.wanted = work, data, scripts, wanted
        self.targets, self.skipped, self.servers = {}, {}, []
        self.certs, self.cert_problem = None, None
        self.nginx = self.registry = self.direct = None
        self.helps = {}

    def start(self):
        try:
            self.certs = make_certificates(os.path.join(self.work, "certs"))
        except Skip as error:
            self.cert_problem = str(error)
        self.direct = (NginxDirect if shutil.which("nginx") else StdlibDirect)(self.work,
                                                                               self.data)
        self.launch(self.direct)
        for spec in TARGETS:
            reason = self.why_not(spec)
            if reason:
                self.skipped[spec["name"]] = reason
            else:
                self.targets[spec["name"]] = self.target_for(spec)

    def why_not(self, spec):
        """Why a target does not run here, or None."""
        if spec["name"] not in self.wanted:
            return "not selected (--targets)"
        tool = {"nginx": "nginx", "registry": "docker-registry",
                "fleet": "haproxy"}.get(spec["server"])
        if tool and not shutil.which(tool):
            return "%s not installed" % tool
        if spec["server"] == "fleet" and not os.path.isfile(HAPROXY_CFG):
            return "%s not found" % shown_path(HAPROXY_CFG)
        if spec.get("tls") and not self.certs:
            return self.cert_problem
        script = spec.get("script")
        if script and not self.scripts.get(script):
            return "no --baseline-docxy given"
        if spec.get("cache") and "--cache-dir" not in self.help(script):
            return "this docxy has no --cache-dir"
        if spec.get("workers") and "--workers" not in self.help(script):
            return "this docxy has no --workers"
        if spec["server"] == "fleet" and "--drain-delay" not in self.help(script):
            return "this docxy has no --drain-delay"
        return None

    def help(self, script):
        if script not in self.helps:
            self.helps[script] = subprocess.run(
                [sys.executable, self.scripts[script], "--help"], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, timeout=30).stdout.decode("utf-8", "replace")
        return self.helps[script]

    def target_for(self, spec):
        kind, tls = spec["server"], bool(spec.get("tls"))
        ca = self.certs["ca"] if tls else None
        if kind is None:
            return Target(spec, None)
        if kind == "direct":
            return Target(spec, self.direct, self.direct.port)
        if kind == "nginx":
            if not self.nginx:
                self.nginx = self.launch(NginxProxy(self.work, self.direct.port, self.certs))
            return Target(spec, self.nginx, self.nginx.tls_port if tls else self.nginx.port,
                          tls, ca)
        if kind == "registry":
            self.registry = self.launch(Registry(self.work, self.direct.port))
            return Target(spec, self.registry, self.registry.port)
        if kind == "fleet":
            fleet = self.launch(Fleet(self.work, self.scripts[spec["script"]], self.direct.port,
                                      spec["name"], spec["nodes"]))
            return Target(spec, fleet, fleet.port)
        server = self.launch(Docxy(self.work, self.scripts[spec["script"]], self.direct.port,
                                   spec["name"], self.certs if tls else None,
                                   bool(spec.get("cache")), spec.get("workers")))
        return Target(spec, server, server.port, tls, ca)

    def launch(self, server):
        server.start()
        self.servers.append(server)
        return server

    def for_measure(self, measure):
        return [target for target in self.targets.values() if target.measures(measure)]

    def fresh(self):
        """Empty every stateful target: the next fetch from it is a true miss."""
        for target in self.targets.values():
            if target.stateful:
                target.server.fresh()

    def revive(self, notes, rnd):
        """Restart a server that died, with a note: the rounds go on."""
        for server in self.servers:
            if not server.alive():
                say("WARNING: %s died; restarting it" % server.name)
                notes.append("round %d: %s died (see its log)" % (rnd, server.name))
                server.start()


# ================================================================== clients (own processes)

def run_client(mode, spec, timeout):
    """Run a client mode of this file in its own process; returns its JSON answer."""
    out, err, code = PROCESSES.run([sys.executable, os.path.abspath(__file__), mode,
                                    json.dumps(spec)], timeout, "%s client" % mode)
    if code != 0:
        raise RuntimeError("%s client failed: %s"
                           % (mode, err.decode("utf-8", "replace").strip()[-500:]))
    return json.loads(out.decode().strip().splitlines()[-1])


def client_connection(url, ca, timeout=20):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=ssl.create_default_context(cafile=ca))
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def client_get(spec):
    """GET one URL on `streams` connections at once, reading with readinto into a 1 MiB
    buffer. Connections (and TLS handshakes) are made before the clock starts."""
    url, streams = spec["url"], spec.get("streams", 1)
    path = urllib.parse.urlsplit(url).path
    headers = dict({"User-Agent": USER_AGENT, "Accept": "*/*"}, **spec.get("headers", {}))
    barrier = threading.Barrier(streams)
    results = [None] * streams
    machine = [None]

    def one(number):
        result = {"status": None, "bytes": 0, "cache": None, "error": None, "start": None,
                  "end": None}
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
            view = memoryview(bytearray(MiB))
            if number == 0:
                machine[0] = machine_cpu()
            result["start"] = time.perf_counter()
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            result["status"] = response.status
            result["cache"] = response.getheader("X-Docxy-Cache")
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

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    busy = busy_share(machine[0], machine_cpu())
    starts = [r["start"] for r in results if r["start"]]
    ends = [r["end"] for r in results if r["end"]]
    seconds = (max(ends) - min(starts)) if starts and ends else None
    expect = spec.get("expect")
    return {"seconds": seconds, "bytes": sum(r["bytes"] for r in results),
            "statuses": sorted(set(r["status"] for r in results if r["status"] is not None)),
            "cache": sorted(set(r["cache"] for r in results if r["cache"])),
            "errors": sorted(set(r["error"] for r in results if r["error"]))[:3],
            "short": sum(1 for r in results if expect is not None and r["bytes"] != expect),
            "busy": busy}


def client_fetch(spec):
    """One GET of one blob on one connection, read whole with readinto into a 1 MiB buffer and
    hashed as it arrives: how many bytes came, their sha256 and how long it took, also when
    the body was cut short (then `error` says how)."""
    url = spec["url"]
    result = {"status": None, "bytes": 0, "digest": None, "seconds": None, "error": None,
              "cache": None}
    hasher, view = hashlib.sha256(), memoryview(bytearray(MiB))
    connection = client_connection(url, spec.get("ca"))
    try:
        connection.connect()
        started = time.perf_counter()
        connection.request("GET", urllib.parse.urlsplit(url).path,
                           headers={"User-Agent": USER_AGENT, "Accept": "*/*"})
        response = connection.getresponse()
        result["status"], result["cache"] = response.status, response.getheader("X-Docxy-Cache")
        while True:
            n = response.readinto(view)
            if not n:
                break
            hasher.update(view[:n])
            result["bytes"] += n
        if response.length:     # readinto ends a short body as if it were whole
            raise http.client.IncompleteRead(b"", response.length)
        result["seconds"] = time.perf_counter() - started
    except Exception as error:
        result["error"] = "%s: %s" % (type(error).__name__, error)
    finally:
        connection.close()
    result["digest"] = "sha256:" + hasher.hexdigest()
    return result


def client_pull(spec):
    """Pull an image the way dockerd does: /v2/, HEAD the tag, GET the index and the manifest
    by digest, GET the config, then the layers, up to 3 at once, each digest verified."""
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
                connection.request(method, path,
                                   headers=dict({"User-Agent": USER_AGENT}, **(headers or {})))
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
        view = memoryview(bytearray(MiB))
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

    def manifest(digest):
        return json.loads(fetch("/v2/%s/manifests/%s" % (repo, digest), digest, ACCEPT))

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
    document = manifest(digest)
    if document.get("mediaType") == INDEX_TYPE or "manifests" in document:
        chosen = [m for m in document["manifests"]
                  if m.get("platform", {}).get("os") == "linux"
                  and m["platform"].get("architecture") == "amd64"]
        document = manifest(chosen[0]["digest"])
    config = document["config"]["digest"]
    fetch("/v2/%s/blobs/%s" % (repo, config), config)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(fetch, "/v2/%s/blobs/%s" % (repo, layer["digest"]),
                               layer["digest"]) for layer in document["layers"]]
        for future in futures:
            future.result()
    return {"seconds": time.perf_counter() - started, "requests": counter["requests"],
            "bytes": counter["bytes"]}


def client_load(spec):
    """Keep-alive load on `conns` connections from one process, one epoll loop, requests
    composed once: the stdlib stand-in for wrk, and the HEAD client (wrk 4.1 cannot parse
    answers to HEAD: it waits for the Content-Length body that never comes). Runs a list of
    cells, each starting at an agreed wall-clock time so that several processes run
    together."""
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

    def receive(connection):
        """Read what is there; True when the peer closed the connection."""
        sock, buffer = connection["sock"], connection["buffer"]
        while True:
            try:
                data = sock.recv(262144)
            except (BlockingIOError, ssl.SSLWantReadError):
                return False
            except OSError:
                data = b""
            if not data:
                return True
            buffer += data
            if not https or not sock.pending():
                return False

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
                closed = receive(connection)
                sock, buffer = connection["sock"], connection["buffer"]
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


class SmallAnswers(http.server.BaseHTTPRequestHandler):
    """What the bench's own servers' handlers share: HTTP/1.1, GET and HEAD both answered by
    serve(body), which a subclass writes, a small answer in one call, and no access log on
    stderr (each server keeps its own log)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.serve(True)

    def do_HEAD(self):
        self.serve(False)

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


def direct_server(root, port, meta_path, access_path):
    """The stdlib upstream: registry paths from the data directory, socket.sendfile bodies."""
    with open(meta_path) as handle:
        paths = json.load(handle)
    log = open(access_path, "a", buffering=1)
    log_lock = threading.Lock()

    class Handler(SmallAnswers):
        """GET and HEAD of the paths in the data directory, as a registry answers them."""

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

    LoopbackServer(("127.0.0.1", port), Handler).serve_forever()


def resume_upstream(spec):
    """The resume measure's upstream: one blob from a file with sendfile, GET and HEAD, a
    single byte range honoured (also under If-Range with its ETag). While its drop is set
    (PUT /_bench/drop/N), it sends at most N bytes of each response's body and then closes
    the connection, the way a flaky link or a restarting registry cuts a download short.
    GET /_bench/state tells the bench what it answered and what still runs."""
    blob, digest, log = spec["path"], spec["digest"], open(spec["log"], "a", buffering=1)
    size, served = os.path.getsize(blob), "/v2/library/big/blobs/" + digest
    etag = '"%s"' % digest
    state = {"drop": spec["drop"], "inflight": 0, "requests": 0, "drops": 0}
    lock = threading.Lock()
    single = re.compile(r"bytes=(\d+)-(\d*)")

    class Handler(SmallAnswers):
        """The blob, /v2/ and the bench's two control paths."""

        def do_PUT(self):
            match = re.fullmatch(r"/_bench/drop/(\d+)", self.path)
            if not match:
                return self.small(404, b"not found\n", "text/plain", True)
            with lock:
                state["drop"] = int(match.group(1))
            self.small(200, b"{}", "application/json", True)

        def span(self):
            """(status, first, last): a single range asked for (If-Range: only while it names
            this ETag), else the whole blob. Other ranges are ignored, as HTTP allows."""
            match = single.fullmatch(self.headers.get("Range", "").replace(" ", ""))
            if_range = self.headers.get("If-Range")
            if not match or (if_range is not None and if_range.strip() != etag):
                return 200, 0, size - 1
            first = int(match.group(1))
            last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if first >= size:
                return 416, 0, -1
            return (206, first, last) if last >= first else (200, 0, size - 1)

        def serve(self, body):
            path = self.path.partition("?")[0]
            if path == "/_bench/state":
                with lock:
                    payload = json.dumps(state).encode()
                return self.small(200, payload, "application/json", body)
            if path == "/v2/":
                return self.small(200, b"{}", "application/json", body)
            if path != served:
                return self.small(404, b"not found\n", "text/plain", body)
            with lock:
                state["inflight"] += 1
                state["requests"] += 1
                drop = state["drop"]
            status, first, last = self.span()
            sent, cut = 0, False
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(last - first + 1))
                self.send_header("Docker-Content-Digest", digest)
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", "bytes %d-%d/%d" % (first, last, size))
                elif status == 416:
                    self.send_header("Content-Range", "bytes */%d" % size)
                self.end_headers()
                length = last - first + 1
                if body and length > 0:
                    allowed = min(length, drop) if drop else length
                    with open(blob, "rb") as handle:
                        sent = self.connection.sendfile(handle, first, allowed)
                    if sent < length:
                        # Hard, at once: the client must see a body shorter than its
                        # Content-Length, not a connection that merely goes quiet.
                        cut, self.close_connection = True, True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        self.connection.close()
            finally:
                with lock:
                    state["inflight"] -= 1
                    state["drops"] += cut
                log.write('%s "%s %s" %d range=%s if-range=%s sent=%d%s\n' % (
                    self.client_address[0], self.command, path, status,
                    self.headers.get("Range", "-"), self.headers.get("If-Range", "-"), sent,
                    " CUT" if cut else ""))

    class Upstream(LoopbackServer):
        """Peers that reset a connection are routine here, where connections are cut on
        purpose: only other errors are worth a traceback in the log."""

        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    Upstream(("127.0.0.1", spec["port"]), Handler).serve_forever()


class LoopbackServer(http.server.ThreadingHTTPServer):
    """The stdlib upstreams' server: a thread per connection, a deep backlog, TCP_NODELAY on
    every socket."""

    daemon_threads = True
    request_queue_size = 4096

    def get_request(self):
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address


def run_wrk(url, script, conns, seconds):
    """(req/s, p50 ms, p99 ms, errors) from wrk: `conns` keep-alive connections, 2 threads."""
    argv = ["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", "%ds" % max(1, round(seconds)),
            "--timeout", "5s", "--latency", "-s", script, url]
    out, err, _ = PROCESSES.run(argv, seconds + 30, "wrk")
    text = (out + err).decode("utf-8", "replace")
    match = re.search(r"^BENCHWRK (.*)$", text, re.M)
    if not match:
        raise RuntimeError("wrk failed: %s" % text.strip()[-300:])
    requests, duration, p50, p99, *errors = [float(x) for x in match.group(1).split()]
    if not requests:
        raise RuntimeError("wrk completed no request in %gs" % seconds)
    return requests / (duration / 1e6), p50 / 1000, p99 / 1000, int(sum(errors))


WRK_SCRIPT = """wrk.method = "%s"
wrk.headers["Accept"] = "%s"
wrk.headers["User-Agent"] = "%s"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCHWRK %%.0f %%.0f %%.0f %%.0f %%.0f %%.0f %%.0f %%.0f %%.0f\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


# ================================================================== results

class Results:
    """The cells of a run, one value per measure, target, case, figure and round, and the
    notes (failures, surprises) per measure, target and case."""

    def __init__(self, cells=(), notes=()):
        self.cells, self.notes = [], []
        self.index = {}
        for cell in cells:
            self.add(cell)
        for note in notes:
            self.notes.append(dict(note))

    def add(self, cell):
        self.cells.append(cell)
        key = (cell["measure"], cell["target"], cell["case"], cell["figure"])
        self.index.setdefault(key, {})[cell["round"]] = cell["value"]

    def put(self, measure, target, case, rnd, **figures):
        for figure, value in figures.items():
            if value is None:
                continue
            self.add({"measure": measure, "target": target, "case": case, "figure": figure,
                      "unit": FIGURES[figure][0], "round": rnd, "value": round(value, 6)})

    def note(self, measure, target, case, rnd, text):
        self.notes.append({"measure": measure, "target": target, "case": case, "round": rnd,
                           "text": text})

    def series(self, measure, target, case, figure):
        """{round: value}"""
        return self.index.get((measure, target, case, figure), {})

    def rows(self, measure):
        """(target, case) pairs with a figure or a note in this measure."""
        rows = {(c["target"], c["case"]) for c in self.cells if c["measure"] == measure}
        rows |= {(n["target"], n["case"]) for n in self.notes if n["measure"] == measure}
        return rows

    def notes_for(self, measure, target=None):
        return [n for n in self.notes if n["measure"] == measure
                and (target is None or n["target"] == target)]


def values_of(values):
    if values is None:
        return []
    values = values.values() if isinstance(values, dict) else values
    return [v for v in values if v is not None]


def median(values):
    values = values_of(values)
    return statistics.median(values) if values else None


def summary(values, digits=0, suffix=""):
    """'median [min-max]' of a {round: value} mapping; a dash when there is none."""
    values = values_of(values)
    if not values:
        return "–"
    fmt = "%%.%df" % digits
    if len(values) == 1:
        return (fmt % values[0]) + suffix
    return "%s [%s–%s]%s" % (fmt % statistics.median(values), fmt % min(values),
                             fmt % max(values), suffix)


def per_round_ratio(mine, ref):
    """Ratio of two {round: value} series, for the rounds in which both were measured."""
    return {r: mine[r] / ref[r] for r in mine
            if r in ref and mine[r] is not None and ref[r]}


def per_round_difference(mine, ref, per=1):
    """(mine - ref) / per of two {round: value} series, for the rounds in which both were
    measured."""
    return {r: (mine[r] - ref[r]) / per for r in mine
            if r in ref and mine[r] is not None and ref[r] is not None}


def meets(value, goal):
    operator, bound = goal
    return {">=": value >= bound, ">": value > bound, "<=": value <= bound,
            "<": value < bound}[operator]


# ================================================================== the measures

class Runner:
    """What every measure shares: the lab, the results, the sizes, and running one cell
    against one target with the server's CPU and memory read from /proc around it."""

    def __init__(self, lab, results, sizes, quick, use_wrk):
        self.lab, self.results, self.sizes = lab, results, sizes
        self.quick, self.use_wrk, self.data = quick, use_wrk, lab.data
        self.wrk_scripts = {}

    def get(self, target, path, streams=1, headers=None, expect=None, status=200):
        """GET on `streams` connections at once: (figures, the X-Docxy-Cache values)."""
        pids = target.pids()
        if not pids:
            raise RuntimeError("%s is not running" % target.name)
        cpu0 = cpu_seconds(pids)
        sampler = RssSampler(pids)
        sampler.start()
        size = expect * streams
        try:
            answer = run_client("_get", {"url": target.url(path), "streams": streams,
                                         "headers": headers or {}, "ca": target.ca,
                                         "expect": expect},
                                timeout=120 + size / (20 * MiB))
        finally:
            peak = sampler.finish()
        cpu = cpu_seconds(pids) - cpu0
        if (answer["errors"] or answer["statuses"] != [status] or answer["short"]
                or answer["bytes"] != size):
            raise RuntimeError("GET %s: statuses %s, %d of %d bytes, %d short streams, errors %s"
                               % (path, answer["statuses"], answer["bytes"], size,
                                  answer["short"], answer["errors"]))
        busy = answer.get("busy")
        figures = {"throughput": answer["bytes"] / MiB / answer["seconds"],
                   "server_cpu": cpu / (answer["bytes"] / GiB), "peak_rss": peak,
                   "busy": None if busy is None else 100 * busy}
        return figures, ",".join(answer["cache"])

    def attempt(self, measure, target, case, rnd, function):
        """Run one cell; a failure is recorded (and printed) as such, never as a figure."""
        try:
            function()
        except Skip as error:
            self.results.note(measure, target, case, rnd, "skipped: %s" % error)
        except (RuntimeError, OSError, http.client.HTTPException, ValueError, KeyError) as error:
            text = str(error).strip().splitlines()[0][:300] if str(error).strip() \
                else type(error).__name__
            self.results.note(measure, target, case, rnd, "FAILED: %s" % text)
            say("  %s / %s (%s): FAILED: %s" % (measure, target, case, text))

    def check_cache(self, measure, target, case, rnd, seen, wanted):
        if target.spec.get("cache") and seen != wanted:
            self.results.note(measure, target.name, case, rnd,
                              "X-Docxy-Cache was %r, not %r" % (seen, wanted))

    def warm_up(self, path, size):
        """One unmeasured transfer from `direct` before a round's first cell: the first GiB
        after restarting the stateful targets ran at half speed, whichever target came
        first."""
        settle()
        try:
            self.get(self.lab.targets["direct"], path, 1, None, size)
        except (RuntimeError, OSError, http.client.HTTPException, ValueError) as error:
            say("  warm-up failed: %s" % error)

    def wait_stored(self, target, digests, size, timeout):
        """Until a stateful target holds these digests (the registry: blobs only)."""
        server = target.server
        wait_until(lambda: all(server.stored(d, size) for d in digests), timeout,
                   "%s to store %d objects" % (target.name, len(digests)))

    def run_units(self, units, rnd):
        """Each unit measures one target; the order turns by one every round."""
        shift = rnd % len(units) if units else 0
        for unit in units[shift:] + units[:shift]:
            unit()
            settle()

    def wrk_script(self, method):
        if method not in self.wrk_scripts:
            path = os.path.join(self.lab.work, "wrk-%s.lua" % method.lower())
            with open(path, "w") as handle:
                handle.write(WRK_SCRIPT % (method, ACCEPT, USER_AGENT))
            self.wrk_scripts[method] = path
        return self.wrk_scripts[method]


class BlobMeasure:
    """Measure 1: one client GETs one large blob on one connection, from every target."""

    name = "blob"

    def __init__(self, runner):
        self.runner = runner

    def run(self, rnd):
        runner = self.runner
        path = "/v2/library/big/blobs/" + runner.data["big"]
        size = runner.data["big_size"]
        runner.lab.fresh()
        runner.warm_up(path, size)
        units = []
        for target in runner.lab.for_measure(self.name):
            if target.server is None:
                units.append(lambda: self.ceiling(rnd, size))
            elif target.stateful:
                units.append(lambda t=target: self.miss_then_hit(t, rnd, path, size))
            else:
                units.append(lambda t=target: self.cell(t, "get", rnd, path, size))
                if target.spec.get("range"):
                    units.append(lambda t=target: self.cell(t, "range", rnd, path, size,
                                                            {"Range": "bytes=0-"}, 206))
        runner.run_units(units, rnd)

    def cell(self, target, case, rnd, path, size, headers=None, status=200, cache=None):
        runner = self.runner

        def run():
            figures, seen = runner.get(target, path, 1, headers, size, status)
            figures.pop("peak_rss")
            runner.results.put(self.name, target.name, case, rnd, **figures)
            if cache:
                runner.check_cache(self.name, target, case, rnd, seen, cache)
            say("  blob %-28s %8.0f MiB/s  %.2f CPU s/GiB  machine %3.0f%% busy%s" % (
                "%s (%s)" % (target.name, case), figures["throughput"], figures["server_cpu"],
                figures["busy"] or 0, "  cache=" + seen if seen else ""))
        runner.attempt(self.name, target.name, case, rnd, run)

    def miss_then_hit(self, target, rnd, path, size):
        self.cell(target, "miss", rnd, path, size, cache="miss")
        try:
            self.runner.wait_stored(target, [self.runner.data["big"]], size, 180)
        except RuntimeError as error:
            self.runner.results.note(self.name, target.name, "hit", rnd, str(error))
            return
        self.cell(target, "hit", rnd, path, size, cache="hit")

    def ceiling(self, rnd, size):
        mibs, cpu = hash_speed(size)
        self.runner.results.put(self.name, "sha256", "get", rnd, throughput=mibs,
                                server_cpu=cpu)
        say("  blob %-28s %8.0f MiB/s  %.2f CPU s/GiB" % ("sha256 (in memory)", mibs, cpu))


class ConcurrentMeasure:
    """Measure 2: many clients GET the same medium blob at once."""

    name = "concurrent"

    def __init__(self, runner):
        self.runner = runner

    def run(self, rnd):
        runner = self.runner
        self.path = "/v2/library/big/blobs/" + runner.data["mid"]
        self.size = runner.data["mid_size"]
        runner.lab.fresh()
        units = []
        for target in runner.lab.for_measure(self.name):
            if not target.stateful:
                units.append(lambda t=target: self.cell(t, "get", rnd))
            elif target.spec.get("coalesces"):
                units.append(lambda t=target: self.miss_then_hit(t, rnd))
            else:
                units.append(lambda t=target: self.filled_then_hit(t, rnd))
        runner.run_units(units, rnd)

    def cell(self, target, case, rnd, cache=None):
        runner, streams = self.runner, self.runner.sizes["streams"]

        def run():
            figures, seen = runner.get(target, self.path, streams, None, self.size)
            runner.results.put(self.name, target.name, case, rnd, **figures)
            if cache:
                runner.check_cache(self.name, target, case, rnd, seen, cache)
            say("  %dx %-28s %8.0f MiB/s  peak RSS %5.1f MiB  %.2f CPU s/GiB  machine %3.0f%% "
                "busy%s" % (streams, "%s (%s)" % (target.name, case), figures["throughput"],
                            figures["peak_rss"], figures["server_cpu"], figures["busy"] or 0,
                            "  cache=" + seen if seen else ""))
        runner.attempt(self.name, target.name, case, rnd, run)

    def miss_then_hit(self, target, rnd):
        self.cell(target, "miss", rnd)
        self.runner.attempt(self.name, target.name, "hit", rnd, lambda: self.runner.wait_stored(
            target, [self.runner.data["mid"]], self.size, 120))
        self.cell(target, "hit", rnd, cache="hit")

    def filled_then_hit(self, target, rnd):
        def fill():
            self.runner.get(target, self.path, 1, None, self.size)
            self.runner.wait_stored(target, [self.runner.data["mid"]], self.size, 120)
        self.runner.attempt(self.name, target.name, "hit", rnd, fill)
        self.cell(target, "hit", rnd)


class ManifestMeasure:
    """Measure 3: manifest HEAD and GET by tag on 1, 16 and 64 keep-alive connections."""

    name = "manifest"

    def __init__(self, runner):
        self.runner = runner

    def run(self, rnd):
        units = [lambda t=target: self.unit(t, rnd)
                 for target in self.runner.lab.for_measure(self.name)]
        self.runner.run_units(units, rnd)

    def record(self, target, method, conns, rnd, figures):
        rps, p50, p99, errors = figures
        case = "%s c=%d" % (method, conns)
        self.runner.results.put(self.name, target.name, case, rnd, rps=rps, p50=p50, p99=p99)
        if errors:
            self.runner.results.note(self.name, target.name, case, rnd,
                                     "%d errors or non-200 answers" % errors)
        say("  %-5s c=%-3d %-18s %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms%s" % (
            method, conns, target.name, rps, p50, p99, "  ERRORS %d" % errors if errors else ""))

    def unit(self, target, rnd):
        runner, conns = self.runner, self.runner.sizes["conns"]
        seconds = runner.sizes["cell"]
        first = "HEAD c=%d" % conns[0]

        def warm():     # the stateful targets learn the tag and the manifest first
            for method in ("GET", "HEAD", "GET"):
                status = http_call(target.port, method, MANIFEST_PATH, target.https, target.ca,
                                   {"Accept": ACCEPT})[0]
                if status != 200:
                    raise RuntimeError("%s %s answered %d" % (method, MANIFEST_PATH, status))
        runner.attempt(self.name, target.name, first, rnd, warm)
        cells = [("HEAD", c) for c in conns]
        if not runner.use_wrk:
            cells += [("GET", c) for c in conns]

        def stdlib():
            for (method, count), figures in self.load(target, cells, seconds).items():
                if figures is None:
                    runner.results.note(self.name, target.name, "%s c=%d" % (method, count), rnd,
                                        "FAILED: no request completed in %g s" % seconds)
                    say("  %-5s c=%-3d %-18s no request completed" % (method, count,
                                                                      target.name))
                else:
                    self.record(target, method, count, rnd, figures)
        runner.attempt(self.name, target.name, first, rnd, stdlib)
        if runner.use_wrk:
            for count in conns:
                runner.attempt(self.name, target.name, "GET c=%d" % count, rnd,
                               lambda: self.record(target, "GET", count, rnd, run_wrk(
                                   target.url(MANIFEST_PATH), runner.wrk_script("GET"), count,
                                   seconds)))

    def load(self, target, cells, seconds):
        """Run cells [(method, conns)] with the stdlib load client: two processes (like wrk
        -t 2), connections split between them, every cell starting at the same agreed
        instant. Returns {(method, conns): (req/s, p50 ms, p99 ms, errors), or None when
        no request completed}."""
        processes, gap = 2, (0.12 if self.runner.quick else 0.5)
        first = time.time() + (0.35 if self.runner.quick else 0.5)
        specs = []
        for number in range(processes):
            plan = []
            for index, (method, conns) in enumerate(cells):
                share = conns // processes + (1 if number < conns % processes else 0)
                plan.append({"method": method, "conns": share, "seconds": seconds,
                             "start": first + index * (seconds + gap)})
            specs.append({"url": target.url(MANIFEST_PATH), "ca": target.ca, "cells": plan})
        timeout = 60 + len(cells) * (seconds + gap)
        with concurrent.futures.ThreadPoolExecutor(processes) as pool:
            answers = list(pool.map(lambda spec: run_client("_load", spec, timeout), specs))
        results = {}
        for index, cell in enumerate(cells):
            parts = [answer[index] for answer in answers]
            latencies = sorted(x for part in parts for x in part["latencies"])
            count = sum(part["count"] for part in parts)
            if not count:
                results[cell] = None    # noted for this cell alone; the others stand
                continue

            def pick(q):
                return latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1000.0
            results[cell] = (count / seconds, pick(0.50), pick(0.99),
                             sum(part["errors"] for part in parts))
        return results


class IdleMeasure:
    """Measure 4: RSS with many idle keep-alive connections, and how long a new client
    waits meanwhile."""

    name = "idle"

    def __init__(self, runner):
        self.runner = runner

    def run(self, rnd):
        units = [lambda t=target: self.unit(t, rnd)
                 for target in self.runner.lab.for_measure(self.name)]
        self.runner.run_units(units, rnd)

    def connect(self, target):
        if target.https:
            context = ssl.create_default_context(cafile=target.ca)
            return http.client.HTTPSConnection("127.0.0.1", target.port, timeout=30,
                                               context=context)
        return http.client.HTTPConnection("127.0.0.1", target.port, timeout=30)

    def unit(self, target, rnd):
        runner, count = self.runner, self.runner.sizes["idle"]

        def run():
            pids = target.pids()
            before = rss_mib(pids)
            connections = []
            try:
                for _ in range(count):
                    connection = self.connect(target)
                    connections.append(connection)
                    self.use(connection, len(connections))
                time.sleep(0.3 if runner.quick else 1.0)
                pids = target.pids()
                during = rss_mib(pids)
                pss = pss_mib(pids)
                peers = {connection.sock.getsockname()[1] for connection in connections
                         if connection.sock}
                held = connections_held(serving_pids(pids), target.port, peers)
                each = [status_kib(pid, "VmRSS") / 1024.0 for pid in pids]
                probes = []
                for _ in range(5):
                    started = time.perf_counter()
                    status = http_call(target.port, "GET", "/v2/", target.https, target.ca,
                                       timeout=10)[0]
                    probes.append((time.perf_counter() - started) * 1000)
                    if status != 200:
                        raise RuntimeError("new client: /v2/ answered %d" % status)
                    time.sleep(0.05)
                for number, connection in enumerate(connections[::max(1, count // 20)]):
                    self.use(connection, number)        # still open and served?
            finally:
                for connection in connections:
                    connection.close()
            new = statistics.median(probes)
            runner.results.put(self.name, target.name, "idle", rnd, rss_idle=during,
                               rss_before=before, pss_idle=pss, new_client=new,
                               new_client_worst=max(probes), idle_busiest=max(held),
                               idle_quietest=min(held))
            say("  idle %-18s RSS %6.1f MiB (before %5.1f) with %d idle; new client %.1f ms "
                "(worst %.1f)" % (target.name, during, before, count, new, max(probes)))
            if len(pids) > 1:
                say("       %d processes, RSS %s MiB, PSS %s MiB; idle connections held by "
                    "each worker: %s" % (len(pids), " + ".join("%.1f" % x for x in each),
                                         "–" if pss is None else "%.1f" % pss,
                                         ", ".join(str(x) for x in held)))
            if sum(held) < count:
                runner.results.note(self.name, target.name, "idle", rnd,
                                    "only %d of %d idle connections found in the workers' "
                                    "descriptors" % (sum(held), count))
        runner.attempt(self.name, target.name, "idle", rnd, run)
        time.sleep(0.2 if runner.quick else 0.5)

    @staticmethod
    def use(connection, number):
        connection.request("GET", "/v2/", headers={"User-Agent": USER_AGENT})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError("/v2/ answered %d on connection %d" % (response.status, number))


class PullMeasure:
    """Measure 5: a whole image pulled by a client that behaves like dockerd; the stateful
    targets cold, then warm."""

    name = "pull"

    def __init__(self, runner):
        self.runner = runner

    def run(self, rnd):
        runner = self.runner
        runner.lab.fresh()
        units = []
        for target in runner.lab.for_measure(self.name):
            if target.stateful:
                units.append(lambda t=target: self.cold_then_warm(t, rnd))
            else:
                units.append(lambda t=target: self.cell(t, "pull", rnd))
        runner.run_units(units, rnd)

    def access_lines(self, offset):
        with open(self.runner.lab.direct.access, "rb") as handle:
            handle.seek(offset)
            return handle.read().count(b"\n")

    def cell(self, target, case, rnd):
        runner = self.runner

        def run():
            pids = target.pids()
            cpu0 = cpu_seconds(pids)
            offset = os.path.getsize(runner.lab.direct.access)
            docxy = isinstance(target.server, Docxy)
            log_offset = os.path.getsize(target.server.log) if docxy else None
            answer = run_client("_pull", {"base": target.url(""), "ca": target.ca,
                                          "repo": "library/app", "tag": "latest"}, timeout=300)
            time.sleep(0.2)     # let the access log catch up
            upstream = self.access_lines(offset)
            figures = dict(wall=answer["seconds"], upstream_requests=upstream,
                           server_cpu_s=cpu_seconds(pids) - cpu0, requests=answer["requests"])
            extra = ""
            if docxy:
                asked, lines = self.docxy_upstream(target.server.log, log_offset)
                figures["docxy_upstream"] = asked
                extra = "  docxy log: %d of %d requests went upstream" % (asked, lines)
            runner.results.put(self.name, target.name, case, rnd, **figures)
            say("  pull %-24s %6.2f s  %d requests  upstream (at direct) %d%s" % (
                "%s (%s)" % (target.name, case), answer["seconds"], answer["requests"],
                upstream, extra))
        runner.attempt(self.name, target.name, case, rnd, run)

    @staticmethod
    def docxy_upstream(log, offset):
        """(requests that went upstream, requests) in docxy's access log since offset."""
        with open(log, "rb") as handle:
            handle.seek(offset)
            lines = [line for line in handle.read().decode("utf-8", "replace").splitlines()
                     if " upstream=" in line]
        asked = [line for line in lines if not re.search(r" upstream=-(\s|$)", line)]
        return len(asked), len(lines)

    def cold_then_warm(self, target, rnd):
        data = self.runner.data
        digests = data["layers"] + [data["config"]]
        if target.server.stores_manifests:
            digests += [data["manifest"], data["index"]]
        self.cell(target, "cold", rnd)
        self.runner.attempt(self.name, target.name, "warm", rnd,
                            lambda: self.runner.wait_stored(target, digests, None, 120))
        self.cell(target, "warm", rnd)


class ResumeMeasure:
    """Measure 6: one large blob through an upstream that drops the connection every so
    often, and through the same upstream without drops; each target on servers of its own,
    pointed at that upstream."""

    name = "resume"

    def __init__(self, runner):
        self.runner = runner
        self.upstream, self.targets = None, []

    def setup(self):
        """The blob, its upstream and this measure's own servers, once, at its first round:
        the lab's servers point at `direct`, which never drops."""
        runner, lab = self.runner, self.runner.lab
        work = os.path.join(lab.work, "resume")
        os.makedirs(work, exist_ok=True)
        self.size = runner.sizes["resume"]
        say("writing the resume blob (%d MiB)" % (self.size // MiB))
        root = os.path.join(work, "data")
        self.digest = write_blob(root, "big", self.size, 3)
        self.path = "/v2/library/big/blobs/" + self.digest
        self.upstream = lab.launch(ResumeUpstream(work, os.path.join(root, self.path[1:]),
                                                  self.digest))
        for target in lab.for_measure(self.name):
            spec = target.spec
            if spec["server"] == "direct":
                server = self.upstream
            elif spec["server"] == "registry":
                server = lab.launch(Registry(work, self.upstream.port, "resume-registry"))
            else:
                server = lab.launch(Docxy(work, lab.scripts[spec["script"]], self.upstream.port,
                                          "resume-" + spec["name"], cache=bool(spec.get("cache"))))
            self.targets.append(Target(spec, server, server.port))

    def run(self, rnd):
        runner = self.runner
        if self.upstream is None:
            self.setup()
        runner.attempt(self.name, "direct", "whole", rnd, self.warm_up)
        units = []
        for target in self.targets:
            if target.spec["server"] == "registry":     # what it does with drops, no ratio
                units.append(lambda t=target: self.cell(t, "drops", rnd))
            else:
                units.append(lambda t=target: self.both(t, rnd))
        runner.run_units(units, rnd)

    def warm_up(self):
        """One unmeasured read of the blob from the upstream: from the page cache after it."""
        self.upstream.set_drop(0)
        run_client("_fetch", {"url": "http://127.0.0.1:%d%s" % (self.upstream.port, self.path)},
                   timeout=120 + self.size / (10 * MiB))

    def both(self, target, rnd):
        """Both cases, in turns first, so that neither always follows the other."""
        for case in ("whole", "drops") if rnd % 2 else ("drops", "whole"):
            self.cell(target, case, rnd)
            settle()

    def cell(self, target, case, rnd):
        runner, server, size = self.runner, target.server, self.size
        docxy = isinstance(server, Docxy)

        def run():
            self.upstream.quiet(60)
            if target.stateful:
                server.fresh()      # an empty cache, fresh storage: this fetch is a miss
            self.upstream.set_drop(runner.sizes["resume_drop"] if case == "drops" else 0)
            before = self.upstream.state()
            resumes0 = self.resumes(server) if docxy else None
            offset = os.path.getsize(server.log) if docxy else None
            pids = target.pids()
            cpu0 = cpu_seconds(pids)
            answer = run_client("_fetch", {"url": target.url(self.path), "ca": target.ca},
                                timeout=120 + size / (10 * MiB))
            self.upstream.quiet(60)
            cpu = cpu_seconds(pids) - cpu0
            after = self.upstream.state()
            resumes1 = self.resumes(server) if docxy else None
            whole = (answer["error"] is None and answer["status"] == 200
                     and answer["bytes"] == size and answer["digest"] == self.digest)
            figures = dict(received=answer["bytes"] / MiB,
                           upstream_blob=after["requests"] - before["requests"],
                           upstream_drops=after["drops"] - before["drops"], server_cpu_s=cpu,
                           wall=answer["seconds"] if whole else None)
            if resumes0 is not None and resumes1 is not None:
                figures["resumes"] = resumes1 - resumes0
            runner.results.put(self.name, target.name, case, rnd, **figures)
            logged = self.logged_resumes(server.log, offset) if docxy else None
            say("  resume %-26s %s  got %6.1f of %d MiB  upstream: %d requests, %d cut%s" % (
                "%s (%s)" % (target.name, case),
                "%7.3f s" % answer["seconds"] if whole else "FAILED   ",
                answer["bytes"] / MiB, size // MiB, figures["upstream_blob"],
                figures["upstream_drops"],
                "" if logged is None else "  docxy: %s resumes (/metrics), %d logged" % (
                    "–" if figures.get("resumes") is None else "%d" % figures["resumes"],
                    logged)))
            if not whole:
                raise RuntimeError("the client got %d of %d bytes (%.1f MiB), status %s, %s" % (
                    answer["bytes"], size, answer["bytes"] / MiB, answer["status"],
                    answer["error"] or ("sha256 %s, not the blob's" % answer["digest"])))
            if target.spec.get("cache"):
                runner.check_cache(self.name, target, case, rnd, answer["cache"] or "", "miss")
                runner.wait_stored(target, [self.digest], size, 60)
        runner.attempt(self.name, target.name, case, rnd, run)

    @staticmethod
    def resumes(server):
        """docxy_upstream_resumes_total on docxy's /metrics, summed over its labels (docxy
        shows a counter once it counted something: none is 0); None without /metrics."""
        try:
            status, _, body = http_call(server.port, "GET", "/metrics")
        except (OSError, http.client.HTTPException):
            return None
        if status != 200:
            return None
        return sum(float(line.rsplit(None, 1)[1]) for line in
                   body.decode("utf-8", "replace").splitlines()
                   if re.match(r"docxy_upstream_resumes_total[{ ]", line))

    @staticmethod
    def logged_resumes(log, offset):
        """Resumes docxy's log tells of since offset: its "resuming ..." lines."""
        with open(log, "rb") as handle:
            handle.seek(offset)
            return sum(1 for line in handle.read().decode("utf-8", "replace").splitlines()
                       if "resuming " in line)


MEASURE_CLASSES = {cls.name: cls for cls in (BlobMeasure, ConcurrentMeasure, ManifestMeasure,
                                             IdleMeasure, PullMeasure, ResumeMeasure)}


# ================================================================== one run, and its facts

def git(args, cwd):
    try:
        done = subprocess.run(["git"] + args, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "replace").strip() if done.returncode == 0 else None


def git_facts(path, top, name):
    """Where a file's content stands in git: in the repository (`name` is its path there),
    the commit it last changed in and whether it differs from HEAD's copy; outside it, the
    commit in which this content of `name` first appeared (found by its blob id)."""
    if not top:
        return None
    blob = git(["hash-object", "--no-filters", path], top)
    real, root = os.path.realpath(path), os.path.realpath(top)
    if real.startswith(root + os.sep):
        rel = os.path.relpath(real, root)
        return {"head": git(["rev-parse", "HEAD"], top),
                "last_change": git(["log", "-1", "--format=%H", "--", rel], top),
                "modified": blob != git(["rev-parse", "HEAD:" + rel], top)}
    found = [commit for commit in (git(["log", "--all", "--format=%H", "--find-object=" + blob,
                                         "--", name], top) or "").split()
             if git(["rev-parse", "%s:%s" % (commit, name)], top) == blob]
    return {"content_of": found[-1]} if found else None


def shown_path(path):
    """A path as the report shows it: relative to the repository when it is inside it."""
    top = os.path.realpath(os.path.join(HERE, ".."))
    real = os.path.realpath(path) if os.path.exists(path) else path
    return os.path.relpath(real, top) if real.startswith(top + os.sep) else path


def file_sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def os_release():
    try:
        with open("/etc/os-release") as handle:
            for line in handle:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def memory_gib():
    try:
        with open("/proc/meminfo") as handle:
            return round(int(handle.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None


class FilesUnderTest:
    """The docxy.py files a run measures (--docxy, and --baseline-docxy: a file or a git
    revision), copied into the work directory so that they cannot change between rounds,
    with their sha256, version and git facts."""

    def __init__(self, work, docxy, baseline):
        self.work, self.docxy, self.baseline = work, docxy, baseline
        self.facts = {}

    def copies(self):
        """{"docxy": copy of --docxy, "baseline": copy of --baseline-docxy}."""
        main_path = os.path.abspath(self.docxy)
        if not os.path.isfile(main_path):
            raise SystemExit("bench: docxy not found at %s (use --docxy PATH)" % main_path)
        top = git(["rev-parse", "--show-toplevel"], os.path.dirname(main_path))
        name = os.path.relpath(os.path.realpath(main_path), os.path.realpath(top)) \
            if top else "docxy.py"
        scripts = {"docxy": self.copy(main_path, "docxy.py", "docxy", top, name)}
        old = self.baseline
        if old and os.path.isfile(old):
            scripts["baseline"] = self.copy(os.path.abspath(old), "docxy-before.py",
                                            "baseline_docxy", top, name)
        elif old:       # a git revision: its docxy.py
            scripts["baseline"] = self.from_git(old, top, name)
        return scripts

    def from_git(self, revision, top, name):
        path = os.path.join(self.work, "docxy-before.py")
        commit = git(["rev-parse", "--verify", revision + "^{commit}"], top or ".")
        body = commit and subprocess.run(["git", "show", "%s:%s" % (commit, name)],
                                         cwd=top, stdout=subprocess.PIPE).stdout
        if not body:
            raise SystemExit("bench: --baseline-docxy %s is neither a file nor a git "
                             "revision with %s" % (revision, name))
        with open(path, "wb") as handle:
            handle.write(body)
        self.facts["baseline_docxy"] = self.describe(
            path, "git show %s:%s" % (revision, name), {"content_of": commit})
        return path

    def copy(self, source, name, fact, top, name_in_git):
        path = os.path.join(self.work, name)
        shutil.copyfile(source, path)
        self.facts[fact] = self.describe(path, source, git_facts(source, top, name_in_git))
        return path

    @staticmethod
    def describe(path, source, git_info):
        return {"path": shown_path(source), "sha256": file_sha256(path),
                "version": tool_version([sys.executable, path, "--version"]), "git": git_info}


class Session:
    """One measuring run: the files under test, copied into a work directory (they cannot
    change between rounds), the lab, the rounds, and the document they make."""

    def __init__(self, args):
        self.args = args
        self.sizes = dict(QUICK if args.quick else FULL)
        if args.cell:
            self.sizes["cell"] = args.cell
        self.results, self.events, self.facts = Results(), [], {}
        self.work = tempfile.mkdtemp(prefix="docxy-bench-")
        os.chmod(self.work, 0o755)
        say("working in %s" % self.work)

    def prepare(self):
        self.started = time.time()
        self.load_start = os.getloadavg()
        files = FilesUnderTest(self.work, self.args.docxy, self.args.baseline_docxy)
        scripts = files.copies()
        self.facts.update(files.facts)
        self.data = make_data(os.path.join(self.work, "data"), self.sizes)
        wanted = set(TARGET)
        if self.args.targets:
            wanted = set(self.args.targets) | {"direct", "sha256"}
            wanted |= {s["name"] for s in TARGETS if s.get("twin") in wanted}
        self.lab = Lab(self.work, self.data, scripts, wanted)
        self.lab.start()
        self.use_wrk = bool(shutil.which("wrk")) and not self.args.quick
        if not shutil.which("wrk"):
            say("wrk not installed: manifest GETs use the stdlib client")
        self.writes = write_speed(self.work, (64 if self.args.quick else 256) * MiB)

    def run(self):
        runner = Runner(self.lab, self.results, self.sizes, self.args.quick, self.use_wrk)
        measures = [MEASURE_CLASSES[name](runner) for name in self.args.measures]
        began = time.monotonic()
        for rnd in range(1, self.args.rounds + 1):
            for measure in measures:
                spec = MEASURES[measure.name]
                say("round %d/%d: %d. %s" % (rnd, self.args.rounds, spec["number"],
                                             spec["title"]))
                start = time.monotonic()
                measure.run(rnd)
                say("  (%s took %.0f s)" % (measure.name, time.monotonic() - start))
                self.lab.revive(self.events, rnd)
            say("round %d done after %.0f s" % (rnd, time.monotonic() - began))
        self.seconds = time.monotonic() - began

    def host(self):
        tools = {"nginx": ["nginx", "-v"], "docker-registry": ["docker-registry", "--version"],
                 "wrk": ["wrk", "--version"], "openssl": ["openssl", "version"],
                 "haproxy": ["haproxy", "-v"]}
        facts = {
            "date": datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc)
            .strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpu_model": cpu_model(), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "memory_gib": memory_gib(),
            "os": os_release(), "kernel": "%s %s" % (platform.system(), platform.release()),
            "python": "%s %s" % (platform.python_implementation(), platform.python_version()),
            "tools": {name: tool_version(argv) for name, argv in tools.items()},
            "direct": self.lab.direct.kind, "file_writes_mib_s": round(self.writes),
            "load_average_start": [round(x, 2) for x in self.load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "bench": {"sha256": file_sha256(os.path.abspath(__file__)), "git": git_facts(
                os.path.abspath(__file__), git(["rev-parse", "--show-toplevel"], HERE),
                "bench/bench.py")},
        }
        facts.update(self.facts)
        return facts

    def document(self, argv):
        sizes = dict(self.sizes, layers=list(self.sizes["layers"]),
                     conns=list(self.sizes["conns"]))
        targets = []
        for spec in TARGETS:
            row = dict(spec)
            row.pop("measures", None)
            if spec["name"] in self.lab.targets:
                row["status"] = "measured"
            else:
                row["status"], row["reason"] = "skipped", self.lab.skipped.get(spec["name"])
            targets.append(row)
        return {
            "schema": SCHEMA,
            "run": {"mode": "quick" if self.args.quick else "full", "rounds": self.args.rounds,
                    "measures": self.args.measures, "sizes": sizes,
                    "command": " ".join(["python3", "bench/bench.py"] + argv),
                    "seconds": round(self.seconds), "events": self.events,
                    "manifest_get_client": "wrk -t 2 --latency, with a Lua script"
                    if self.use_wrk else "the same stdlib client (%s)" % (
                        "--quick: cells shorter than wrk's 1 s" if shutil.which("wrk")
                        else "wrk not installed")},
            "host": self.host(),
            "targets": targets,
            "cells": self.results.cells,
            "notes": self.results.notes,
            "server_logs": log_summary(self.lab.servers),
        }

    def close(self):
        PROCESSES.stop_all()
        if self.args.keep:
            say("work directory kept: %s" % self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def log_summary(servers):
    """What the servers complained about: the lines a reader should look at."""
    out = []
    patterns = re.compile(r"transfer aborted|internal error|upstream error|Traceback|"
                          r"cache paused|\[error\]|\[crit\]|\[alert\]|\[emerg\]|level=error|"
                          r"level=fatal|panic|\[ALERT\]|\[WARNING\]")
    # HAProxy's httplog line: its status and termination state. A normal session ends with
    # "----"; any other state (a node that refused, reset or timed out, a client that left
    # early) or an answer that is not 2xx/3xx is worth a look.
    haproxy_line = re.compile(r"\] \S+ \S+/\S+ [-+\d/]+ (-?\d+) [-+\d]+ \S+ \S+ (\S{4}) ")
    for path in sorted({path for server in servers for path in server.logs()}):
        if not os.path.exists(path):
            continue
        counts, examples = {}, {}
        with open(path, "rb") as handle:
            for raw in handle:
                line = raw.decode("utf-8", "replace").rstrip()
                match = patterns.search(line)
                answer = None if match else haproxy_line.search(line)
                if answer and (answer.group(1)[0] not in "23" or answer.group(2) != "----"):
                    key = "HAProxy status %s, termination state %s" % answer.groups()
                elif match:
                    key = match.group(0)
                else:
                    continue
                if key == "transfer aborted":   # one group per reason, digests left out
                    rest = line.split("transfer aborted", 1)[1]
                    key = "transfer aborted" + re.sub(r"sha256:[0-9a-f]+", "<digest>", rest)[:70]
                counts[key] = counts.get(key, 0) + 1
                examples.setdefault(key, line[:240])
        name = os.path.basename(path)
        for key, n in sorted(counts.items()):
            out.append("%s: %d × '%s', e.g. %s" % (name, n, key, examples[key]))
    if any("EOF occurred in violation of protocol" in line for line in out):
        out.append("(EOF in violation of protocol: a client closed a TLS connection with an "
                   "answer in flight; the load clients do that when a cell ends. Over plain "
                   "HTTP docxy does not log the same event)")
    return out


# ================================================================== the report

def case_key(case):
    if case in CASES:
        return (0, CASES.index(case), 0)
    method, _, conns = case.partition(" c=")
    return (1, 0 if method == "HEAD" else 1, int(conns) if conns.isdigit() else 0)


def goal_text(goal, unit):
    operator, bound = goal
    sign = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}[operator]
    return "%s %s%s" % (sign, bound, "×" if unit == "×" else " " + unit)


class Report:
    """A results document (the --json layout) as tables: the headline ratios and goals,
    one table per measure, the targets, the host. Text and markdown render the same tables.
    Cells, targets and host facts come from the document; what the tables show (HEADLINES,
    MEASURES, FIGURES) comes from this file."""

    def __init__(self, doc):
        if doc.get("schema") != SCHEMA:
            raise SystemExit("bench: results of schema %r; this bench reads schema %d"
                             % (doc.get("schema"), SCHEMA))
        self.doc, self.run, self.host = doc, doc["run"], doc["host"]
        self.results = Results(doc["cells"], doc["notes"])
        self.specs = {t["name"]: t for t in doc["targets"]}
        self.order = [t["name"] for t in doc["targets"]]
        measured = {c["target"] for c in doc["cells"]}
        # new target -> its baseline twin, for the twins that were measured
        self.before = {t["twin"]: t["name"] for t in doc["targets"]
                       if t.get("twin") and t["name"] in measured}
        self.cases = {}
        for cell in doc["cells"]:
            found = self.cases.setdefault((cell["measure"], cell["target"]), [])
            if cell["case"] not in found:
                found.append(cell["case"])
        for found in self.cases.values():
            found.sort(key=case_key)
        self.headlines, self.tables, self.facts = Headlines(self), MeasureTables(self), \
            Facts(self)

    @property
    def quick(self):
        return self.run["mode"] == "quick"

    def label(self, measure, target, case):
        if case == MEASURES[measure]["default_case"]:
            return target
        return "%s (%s)" % (target, case)

    def reference(self, ref, target):
        if ref == "nginx":
            return "nginx-https" if self.specs.get(target, {}).get("tls") else "nginx"
        if ref == "before":
            return self.before.get(target)
        return ref

    def ref_case(self, measure, ref, case):
        """The reference's own case: the same, or its first (get, miss, cold, pull)."""
        cases = self.cases.get((measure, ref), [])
        return case if case in cases else (cases[0] if cases else None)

    def series_pair(self, measure, figure, target, case, ref):
        """(target's {round: figure}, ref's), or None when there is no such ref."""
        if not ref or ref == target:
            return None
        ref_case = self.ref_case(measure, ref, case)
        if ref_case is None:
            return None
        return (self.results.series(measure, target, case, figure),
                self.results.series(measure, ref, ref_case, figure))

    def ratio(self, measure, figure, target, case, ref):
        """{round: target's figure / ref's figure}, or None when there is no such ref."""
        pair = self.series_pair(measure, figure, target, case, ref)
        return pair and per_round_ratio(*pair)

    def case_ratio(self, measure, figure, target, case, ref_case):
        """{round: target's figure in `case` / its own figure in `ref_case`}, or None when
        that is the same case or the target has no such case."""
        if case == ref_case or ref_case not in self.cases.get((measure, target), []):
            return None
        return per_round_ratio(self.results.series(measure, target, case, figure),
                               self.results.series(measure, target, ref_case, figure))

    def difference(self, measure, figure, target, case, ref, per=1):
        """{round: (target's figure - ref's figure) / per}, or None when there is no ref."""
        pair = self.series_pair(measure, figure, target, case, ref)
        return pair and per_round_difference(*pair, per)

    def position(self, target):
        return self.order.index(target) if target in self.order else len(self.order)


class Headlines:
    """The headline ratios and the goals that are figures (HEADLINES) of one report, each
    with the --baseline-docxy twin's value and new / before where there is one."""

    def __init__(self, report):
        self.report = report

    def rows(self, ratios):
        """Rows of the headline table (ratios=True) or the figure goals (ratios=False):
        (what, value, goal, met, better, before, new / before)."""
        rows = []
        for line in HEADLINES:
            if bool(line.get("versus") or line.get("versus_case")) != ratios:
                continue
            measure, target, figure = line["measure"], line["target"], line["figure"]
            if measure not in self.report.run["measures"]:
                continue
            case = line.get("case") or MEASURES[measure]["default_case"]
            unit, digits, _, better = FIGURES[figure]
            value = self.value(line, target, case)
            before = self.report.before.get(target)
            text = summary(value, 2 if ratios else digits, "×" if ratios else " " + unit)
            goal, met = "", ""
            if line.get("goal"):
                goal = goal_text(line["goal"], "×" if ratios else unit)
                m = median(value)
                met = "–" if m is None else ("yes" if meets(m, line["goal"]) else "no")
                if line.get("stretch") and m is not None:
                    goal += " (stretch %s)" % goal_text(line["stretch"], "×")
                    met += " (stretch: %s)" % ("yes" if meets(m, line["stretch"]) else "no")
            row = [line["what"], text, goal, met, {"higher": "higher", "lower": "lower"}.get(
                better, "")]
            if self.report.before:
                old = self.value(line, before, case) if before else None
                row.append(summary(old, 2 if ratios else digits, "×" if ratios else " " + unit)
                           if old is not None else "")
                new_old = self.report.ratio(measure, figure, target, case, before)
                row.append(summary(new_old, 2, "×") if before else "")
            rows.append(row)
        return rows

    def value(self, line, target, case):
        if line.get("versus_case"):
            return self.report.case_ratio(line["measure"], line["figure"], target, case,
                                          line["versus_case"])
        if line.get("versus"):
            return self.report.ratio(line["measure"], line["figure"], target, case, line["versus"])
        if line.get("minus"):
            return self.report.difference(line["measure"], line["figure"], target, case,
                                          line["minus"], line.get("per", 1))
        return self.report.results.series(line["measure"], target, case, line["figure"])

    def headers(self, ratios):
        headers = ["What", "Ratio" if ratios else "Figure", "Goal", "Met", "Better"]
        if self.report.before:
            headers += ["Before (--baseline-docxy)", "New ÷ before"]
        return headers


class MeasureTables:
    """One table per measure of one report: its rows and columns (MEASURES), footnotes, and
    the failures noted while it ran."""

    def __init__(self, report):
        self.report = report

    def sizes_text(self):
        sizes = self.report.run["sizes"]
        return dict(big_mib=sizes["big"] // MiB, mid_mib=sizes["mid"] // MiB,
                    streams=sizes["streams"], cell="%g" % sizes["cell"], idle=sizes["idle"],
                    layer_count=len(sizes["layers"]),
                    layers_mib="+".join(str(x) for x in sizes["layers"]),
                    get_client=self.report.run.get("manifest_get_client", "?"),
                    resume_mib=sizes.get("resume", 0) // MiB,
                    drop_mib=sizes.get("resume_drop", 0) // MiB)

    def columns(self, measure):
        spec = MEASURES[measure]
        rows = self.report.results.rows(measure)
        present = {target for target, _ in rows}
        columns = []
        for column in spec["columns"]:
            ref = column[2:] if column.startswith("x:") else None
            if ref in CASES:
                if any(case == ref for _, case in rows):
                    columns.append(column)
                continue
            if ref == "before" and not self.report.before:
                continue
            if ref and ref not in ("nginx", "before") and ref not in present:
                continue
            if ref == "nginx" and not present & {"nginx", "nginx-https"}:
                continue
            columns.append(column)
        return columns

    def table(self, measure):
        """(headers, rows, footnotes) of one measure."""
        spec = MEASURES[measure]
        rows = sorted(self.report.results.rows(measure), key=lambda row: (
            (case_key(row[1]), self.report.position(row[0])) if spec["group"] == "case"
            else (self.report.position(row[0]), case_key(row[1]))))
        columns = self.columns(measure)
        headers = ["case"] if spec["group"] == "case" else []
        headers += ["target"]
        for column in columns:
            headers.append("× " + column[2:] if column.startswith("x:") else FIGURES[column][2])
        body = []
        for target, case in rows:
            line = [case, target] if spec["group"] == "case" else [
                self.report.label(measure, target, case)]
            for column in columns:
                if column[2:] in CASES:
                    values = self.report.case_ratio(measure, spec["main"], target, case,
                                                    column[2:])
                    line.append("" if values is None else summary(values, 2, "×"))
                elif column.startswith("x:"):
                    ref = self.report.reference(column[2:], target)
                    values = self.report.ratio(measure, spec["main"], target, case, ref)
                    line.append("" if values is None else summary(values, 2, "×"))
                else:
                    line.append(summary(self.report.results.series(measure, target, case, column),
                                        FIGURES[column][1]))
            body.append(line)
        footnotes = []
        if "x:nginx" in columns and any(self.report.specs.get(t, {}).get("tls") for t, _ in rows):
            footnotes.append("× nginx: rows over HTTPS against nginx-https.")
        if "x:registry" in columns:
            footnotes.append("× registry: against the registry's row of the same case, or its "
                             "miss (cold) where it has no such case.")
        if "x:before" in columns:
            footnotes.append("× before: against the same target run from --baseline-docxy.")
        for column in columns:
            if column[2:] in CASES:
                footnotes.append("× %s: against the same target's %s row, in the same round."
                                 % (column[2:], column[2:]))
        return headers, body, footnotes

    def failures(self, measure):
        label = self.report.label
        return ["%s, round %s: %s" % (label(measure, n["target"], n["case"]), n["round"], n["text"])
                for n in sorted(self.report.results.notes_for(measure),
                                key=lambda n: (self.report.position(n["target"]), n["round"]))]


class Facts:
    """The words around the tables of one report: the targets as run, the files under test,
    the host, and how the run was made."""

    def __init__(self, report):
        self.report = report

    def target_rows(self):
        return [[t["name"], t["about"], "measured" if t["status"] == "measured"
                 else "skipped: %s" % t.get("reason")] for t in self.report.doc["targets"]]

    def docxy_text(self, key):
        facts = self.report.host.get(key)
        if not facts:
            return None
        text = "%s, sha256 %s…" % (facts["path"], facts["sha256"][:16])
        info = facts.get("git") or {}
        if info.get("content_of"):
            text += ", the content of git commit %s" % info["content_of"][:12]
        elif info.get("head"):
            last = (info.get("last_change") or "?")[:12]
            text += ", git HEAD %s" % info["head"][:12]
            if last != info["head"][:12]:
                text += " (the file last changed in %s)" % last
            if info.get("modified"):
                text += ", with changes not committed"
        return "%s (%s)" % (facts.get("version", "?"), text)

    def host_rows(self):
        host = self.report.host
        rows = [("date", host["date"]),
                ("cpu", "%s × %s (%s usable)" % (host["cores"], host["cpu_model"],
                                                 host["usable_cores"])),
                ("memory", "%s GiB" % host["memory_gib"]), ("os", host["os"]),
                ("kernel", host["kernel"]), ("python", host["python"]),
                ("docxy", self.docxy_text("docxy"))]
        if host.get("baseline_docxy"):
            rows.append(("baseline docxy", self.docxy_text("baseline_docxy")))
        for name, version in sorted(host["tools"].items()):
            rows.append((name, version))
        rows += [("direct", host["direct"]),
                 ("file writes", "%s MiB/s (1 MiB os.write calls to the work directory, no "
                                 "fsync)" % host["file_writes_mib_s"]),
                 ("load average", "%s at start, %s at end; the run took %s s" % (
                     " ".join("%.2f" % x for x in host["load_average_start"]),
                     " ".join("%.2f" % x for x in host["load_average_end"]),
                     self.report.run["seconds"])),
                 ("bench.py", "sha256 %s…%s" % (host["bench"]["sha256"][:16], (
                     ", git HEAD %s" % host["bench"]["git"]["head"][:12]
                     if (host["bench"].get("git") or {}).get("head") else "")))]
        return rows

    def method_text(self):
        rounds = self.report.run["rounds"]
        return ("A %s run of %d round%s: the targets are measured interleaved, round by round, "
                "so that drift on a shared machine hits all of them alike. Every figure is the "
                "median [min–max] over the rounds; every ratio is computed within each round, "
                "then summarised the same way." % (self.report.run["mode"], rounds,
                                                   "" if rounds == 1 else "s"))


def text_table(headers, rows):
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    lines = ["  " + "  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  " + "  ".join("-" * w for w in widths)]
    for row in rows:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def markdown_table(headers, rows):
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines)


def render_text(report):
    """The report on a terminal: every table, without the explanations."""
    out = ["docxy benchmark: " + report.facts.method_text(), ""]
    for ratios, title in ((True, "headline ratios"), (False, "goals that are figures")):
        rows = report.headlines.rows(ratios)
        if rows:
            out += [title, text_table(report.headlines.headers(ratios), rows), ""]
    for measure in report.run["measures"]:
        spec = MEASURES[measure]
        headers, rows, footnotes = report.tables.table(measure)
        out.append("%d. %s: %s" % (spec["number"], spec["title"],
                                   spec["setup"].format(**report.tables.sizes_text())))
        out.append(text_table(headers, rows))
        out += ["  " + line for line in footnotes]
        out += ["  note: " + line for line in report.tables.failures(measure)]
        out.append("")
    out += ["  event: " + event for event in report.run["events"]]
    out += ["targets", text_table(("target", "status"), [
        (row[0], row[2]) for row in report.facts.target_rows()]), ""]
    out += ["host", "\n".join("  %-16s %s" % row for row in report.facts.host_rows())]
    if report.doc["server_logs"]:
        out += ["", "server logs: lines worth a look"]
        out += ["  " + line for line in report.doc["server_logs"]]
    return "\n".join(out)


def headline_markdown(report):
    """The headline ratios table alone (also what --readme puts into the README)."""
    return markdown_table(report.headlines.headers(True), report.headlines.rows(True))


def render_markdown(report, source):
    """bench/RESULTS.md: headline ratios, full tables with what they mean, how to reproduce,
    the host."""
    run, host, sizes = report.run, report.host, report.tables.sizes_text()
    out = ["# docxy benchmark results", "",
           "<!-- Generated by bench/bench.py --markdown from %s. Do not edit: change "
           "bench/bench.py (its TARGETS, MEASURES and HEADLINES tables) and render again. -->"
           % source, ""]
    if report.quick:
        out += ["> **This is a `--quick` run**: small blobs (%s MiB), %s s manifest cells and "
                "%s idle connections. It shows that the benchmark works and roughly where "
                "things stand; run it in full for figures worth quoting (see [How to "
                "reproduce](#how-to-reproduce))." % (sizes["big_mib"], sizes["cell"],
                                                     sizes["idle"]), ""]
    out += ["Measured on %s with %s, on %s cores (%s), Python %s.\n\n%s" % (
        host["date"][:10], report.facts.docxy_text("docxy"), host["cores"], host["cpu_model"],
        host["python"].split()[-1], report.facts.method_text()), "",
        "Client, upstream and server share this machine's cores, so every absolute figure is "
        "lower than on a server whose clients are elsewhere, and figures vary between runs on "
        "a shared machine. Compare the ratios of one run, not figures across runs.", ""]
    out += ["## Headline ratios", "",
            "Each ratio is the first target's figure divided by the second's, in the same "
            "round. Goals are those issues 6 and 13 set; a row without a goal is reported, "
            "not judged. \"Better\" says which way is better for the figure compared."]
    if report.before:
        out[-1] += (" \"Before\" is the same ratio for the docxy given with "
                    "`--baseline-docxy`; \"new ÷ before\" divides the two docxy's own figures, "
                    "round by round.")
    out += ["", headline_markdown(report), ""]
    rows = report.headlines.rows(False)
    if rows:
        out += ["### Goals that are figures", "",
                "Absolute figures: they depend on this machine more than the ratios do.", "",
                markdown_table(report.headlines.headers(False), rows), ""]
    out += ["## Full tables", "", "### Targets", "",
            markdown_table(("Target", "What it is", "This run"), report.facts.target_rows()), ""]
    for measure in run["measures"]:
        spec = MEASURES[measure]
        headers, rows, footnotes = report.tables.table(measure)
        out += ["### %d. %s" % (spec["number"], spec["title"]), "",
                spec["setup"].format(**sizes), "", markdown_table(headers, rows), ""]
        if footnotes:
            out += [" ".join(footnotes), ""]
        for paragraph in spec["about"]:
            out += [paragraph, ""]
        failures = report.tables.failures(measure)
        if failures:
            out += ["Notes from this run:", ""] + ["- " + line for line in failures] + [""]
    if run["events"]:
        out += ["Events: " + "; ".join(run["events"]), ""]
    if report.doc["server_logs"]:
        out += ["### Server logs", "", "Lines worth a look in the servers' logs:", "", "```"]
        out += report.doc["server_logs"] + ["```", ""]
    out += ["## How to reproduce", "",
            "This file came from:", "", "```sh", run["command"], "```", "",
            "```sh",
            "python3 bench/bench.py --json bench/results.json --markdown --readme README.md",
            "# the full run behind this file and README.md's table: about 10 minutes on 2 cores",
            "python3 bench/bench.py --quick --json /tmp/quick.json --markdown /tmp/RESULTS.md",
            "python3 bench/bench.py --markdown --from bench/results.json   "
            "# render this file again, measure nothing",
            "python3 bench/bench.py --only manifest --targets docxy,registry   "
            "# one measure, some targets",
            "git show 677662d:docxy.py > /tmp/docxy-before.py",
            "python3 bench/bench.py --baseline-docxy /tmp/docxy-before.py --json /tmp/ab.json "
            "--markdown /tmp/AB.md",
            "```", "",
            "Everything runs on loopback and is started by the benchmark, in a temporary "
            "directory, on free ports, and stopped at the end. It needs Python 3.8+ and uses "
            "nginx, docker-registry (CNCF distribution), wrk, openssl and haproxy where they "
            "are installed (Debian: `apt install nginx docker-registry wrk openssl haproxy`); "
            "a target "
            "whose tool is missing is reported as skipped, never faked. `--baseline-docxy "
            "PATH` (a file, or a git revision whose docxy.py to use) adds the `docxy-before` "
            "targets, measured in the same rounds. `--keep` keeps the work directory with the "
            "servers' logs. `--json FILE` keeps every cell (measure, target, case, figure, "
            "unit, round, value) and the host facts below. The benchmark is not part of CI.",
            "", "## Host", "", markdown_table(("", ""), report.facts.host_rows()), ""]
    return "\n".join(out)


README_START = "<!-- bench:headline:start -->"
README_END = "<!-- bench:headline:end -->"


def update_readme(path, report, source):
    """Put the headline table between the README's two markers."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit("bench: %s has no %s ... %s block" % (path, README_START, README_END))
    run, host = report.run, report.host
    block = ("%s\n<!-- written by bench/bench.py --readme from %s -->\n\nA %s run of %s, %d "
             "rounds on %s cores (%s):\n\n%s\n\n" % (
                 README_START, source, "`--quick`" if report.quick else "full",
                 host["date"][:10], run["rounds"], host["cores"], host["cpu_model"],
                 headline_markdown(report)))
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text[:start] + block + text[end:])


# ================================================================== command line

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark docxy against nginx and the distribution registry, on loopback; "
                    "starts and stops everything itself.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~1.5 min): small blobs, 0.2 s cells, 100 idle "
                             "connections")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, each measuring every target once (default 3)")
    parser.add_argument("--only", default="", metavar="a,b",
                        help="measures to run: %s (or 1-%d); default all"
                             % (",".join(MEASURE_ORDER), len(MEASURE_ORDER)))
    parser.add_argument("--targets", default="", metavar="a,b",
                        help="targets to start: %s; default all (direct always runs, and a "
                             "docxy target brings its --baseline-docxy twin)"
                             % ",".join(TARGET))
    parser.add_argument("--docxy", default=os.path.join(HERE, "..", "docxy.py"),
                        metavar="PATH", help="docxy.py to measure (default ../docxy.py)")
    parser.add_argument("--baseline-docxy", metavar="PATH",
                        help="an older docxy.py (or a git revision: its docxy.py), measured "
                             "as the docxy-before targets in the same rounds")
    parser.add_argument("--cell", type=float, default=0, metavar="SECONDS",
                        help="seconds per manifest cell (default 3; 0.2 with --quick)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (data, configurations, logs)")
    parser.add_argument("--json", metavar="FILE",
                        help="write every cell and the host facts to FILE")
    parser.add_argument("--markdown", nargs="?", const=RESULTS_MD, metavar="FILE",
                        help="write the results as markdown (default bench/RESULTS.md)")
    parser.add_argument("--from", dest="source", metavar="FILE",
                        help="measure nothing: report on a --json FILE of an earlier run")
    parser.add_argument("--readme", metavar="FILE",
                        help="also put the headline table into FILE (README.md) between its "
                             "bench:headline markers")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.source and args.json:
        parser.error("--json writes the cells of a run; with --from there is no run")
    measures = []
    for item in filter(None, (x.strip() for x in args.only.split(","))):
        if item.isdigit() and 1 <= int(item) <= len(MEASURE_ORDER):
            item = MEASURE_ORDER[int(item) - 1]
        if item not in MEASURES:
            parser.error("unknown measure %r (choose from %s)"
                         % (item, ", ".join(MEASURE_ORDER)))
        measures.append(item)
    args.measures = [m for m in MEASURE_ORDER if m in measures] if measures \
        else list(MEASURE_ORDER)
    args.targets = [x.strip() for x in args.targets.split(",") if x.strip()]
    for item in args.targets:
        if item not in TARGET:
            parser.error("unknown target %r (choose from %s)" % (item, ", ".join(TARGET)))
    return args


def write_document(doc, handle):
    """The results as JSON, one cell (or note) per line: diffs of two runs stay readable."""
    handle.write("{\n")
    for number, (key, value) in enumerate(doc.items()):
        comma = "," if number < len(doc) - 1 else ""
        if isinstance(value, list) and value:
            items = ",\n".join("  " + json.dumps(item, ensure_ascii=False) for item in value)
            handle.write(' "%s": [\n%s\n ]%s\n' % (key, items, comma))
        else:
            text = json.dumps(value, ensure_ascii=False, indent=1).replace("\n", "\n ")
            handle.write(' "%s": %s%s\n' % (key, text, comma))
    handle.write("}\n")


def measure(args, argv):
    """A run: the results document, or None when interrupted."""
    def interrupted(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started ignoring it
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    session = Session(args)
    try:
        session.prepare()
        session.run()
        return session.document(argv)
    except KeyboardInterrupt:
        say("interrupted: stopping everything this run started")
        return None
    finally:
        session.close()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_get", "_pull", "_load", "_fetch"):
        spec = json.loads(argv[1])
        result = {"_get": client_get, "_pull": client_pull, "_load": client_load,
                  "_fetch": client_fetch}[argv[0]](spec)
        print(json.dumps(result))
        return 0
    if argv and argv[0] == "_direct":
        direct_server(argv[1], int(argv[2]), argv[3], argv[4])
        return 0
    if argv and argv[0] == "_upstream":
        resume_upstream(json.loads(argv[1]))
        return 0
    args = parse_args(argv)
    try:
        sys.stdout.reconfigure(errors="replace")
    except AttributeError:
        pass
    if args.source:
        with open(args.source, encoding="utf-8") as handle:
            doc = json.load(handle)
        source = shown_path(args.source)
    else:
        doc = measure(args, argv)
        if doc is None:
            return 130
        source = shown_path(args.json) if args.json else "a run not kept as JSON"
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            write_document(doc, handle)
        say("wrote %s (%d cells)" % (args.json, len(doc["cells"])))
    report = Report(doc)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(render_markdown(report, source))
        say("wrote %s" % args.markdown)
    if args.readme:
        update_readme(args.readme, report, source)
        say("wrote the headline table into %s" % args.readme)
    if not args.source or not (args.markdown or args.readme):
        print(render_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
