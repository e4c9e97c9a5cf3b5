"""The chaos run's short form: every fault once while four nodes read, nothing wrong, nothing hung.

Real Glance, tracker and daemons in network namespaces; the fault injectors that stand in for what
this kernel cannot do (a delaying proxy for latency, nftables for loss) and the lying peer (a real
daemon whose cache files are altered behind its back) are described in harness/chaos_run.py.  The
long form is ``benchmarks/chaos.py --duration SECONDS``.
"""

from __future__ import annotations

import pytest

from harness.chaos_run import FAULTS, Settings, run


# Its own bound on the whole run: about 150 s alone, it once went past pytest's 300 s default in a
# full-suite run (nothing wrong, nothing hung by its own measure).  A read's bound is the report's.
@pytest.mark.timeout(600)
def test_every_fault_once_and_every_byte_read_is_glances(tmp_path):
    report = run(Settings(workdir=tmp_path / "chaos"))
    summary = "\n".join(report.lines() + [str(e) for e in report.events if e[1] not in FAULTS])
    assert set(report.faults) == set(FAULTS), summary
    assert report.reads > 1000 and report.bytes_checked > 500 * 2**20, summary
    assert report.wrong_bytes == 0 and report.wrong_reads == 0, summary
    assert report.hangs == 0, summary
    assert report.errors_glance_up == 0, summary
    assert report.final_images_checked == 12 and report.final_images_wrong == 0, summary
    assert report.altered_chunks > 0 and report.bad_chunks_caught >= 1, summary
    assert report.restart_failures == 0 and report.tracebacks == 0, summary
    assert report.kernel_waiting == 0, summary  # no request lost in the kills and restarts
    assert report.pins_left == 0, summary  # no read left a chunk pinned across them
    assert report.ok()
