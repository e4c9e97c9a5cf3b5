"""The storm model's terms: a host's cores bind the nodes that share them, not a cluster's."""

from __future__ import annotations

from benchmarks import storm_model
from benchmarks.storm_model import Params, predict

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
