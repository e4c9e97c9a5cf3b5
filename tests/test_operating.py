"""What operators run the daemon with: the config file, systemd (units, readiness, journald),
Prometheus metrics, status and evict.  Real mounts, a real Glance, a real tracker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import SECRET, wait_for
from harness.local_glance import free_port
from harness.mounts import thunderfs
from harness.tracker import LocalTracker
from thunderfs.service import systemd
from thunderfs.config import MountConfig
from thunderfs_common import options
from thunderfs_tracker.config import TrackerConfig

REPO = Path(__file__).resolve().parent.parent


def _scrape(url: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value} (comments left out)."""
    out = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# --- the config file ------------------------------------------------------------------------


def test_config_file_sets_options_and_flags_win(glance, images, mounts, tmp_path):
    image_id = images.add(300_000, seed=61)
    m = mounts(glance.url)
    conf = tmp_path / "thunderfs.toml"
    conf.write_text(f'glance = "{glance.url}"\ncache_dir = "{m.cache_dir}"\ncache_size = "1G"\n'
                    f'fetch_timeout = 7\nmountpoint = "{m.path}"\n')
    res = thunderfs("mount", "--config", str(conf), "--cache-size", "512M")
    assert res.returncode == 0, res.stderr
    m.read_pids()
    stats = m.stats()
    assert stats["cache"]["capacity"] == 512 * 2**20  # the flag won over the file's 1G
    assert m.image(image_id).read_bytes() == images.data[image_id]  # Glance and cache dir from the file


@pytest.mark.parametrize("text, message", [
    ('glance = "http://x"\ncache_sise = "1G"\n', "unknown key cache_sise"),
    ('glance = "http://x"\nfetch_timeout = "soon"\n', "fetch_timeout must be a number, not 'soon'"),
    ('glance = "http://x"\nforeground = "yes"\n', "foreground must be true or false"),
    ('glance = "http://x"\ncache_size = "lots"\n', "cache_size"),
    ('glance = "http://x\n', "does not parse"),
])
def test_a_bad_config_file_is_refused_with_a_message_naming_it(tmp_path, text, message):
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    (tmp_path / "mnt").mkdir()
    res = thunderfs("mount", str(tmp_path / "mnt"), "--config", str(conf), "--cache-dir", str(tmp_path / "c"))
    assert res.returncode == 1
    assert message in res.stderr and str(conf) in res.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_missing_config_and_secret_files_are_refused(glance, tmp_path):
    (tmp_path / "mnt").mkdir()
    res = thunderfs("mount", str(tmp_path / "mnt"), "--config", str(tmp_path / "nope.toml"))
    assert res.returncode == 1 and "nope.toml does not exist" in res.stderr
    res = thunderfs("mount", str(tmp_path / "mnt"), "--glance", glance.url, "--cache-dir", str(tmp_path / "c"),
                    "--tracker", "http://127.0.0.1:1", "--peer-listen", "127.0.0.1:1",
                    "--secret-file", str(tmp_path / "no-secret"))
    assert res.returncode == 1 and "no-secret does not exist" in res.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    conf = tmp_path / "t.toml"
    conf.write_text('node_ttl = "long"\n')
    res = subprocess.run([sys.executable, "-m", "thunderfs_tracker", "--config", str(conf), "--listen",
                          "127.0.0.1:1", "--state-dir", str(tmp_path / "s")], capture_output=True, text=True)
    assert res.returncode == 1 and "node_ttl must be a number" in res.stderr


def test_the_example_config_files_hold_only_real_options():
    settings = options.read_file(REPO / "config" / "thunderfs.toml", MountConfig)
    assert settings["cache_size"] == 200 * 2**30 and settings["metrics_listen"] == "127.0.0.1:9479"
    assert options.read_file(REPO / "config" / "tracker.toml", TrackerConfig)["listen"] == ("0.0.0.0", 7070)


