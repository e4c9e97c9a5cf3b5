"""The storm model's terms: a host's cores bind the nodes that share them, not a cluster's."""

from __future__ import annotations

from benchmarks import storm_model
from benchmarks.storm_model import Params, predict
from harness.boot_trace import Read

MiB = 2**20


def _params(**kw) -> Params:
    base = dict(S=2048 * MiB, W=40 * MiB, Bn=125e6, Bg=125e6, T0=30.0, D=0.0, Dp=0.0, k=300, C=1000, q=25,
                R=3000, Cp=2000)
    return Params(**{**base, **kw})


def test_the_cores_of_a_shared_host_bind_when_its_nodes_need_more_than_the_boot_lasts():
    run = {"cpu": {"daemon_seconds_per_node": 3.0}, "machine": {"cores": 2, "cpu_seconds": {"tracker": 16.0}}}
    p = _params(shared_host=True).with_cpu(run, 32)
    assert (p.c, p.o, p.P) == (3.0, 0.5, 2)
    t, egress = predict("thunderfs", 32, p)
    assert t == 32 * 3.5 / 2  # above T0: the cores, not the boot's pace, bound it
    assert egress == p.W
    # Fewer nodes on the same cores: the boot's own pace again.
    assert predict("thunderfs", 8, p)[0] == 30.0


def test_a_cluster_node_has_its_own_core_and_a_run_without_cpu_figures_keeps_the_old_terms():
    p = _params().with_cpu({"cpu": {"daemon_seconds_per_node": 3.0}}, 32)
    assert predict("thunderfs", 10_000, p)[0] == max(30.0, 10_000 * 25 / 3000)  # M = 1: no sharing
    unmeasured = _params(shared_host=True).with_cpu({}, 32)
    assert unmeasured.c == 0.0
    assert predict("thunderfs", 32, unmeasured)[0] == 30.0 + 32 * 300 / 2000  # the peer transfers' term
    assert storm_model.rate("100mbit") == 12.5e6


def test_a_new_images_work_follows_a_paced_boots_reads_and_a_known_images_prefetch_does_not():
    """Without a profile a node fetches as its boot reads: the cores' work cannot be done before
    the reads ask for it.  A boot that reads its chunks from 10 s on (as the recorded Debian boot
    does) ends no earlier than 10 s plus the work over the cores."""
    reads = [Read(0.0, 0, 64 * 1024)] + [
        Read(10.0 + i / 100, (i + 1) * 64 * 1024, 64 * 1024) for i in range(99)]
    after = storm_model.first_reads(reads)
    assert after[0] == (0.0, 1.0) and after[1] == (10.0, 0.99) and len(after) == 100
    run = {"cpu": {"daemon_seconds_per_node": 2.0}, "machine": {"cores": 2, "cpu_seconds": {"glance": 0.0}}}
    p = _params(shared_host=True, T0=20.0, after=after).with_cpu(run, 32)
    assert predict("thunderfs", 32, p)[0] == 32.0  # a profile's prefetch works from the start
    assert predict("thunderfs-new", 32, p)[0] == 10.0 + 0.99 * 32.0
    assert predict("thunderfs-new", 32, _params(shared_host=True, T0=20.0).with_cpu(run, 32))[0] == 32.0
