"""Prometheus metrics of the tracker: ``GET /metrics`` (outside /v1, so unsigned, like /healthz).

Request latency by route is a histogram observed by a middleware; counts (nodes, images,
lookups, claims, recordings, refusals) are read from the app's statistics at scrape time.
Each app has a registry of its own (tests run several apps in one process).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
LATENCY = web.AppKey("metrics_latency", Histogram)
COLLECTOR = web.AppKey("metrics_collector", object)
REQUESTS = web.AppKey("metrics_requests", dict)  # route -> requests that passed membership
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def install(app: web.Application, stats: Callable[[], Awaitable[dict]]) -> None:
    """Add the middleware, the collector of ``await stats()`` (taken per scrape: the peer store
    may be a network away) and the /metrics route to ``app``."""
    registry = CollectorRegistry(auto_describe=False)
    app[REGISTRY] = registry
    app[LATENCY] = Histogram("thunderfs_tracker_request_seconds", "Seconds to answer a request, by route",
                             ["route", "method"], buckets=BUCKETS, registry=registry)
    app[COLLECTOR] = _StatsCollector(stats)
    app[REQUESTS] = {}
    registry.register(app[COLLECTOR])
    app.middlewares.append(_timing)
    app.router.add_get("/metrics", _metrics)


@web.middleware
async def _timing(request: web.Request, handler):
    started = time.perf_counter()
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    counts = request.app[REQUESTS]  # by route, for /v1/stats: what the nodes cost the tracker
    counts[name] = counts.get(name, 0) + 1
    try:
        return await handler(request)
    finally:
        request.app[LATENCY].labels(route=name, method=request.method).observe(time.perf_counter() - started)


async def _metrics(request: web.Request) -> web.Response:
    collector = request.app[COLLECTOR]
    collector.latest = await collector.stats()
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _StatsCollector:
    def __init__(self, stats: Callable[[], Awaitable[dict]]):
        self.stats = stats
        self.latest: dict = {}

    def collect(self) -> Iterator[Metric]:
        s = self.latest
        yield GaugeMetricFamily("thunderfs_tracker_nodes", "Live nodes (heartbeat within the node TTL)",
                                value=s.get("nodes", 0))
        yield GaugeMetricFamily("thunderfs_tracker_images", "Image contents some node holds chunks of",
                                value=s.get("images", 0))
        requests = CounterMetricFamily("thunderfs_tracker_operations", "Operations answered, by kind",
                                       labels=["kind"])
        for kind in ("lookups", "claims", "recordings", "reports", "refused"):
            requests.add_metric([kind], s.get(kind, 0))
        yield requests
        yield CounterMetricFamily("thunderfs_tracker_lookup_seconds", "Seconds spent answering lookups",
                                  value=s.get("lookup_seconds", 0.0))