# --- systemd --------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["thunderfs.service", "thunderfs-tracker.service"])
def test_systemd_units_verify(unit, tmp_path):
    text = (REPO / "systemd" / unit).read_text()
    # The units name the installed path (docs/operating.md); here the venv's scripts stand in.
    venv_bin = Path(sys.executable).parent
    assert "/opt/thunderfs/bin/" in text
    (tmp_path / unit).write_text(text.replace("/opt/thunderfs/bin/", f"{venv_bin}/"))
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True)
    problems = [ln for ln in res.stderr.splitlines() if unit in ln or "Unknown" in ln]
    assert res.returncode == 0 and not problems, res.stderr


def test_systemd_nova_drop_ins_verify(tmp_path):
    """The drop-ins for a compute node with Nova (docs/nova.md), each appended to the unit it
    extends (systemd reads a drop-in as more lines of the unit); nova-compute's unit is a stand-in."""
    venv_bin = Path(sys.executable).parent
    units = {
        "thunderfs.service": (REPO / "systemd" / "thunderfs.service").read_text().replace(
            "/opt/thunderfs/bin/", f"{venv_bin}/"),
        "nova-compute.service": "[Unit]\nDescription=stand-in\n[Service]\nExecStart=/bin/true\n",
    }
    for unit in units:
        drop_in = next((REPO / "systemd" / f"{unit}.d").glob("*.conf")).read_text()
        (tmp_path / unit).write_text(units[unit] + "\n" + drop_in)
    caps = (REPO / "systemd" / "thunderfs.service.d" / "nova.conf").read_text()
    assert "CAP_DAC_OVERRIDE" in caps and "CAP_SYS_ADMIN" in caps
    res = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / u) for u in units)],
                         capture_output=True, text=True)
    problems = [ln for ln in res.stderr.splitlines() if any(u in ln for u in units) or "Unknown" in ln]
    assert res.returncode == 0 and not problems, res.stderr


