"""Glance through an httpx MockTransport: the origin client, Glance as a source (ranges, pieces,
retries, errors) and the catalog (pages, hidden images, TTL, misses, outages)."""

from __future__ import annotations


import httpx
import pytest
import trio

from fakes import CS, Body, FakeGlance, MockHTTP, meta_of, pattern, ranged
from thunderfs.glance.catalog import Catalog
from thunderfs.errors import SourceFailed
from thunderfs_common.glance_client import GlanceError, GlanceUnavailable, ImageGone
from thunderfs.fetch.glance_source import PLACE_STEP, GlanceSource
from thunderfs_common.glance_client import GlanceClient
from thunderfs.fetch.source import Urgency, Want
from thunderfs.fetch.slots import DEMAND

DATA = pattern(600 * CS)
META = meta_of(DATA)


class ListSink:
    def __init__(self):
        self.puts: list[tuple[int, int]] = []
        self.data = {}

    def put(self, first, data, buffer=None):
        self.puts.append((first, len(data)))
        for i in range(-(-len(data) // CS)):
            self.data[first + i] = bytes(data[i * CS:(i + 1) * CS])

    def pass_on(self, chunks):
        raise AssertionError("Glance is the last source")


def origin_of(glance) -> GlanceClient:
    return GlanceClient("http://glance", transport=httpx.MockTransport(glance), request_timeout=5)


def source_of(glance, **kw) -> GlanceSource:
    return GlanceSource(origin_of(glance), http=MockHTTP(glance), chunk_size=CS, max_chunks=kw.pop("max_chunks", 512),
                        fetch_timeout=kw.pop("fetch_timeout", 5), concurrency=kw.pop("concurrency", 2), **kw)


def want(store, chunks) -> Want:
    return Want(META, store.image(META.content_key, META.size), chunks, Urgency(DEMAND))


async def test_a_run_is_one_range_request_handed_over_in_pieces_as_it_arrives(store):
    glance, sink = FakeGlance(DATA), ListSink()
    assert await source_of(glance).fetch(want(store, list(range(10, 10 + 300))), sink) == []
    assert glance.ranges == [(10 * CS, 310 * CS)]
    step = PLACE_STEP // CS
    assert all(n <= step * CS for _, n in sink.puts) and len(sink.puts) >= 300 // step
    assert b"".join(sink.data[c] for c in range(10, 310)) == DATA[10 * CS:310 * CS]


async def test_pieces_come_whole_and_in_order_from_one_pooled_buffer(store):
    """Every piece handed over but the last is exactly ``PLACE_STEP`` bytes at the right offset,
    and all are views of one pooled buffer (no allocation per piece or per response), which is
    back in the pool afterwards."""
    start, end = 3 * CS, 3 * CS + 2 * PLACE_STEP + 1234
    src = source_of(FakeGlance(DATA), concurrency=1)
    got, buffers = [], set()

    def on_piece(offset, view, buffer):
        got.append((offset, bytes(view)))
        assert view.obj is buffer.mm
        buffers.add(id(buffer))

    for _ in range(2):
        await src.read_range(META.id, start, end, on_piece)
    assert [o for o, _ in got[:3]] == [start + i * PLACE_STEP for i in range(3)]
    assert [len(d) for _, d in got[:3]] == [PLACE_STEP] * 2 + [1234]
    assert b"".join(d for _, d in got[:3]) == DATA[start:end] and len(buffers) == 1 and got[3:] == got[:3]
    stats = src.statistics()["origin_buffers"]
    assert (stats["buffers"], stats["in_use"], stats["holding"], stats["waits"]) == (1, 0, 0, 0)


async def test_runs_are_split_at_gaps_and_at_the_largest_request(store):
    glance = FakeGlance(DATA)
    await source_of(glance, max_chunks=4).fetch(want(store, [0, 1, 2, 3, 4, 5, 9]), ListSink())
    assert glance.ranges == [(0, 4 * CS), (4 * CS, 6 * CS), (9 * CS, 10 * CS)]


async def test_a_short_body_is_retried_for_what_is_still_missing(store):
    glance, sink = FakeGlance(DATA), ListSink()
    glance.faults.append(lambda req, a, b: ranged(
        206, DATA[a:a + PLACE_STEP + 100], headers={"Content-Range": f"bytes {a}-{b - 1}/{len(DATA)}"},
        length=b - a))
    chunks = list(range(0, 2 * PLACE_STEP // CS))
    await source_of(glance).fetch(want(store, chunks), sink)
    assert glance.ranges == [(0, 2 * PLACE_STEP), (PLACE_STEP, 2 * PLACE_STEP)]
    assert b"".join(sink.data[c] for c in chunks) == DATA[:2 * PLACE_STEP]


@pytest.mark.parametrize("fault", [
    lambda req, a, b: ranged(206, DATA[a:b], headers={"Content-Range": f"bytes {a + 1}-{b}/{len(DATA)}"}),
    lambda req, a, b: ranged(200, DATA),
    lambda req, a, b: httpx.Response(503),
    lambda req, a, b: ranged(206, DATA[a:b], headers={"Content-Range": f"bytes {a}-{b - 1}/{len(DATA)}"},
                             length=b - a + 1),
    lambda req, a, b: httpx.Response(206, stream=Body(DATA[a:b]),
                                     headers={"Content-Range": f"bytes {a}-{b - 1}/{len(DATA)}"}),
], ids=["wrong-content-range", "range-ignored", "503", "longer-than-asked", "no-length"])
async def test_a_wrong_answer_is_retried_and_nothing_wrong_is_handed_over(store, fault):
    glance, sink = FakeGlance(DATA), ListSink()
    glance.faults.append(fault)
    await source_of(glance).fetch(want(store, [3, 4]), sink)
    assert len(glance.ranges) == 2
    assert sink.data == {3: DATA[3 * CS:4 * CS], 4: DATA[4 * CS:5 * CS]}


async def test_an_image_glance_does_not_have_fails_at_once(store):
    glance = FakeGlance(DATA)
    glance.faults.append(lambda req, a, b: httpx.Response(404))
    with pytest.raises(SourceFailed, match="Glance has no") as info:
        await source_of(glance).fetch(want(store, [0]), ListSink())
    assert isinstance(info.value.__cause__, ImageGone) and len(glance.ranges) == 1


async def test_glance_down_is_retried_until_the_deadline_then_unavailable(store, autojump_clock):
    glance = FakeGlance(DATA)
    glance.down = True
    started = trio.current_time()
    with pytest.raises(SourceFailed, match="gave up after 5s") as info:
        await source_of(glance).fetch(want(store, [0]), ListSink())
    assert isinstance(info.value.__cause__, GlanceUnavailable)
    assert trio.current_time() - started == pytest.approx(5, abs=0.1)


async def test_once_glance_is_known_down_reads_fail_at_once_until_a_probe_finds_it_back(store, autojump_clock):
    """The first read of an outage waits its deadline; the next ones fail within a second, the
    ones already retrying stop at their next attempt; a probe in the background notices Glance is
    back, and reads go to it again at once."""
    glance = FakeGlance(DATA)
    glance.down = True
    src = source_of(glance)
    results = {}

    async def read(name, chunk):
        t = trio.current_time()
        try:
            await src.fetch(want(store, [chunk]), ListSink())
            results[name] = ("ok", trio.current_time() - t)
        except SourceFailed:
            results[name] = ("failed", trio.current_time() - t)

    async with trio.open_nursery() as nursery:
        await nursery.start(src.run)
        nursery.start_soon(read, "first", 0)
        await trio.sleep(3)
        nursery.start_soon(read, "second", 1)  # already retrying when the first gives up
        await trio.sleep(2.5)
        assert results["first"] == ("failed", pytest.approx(5, abs=0.1))
        assert results["second"] == ("failed", pytest.approx(2, abs=0.1))  # when the first gave up
        assert src.breaker.is_open
        await read("during", 2)
        assert results["during"] == ("failed", 0)  # at once, no request
        before = len(glance.ranges)
        glance.down = False  # back: the probe notices within its interval
        await trio.sleep(6)
        assert not src.breaker.is_open
        await read("after", 3)
        assert results["after"][0] == "ok" and len(glance.ranges) == before + 1
        stats = src.statistics()["origin_breaker"]
        assert stats["opened"] == 1 and stats["failed_fast"] == 1 and stats["probes"] >= 1
        nursery.cancel_scope.cancel()


def record(i, hidden=False):
    return {"id": f"00000000-0000-0000-0000-{i:012d}", "name": f"img{i}", "size": 100 * i, "status": "active",
            "os_hash_algo": "sha512", "os_hash_value": f"{i:0128x}", "os_hidden": hidden}


async def test_the_listing_follows_pages_and_includes_hidden_images():
    glance = FakeGlance(DATA, records=[record(i) for i in range(5)], hidden=[record(7, True)])
    images = await origin_of(glance).list_images()
    assert sorted(m.name for m in images) == ["img0", "img1", "img2", "img3", "img4", "img7"]


async def test_the_catalog_refreshes_on_its_ttl_and_tells_listeners(index, autojump_clock):
    glance = FakeGlance(DATA, records=[record(1)])
    catalog = Catalog(origin_of(glance), index, ttl=10)
    heard = []
    catalog.add_listener(lambda added, removed: heard.append(([m.name for m in added], [m.name for m in removed])))
    async with trio.open_nursery() as nursery:
        await nursery.start(catalog.run)
        await trio.sleep(1)
        assert heard == [(["img1"], [])]
        glance.records = [record(2)]
        listings = glance.listings
        await trio.sleep(5)
        assert glance.listings == listings  # not before the TTL
        await trio.sleep(6)
        assert heard[-1] == (["img2"], ["img1"])
        nursery.cancel_scope.cancel()


async def test_the_catalog_keeps_its_last_listing_when_glance_is_down_and_saves_it(index):
    glance = FakeGlance(DATA, records=[record(1), record(2)])
    catalog = Catalog(origin_of(glance), index)
    await catalog.refresh()
    glance.down = True
    with pytest.raises(GlanceError):
        await catalog.refresh()
    assert sorted(catalog.images) == sorted(r["id"] for r in glance.records)
    assert catalog.origin_ok is False
    again = Catalog(origin_of(glance), index)
    assert again.load_saved() == 2


async def test_a_lookup_of_an_unlisted_id_asks_glance_once_per_miss_interval(index, autojump_clock):
    glance = FakeGlance(DATA, records=[record(3)])
    asked = []
    transport = httpx.MockTransport(lambda req: (asked.append(req.url.path), glance(req))[1])
    catalog = Catalog(GlanceClient("http://glance", transport=transport), index, miss_refresh_interval=1.0)
    meta = await catalog.lookup(record(3)["id"])
    assert meta is not None and meta.name == "img3"  # a new image, without waiting for a listing
    missing = "00000000-0000-0000-0000-999999999999"
    for _ in range(3):
        assert await catalog.lookup(missing) is None
    assert len(asked) == 2
    await trio.sleep(1.5)
    assert await catalog.lookup(missing) is None
    assert await catalog.lookup("../etc/passwd") is None  # never sent to Glance
    assert len(asked) == 3


async def test_images_kept_for_nova_stay_listed_when_glance_drops_them(index):
    glance = FakeGlance(DATA, records=[record(1), record(2)])
    catalog = Catalog(origin_of(glance), index)
    catalog.retain = lambda: {record(2)["id"]}
    await catalog.refresh()
    glance.records = [record(1)]
    await catalog.refresh()
    assert record(2)["id"] in catalog.images and catalog.gone == {record(2)["id"]}


async def test_a_glance_outage_fails_reads_with_one_line_and_no_traceback(store, caplog, autojump_clock):
    from fakes import fetcher_of, running
    from thunderfs.errors import FetchFailed
    from thunderfs.fetch.reader import Readers

    glance = FakeGlance(DATA)
    glance.down = True
    fetcher = fetcher_of(store, source_of(glance), fetch_timeout=5)
    async with running(fetcher):
        with pytest.raises(FetchFailed, match="gave up after 5s"):
            await Readers(store, fetcher).open(META).read(0, CS)
    assert not [r for r in caplog.records if r.exc_info], "an outage is no bug: no traceback"


def test_the_request_cost_is_a_fixed_time_and_a_rate_and_their_product_the_bdp():
    from thunderfs.fetch.glance_source import RequestCost
    cost = RequestCost(default_bdp=12345)
    assert cost.bdp() == 12345  # nothing measured yet
    for _ in range(50):
        cost.observe(64 * 1024, 0.007)  # small requests: the fixed cost
        cost.observe(16 * 2**20, 0.007 + 16 / 1000)  # large ones: 1000 MiB/s beyond it
    assert cost.fixed == pytest.approx(0.007, rel=0.01)
    assert cost.rate == pytest.approx(1000 * 2**20, rel=0.01)
    assert cost.bdp() == pytest.approx(0.007 * 1000 * 2**20, rel=0.02)
