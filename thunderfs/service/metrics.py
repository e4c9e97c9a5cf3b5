"""Prometheus metrics of one daemon: ``GET http://<metrics-listen>/metrics``.

Counters and gauges are read from the daemon's own statistics at scrape time, in the trio thread
(prometheus-client serves from a thread of its own; the statistics belong to trio's).  Fetch
latencies are histograms observed as chunks arrive.  Bytes the kernel serves from its page cache
never reach the daemon: ``thunderfs_read_bytes_total`` counts what did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import trio
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from thunderfs.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES = {"peers": "peer", "seed": "tracker_seed", "origin": "glance"}
# Seconds to fetch a run of chunks: a LAN peer answers in milliseconds, Glance in tens of them,
# a crowd or a retry in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60)


class DaemonMetrics:
    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats
        self._token: trio.lowlevel.TrioToken | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self._fetch_seconds = Histogram("thunderfs_fetch_seconds", "Seconds to fetch a run of chunks, by source",
                                        ["source"], buckets=BUCKETS, registry=self.registry)
        self.registry.register(_StatsCollector(self._snapshot))

    def observe(self, source: str, seconds: float) -> None:
        """The fetcher's hook: a run of chunks from ``source`` ("peers", "origin") took ``seconds``."""
        self._fetch_seconds.labels(source=SOURCES.get(source, source)).observe(seconds)

    def _snapshot(self) -> dict:
        if self._token is None:
            return {}
        return trio.from_thread.run_sync(self._stats, trio_token=self._token)

    def start(self, host: str, port: int) -> None:
        """Serve from now on (called in the trio thread; a busy port is a clean start-up error)."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        log.info("metrics on http://%s:%d/metrics", host, port)

    def stop(self) -> None:
        self._token = None
        self._server.shutdown()
        self._thread.join(5)


class _StatsCollector:
    def __init__(self, snapshot: Callable[[], dict]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        if not s:
            return
        cache, fetch, fs, glance = s["cache"], s["fetch"], s["fs"], s["glance"]

        def counter(name: str, doc: str, value: float, **labels) -> CounterMetricFamily:
            m = CounterMetricFamily(name, doc, labels=list(labels))
            m.add_metric(list(labels.values()), value)
            return m

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield counter("thunderfs_read_bytes", "Bytes read through the mount (past the kernel's page cache)",
                      fs["read_request_bytes"])
        yield counter("thunderfs_read_requests", "Read requests the kernel sent", fs["read_requests"])
        served = CounterMetricFamily("thunderfs_served_bytes", "Bytes served to readers, by where they came from",
                                     labels=["source"])
        served.add_metric(["local_cache"], cache["bytes_read_disk"])
        served.add_metric(["uncached"], cache["bytes_read_memory"])
        served.add_metric(["another_images_copy"], cache.get("bytes_read_shared", 0))
        yield served
        # Issue 31: per image, bytes neither fetched nor stored for it: chunks another cached
        # image holds (shared), and zero chunks.
        saved = GaugeMetricFamily("thunderfs_image_saved_bytes", "Bytes of an image neither fetched nor stored "
                                  "for it: held by another cached image's chunks of the same digest (shared), "
                                  "or zero chunks", labels=["image", "kind"])
        for im in s.get("per_image", []):
            for kind in ("shared", "zero"):
                if im.get(f"{kind}_bytes"):
                    saved.add_metric([im["id"], kind], im[f"{kind}_bytes"])
        yield saved
        fetched = CounterMetricFamily("thunderfs_fetched_bytes", "Bytes fetched into the cache, by source",
                                      labels=["source"])
        for source, label in SOURCES.items():  # a node with no tracker has no peer source: 0
            fetched.add_metric([label], fetch.get(f"bytes_from_{source}", 0))
        yield fetched
        yield gauge("thunderfs_cache_used_bytes", "Bytes of chunks in the cache", cache["used"])
        yield gauge("thunderfs_cache_capacity_bytes", "The cache's bound", cache["capacity"])
        yield counter("thunderfs_cache_evictions", "Chunks evicted to make room", cache["evictions"])
        yield counter("thunderfs_demand_waits", "Reads that had to wait for a fetch", fetch["demand_waits"])
        yield gauge("thunderfs_images", "Active images in Glance's listing", s["images"])
        yield gauge("thunderfs_glance_reachable", "1 if Glance answered the last listing", 1 if glance["reachable"] else 0)
        prefetch = CounterMetricFamily("thunderfs_prefetch_chunks", "Chunks prefetched along boot profiles, "
                                       "and of them read later (hit) or not yet (waste)", labels=["outcome"])
        acts = list(s.get("profiles", {}).values())
        for outcome, key in (("prefetched", "prefetched"), ("hit", "hits"), ("waste", "waste")):
            prefetch.add_metric([outcome], sum(a[key] for a in acts))
        yield prefetch
        errors = CounterMetricFamily("thunderfs_errors", "Errors by kind", labels=["kind"])
        errors.add_metric(["glance"], glance["errors"])
        errors.add_metric(["fetch_failed"], fetch["failures"])
        errors.add_metric(["cache_corrupt"], cache["corrupt_dropped"])
        errors.add_metric(["cache_full"], cache["disk_full_events"])
        errors.add_metric(["cache_commit"], cache["commit_failures"])
        if "peers" in s:
            p, up, ann = s["peers"], s["peer_server"], s["announcer"]
            for kind, key in (("peer_failed", "failures"), ("peer_slow", "slow"), ("peer_bad_chunk", "bad_chunks"),
                              ("tracker_lookup", "lookup_failures"), ("tracker_claim", "claim_failures")):
                errors.add_metric([kind], p[key])
            errors.add_metric(["tracker_announce"], ann["failures"])
            errors.add_metric(["tracker_answer_refused"], ann["tracker_answers_refused"])
            yield counter("thunderfs_uploaded_bytes", "Bytes sent to other nodes", up["served_bytes"])
            yield counter("thunderfs_uploaded_chunks", "Chunks sent to other nodes", up["served_chunks"])
            refused = CounterMetricFamily("thunderfs_upload_refusals", "Chunk requests from other nodes not "
                                          "served, by reason", labels=["reason"])
            for reason in ("busy", "not_held", "refused", "bad_requests"):
                refused.add_metric([reason], up[reason])
            yield refused
            yield gauge("thunderfs_uploads_in_progress", "Uploads being sent now", up["uploads_in_progress"])
            yield gauge("thunderfs_peers_avoided", "Peers avoided now (failed or lied)", len(p["avoided_peers"]))
        yield errors