def test_ready_is_notified_once_mounted_and_stopping_on_sigterm(glance, images, mounts, tmp_path):
    """Type=notify as systemd does it: a datagram socket in NOTIFY_SOCKET.  With no descriptor
    store ($FDSTORE unset: FileDescriptorStoreMax=0) nobody could take the mount over, so SIGTERM
    unmounts (with a store it hands over: tests/test_takeover.py)."""
    image_id = images.add(70_000, seed=62)
    m = mounts(glance.url)
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    env = {k: v for k, v in os.environ.items() if k != "FDSTORE"} | {"NOTIFY_SOCKET": str(path)}
    proc = subprocess.Popen([sys.executable, "-m", "thunderfs", "mount", str(m.path), "--glance", glance.url,
                             "--cache-dir", str(m.cache_dir), "--foreground"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready.splitlines() and f"MAINPID={proc.pid}" in ready
        assert os.path.ismount(m.path)  # READY only once the mount is up...
        assert m.image(image_id).read_bytes() == images.data[image_id]  # ...and serving
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in sock.recv(4096).decode()
        assert proc.wait(30) == 0
        assert not os.path.ismount(m.path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        sock.close()


def test_journal_lines_carry_syslog_priorities():
    import logging

    f = systemd.JournalFormatter()
    rec = logging.LogRecord("thunderfs.p2p.peer_source", logging.WARNING, __file__, 1, "peer %s lied\nsecond line", ("x",), None)
    assert f.format(rec) == "<4>thunderfs.p2p.peer_source: peer x lied\n<4>second line"
    rec.levelno = logging.INFO
    assert f.format(rec).startswith("<6>")
    assert not systemd.under_journal()  # JOURNAL_STREAM is not ours here
    assert not systemd.notify("READY=1") or "NOTIFY_SOCKET" in os.environ


# --- metrics, status, evict -----------------------------------------------------------------


def test_metrics_status_and_evict_agree_with_what_was_read(glance, images, mounts, tmp_path):
    image_id = images.add(2 * 2**20 + 5000, seed=63, name="metrics-image")
    other = images.add(70_000, seed=64, name="untouched")
    tracker = LocalTracker(tmp_path / "tracker", "--glance", glance.url, "--heartbeat", "1", "--node-ttl", "5",
                           secret=SECRET)
    tracker.start()
    try:
        secret = tmp_path / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        port = free_port()
        m = mounts(glance.url, "--metrics-listen", f"127.0.0.1:{port}", "--tracker", tracker.url,
                   "--peer-listen", f"127.0.0.1:{free_port()}", "--node-id", "n1", "--secret-file", str(secret))
        m.mount()
        data = images.data[image_id]
        with open(m.image(image_id), "rb", buffering=0) as f:
            f.seek(2**20)
            assert f.read(300_000) == data[2**20:2**20 + 300_000]

        status = json.loads(thunderfs("status", str(m.path), "--json", check=True).stdout)
        per = {im["id"]: im for im in status["per_image"]}
        im = per[image_id]
        assert im["name"] == "metrics-image" and im["size"] == len(data)
        assert 0 < im["cached_fraction"] < 1 and im["bytes_read"] >= 300_000
        # From Glance, or through the tracker while it seeds the new image (its manifest not yet checked).
        fetched = status["fetch"]["bytes_from_origin"] + status["fetch"]["bytes_from_seed"]
        assert (im["bytes_from_origin"], im["bytes_from_seed"]) == (
            status["fetch"]["bytes_from_origin"], status["fetch"]["bytes_from_seed"]) and fetched > 0
        assert per[other]["cached_chunks"] == 0 and per[other]["bytes_read"] == 0
        text = thunderfs("status", str(m.path), check=True).stdout
        assert image_id in text and "% cached" in text and "other image" in text
        listed = json.loads(thunderfs("status", "--json", check=True).stdout)  # every mount
        assert [s["mountpoint"] for s in listed] == [str(m.path)]

        got = _scrape(f"http://127.0.0.1:{port}/metrics")
        assert got['thunderfs_fetched_bytes_total{source="glance"}'] == status["fetch"]["bytes_from_origin"]
        assert got['thunderfs_fetched_bytes_total{source="tracker_seed"}'] == status["fetch"]["bytes_from_seed"]
        assert sum(got.get(f'thunderfs_fetch_seconds_count{{source="{s}"}}', 0) for s in ("glance", "tracker_seed")) >= 1
        assert got["thunderfs_read_bytes_total"] >= 300_000
        assert got["thunderfs_cache_used_bytes"] == status["cache"]["used"] > 0
        assert got['thunderfs_errors_total{kind="peer_bad_chunk"}'] == 0

        res = thunderfs("evict", str(m.path), image_id, check=True)
        assert "cached chunks dropped" in res.stdout
        after = {i["id"]: i for i in json.loads(thunderfs("status", str(m.path), "--json", check=True).stdout)
                 ["per_image"]}
        assert after[image_id]["cached_chunks"] == 0
        before = fetched
        assert m.image(image_id).read_bytes() == data  # fetched again, right
        # Fetched again, all but what the kernel still holds in its page cache from the first read
        # (at most what was fetched then): evict drops the daemon's cache, not the kernel's memory.
        again = m.stats()["fetch"]
        assert again["bytes_from_origin"] + again["bytes_from_seed"] - before >= len(data) - before
        bad = thunderfs("evict", str(m.path), "no-such-image")
        assert bad.returncode != 0 and "no image 'no-such-image'" in bad.stderr

        wait_for(lambda: _scrape(f"{tracker.url}/metrics").get("thunderfs_tracker_nodes") == 1,
                 what="the tracker's node gauge")
        tm = _scrape(f"{tracker.url}/metrics")
        assert any(k.startswith("thunderfs_tracker_request_seconds_count") and "announce" in k and v > 0
                   for k, v in tm.items())
    finally:
        tracker.stop()


def test_metrics_port_in_use_is_a_clean_start_error(glance, mounts):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    m = mounts(glance.url, "--metrics-listen", f"127.0.0.1:{busy.getsockname()[1]}")
    res = m.try_mount()
    busy.close()
    assert res.returncode == 1 and "cannot serve metrics" in res.stderr
    assert not m.is_mounted()

