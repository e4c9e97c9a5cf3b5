"""Glance behind a real Keystone (keystonemiddleware checks every token), and the daemon
authenticating as the ``openstack`` client would: clouds.yaml or OS_* variables, Glance's URL from
the service catalog, tokens renewed before they expire."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import SECRET, image_bytes, wait_for
from harness.local_glance import LocalGlance, free_port
from harness.local_keystone import LocalKeystone
from harness.mounts import thunderfs
from harness.tracker import LocalTracker

TOKEN_SECONDS = 40  # Keystone's token lifetime here: renewed at half of it (RENEW_BEFORE is 300 s)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """A Keystone with short-lived tokens, a Glance that requires them, one image, a clouds.yaml."""
    work = tmp_path_factory.mktemp("keystone")
    ks = LocalKeystone(work / "keystone", token_seconds=TOKEN_SECONDS)
    ks.start()
    glance = LocalGlance(work / "glance", keystone=ks)
    try:
        glance.start()
        ks.add_image_service(glance.url)
        data = image_bytes(3 * 2**20 + 123, seed=91)
        image_id = glance.upload("behind-keystone", data)["id"]
        clouds = work / "clouds.yaml"
        cred_id, cred_secret = ks.application_credential("thunderfs-test")
        clouds.write_text(yaml.safe_dump({"clouds": {
            "test": {"auth": ks.admin_auth(), "region_name": "RegionOne", "interface": "public"},
            "appcred": {"auth_type": "v3applicationcredential", "region_name": "RegionOne",
                        "auth": {"auth_url": ks.url, "application_credential_id": cred_id,
                                 "application_credential_secret": cred_secret}},
            "wrong": {"auth": {**ks.admin_auth(), "password": "not-the-password"}},
        }}))
        yield ks, glance, clouds, image_id, data
    finally:
        glance.stop()
        ks.stop()


def _env(clouds) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    return {**env, "OS_CLIENT_CONFIG_FILE": str(clouds)}


def test_glance_refuses_requests_without_a_token(cloud):
    _, glance, _, image_id, _ = cloud
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{glance.url}/v2/images/{image_id}", timeout=10)
    assert exc.value.code == 401


def test_a_cloud_of_clouds_yaml_finds_glance_in_the_catalog_and_renews_tokens(cloud, mounts):
    ks, glance, clouds, image_id, data = cloud
    m = mounts("", name="ks")
    # No --glance: its URL comes from Keystone's catalog.
    res = thunderfs("mount", str(m.path), "--cache-dir", str(m.cache_dir), "--os-cloud", "test",
                    env=_env(clouds))
    assert res.returncode == 0, res.stderr + m.log_tail()
    m.read_pids()
    s = m.stats()
    assert s["glance"]["url"] == glance.url
    with open(m.image(image_id), "rb") as f:
        assert f.read(2**20) == data[:2**20]
    # Past the first token's life: the daemon took a new one before it expired, and reads go on
    # (keystonemiddleware answers 401 to an expired token).
    time.sleep(TOKEN_SECONDS + 5)
    assert m.image(image_id).read_bytes() == data
    s = m.stats()
    assert s["glance"]["token_renewals"] >= 2 and s["glance"]["errors"] == 0
    assert "Keystone token for Glance" in m.log_tail(100_000)


def test_application_credentials_and_os_environment_work_too(cloud, mounts):
    ks, glance, clouds, image_id, data = cloud
    m = mounts("", name="appcred")
    res = thunderfs("mount", str(m.path), "--cache-dir", str(m.cache_dir), "--os-cloud", "appcred",
                    env=_env(clouds))
    assert res.returncode == 0, res.stderr
    assert m.image(image_id).read_bytes()[:4096] == data[:4096]
    assert thunderfs("umount", str(m.path)).returncode == 0
    a = ks.admin_auth()
    env = {**_env(clouds), "OS_AUTH_URL": a["auth_url"], "OS_USERNAME": a["username"],
           "OS_PASSWORD": a["password"], "OS_PROJECT_NAME": "admin", "OS_USER_DOMAIN_NAME": "Default",
           "OS_PROJECT_DOMAIN_NAME": "Default", "OS_REGION_NAME": "RegionOne"}
    del env["OS_CLIENT_CONFIG_FILE"]
    m2 = mounts("", name="osenv")
    res = thunderfs("mount", str(m2.path), "--cache-dir", str(m2.cache_dir), "--glance", glance.url, env=env)
    assert res.returncode == 0, res.stderr
    assert m2.image(image_id).read_bytes()[-4096:] == data[-4096:]


@pytest.mark.parametrize("cloud_name, message", [
    ("wrong", "gave no token"),                 # credentials Keystone refuses
    ("nosuch", "has no cloud 'nosuch'"),        # a cloud clouds.yaml does not have
])
def test_bad_credentials_stop_the_daemon_at_start_with_a_message(cloud, tmp_path, cloud_name, message):
    _, glance, clouds, _, _ = cloud
    (tmp_path / "mnt").mkdir()
    res = thunderfs("mount", str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c"), "--glance", glance.url,
                    "--os-cloud", cloud_name, env=_env(clouds))
    assert res.returncode == 1 and message in res.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_the_tracker_reads_glance_through_keystone_for_manifests(cloud, mounts, tmp_path, monkeypatch):
    ks, glance, clouds, image_id, data = cloud
    for key in [k for k in os.environ if k.startswith("OS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    tracker = LocalTracker(tmp_path / "tracker", "--os-cloud", "test", "--heartbeat", "1", "--node-ttl", "5",
                           secret=SECRET)
    tracker.start()  # no --glance: from the catalog
    try:
        secret = tmp_path / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        m = mounts("", name="ktracker")
        res = thunderfs("mount", str(m.path), "--cache-dir", str(m.cache_dir), "--os-cloud", "test",
                        "--tracker", tracker.url, "--peer-listen", f"127.0.0.1:{free_port()}", "--node-id", "k1",
                        "--secret-file", str(secret))
        assert res.returncode == 0, res.stderr
        m.read_pids()
        assert m.image(image_id).read_bytes() == data
        # The manifest (built by the tracker from Glance's bytes, with a token) reached the node.
        # (The first open asks while it is being built; a later open asks again.)
        def opened_and_has_manifest() -> bool:
            with open(m.image(image_id), "rb") as f:
                f.read(1)
            return m.stats()["peers"]["manifests"] == 1

        wait_for(opened_and_has_manifest, timeout=60, what="the manifest")
        assert "built and checked against Glance's sha512" in tracker.log()
        assert "with Keystone tokens" in tracker.log()
    finally:
        tracker.stop()
    bad = subprocess.run([sys.executable, "-m", "thunderfs_tracker", "--os-cloud", "wrong", "--listen",
                          f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "t2")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "gave no token" in bad.stderr


def test_keystone_down_at_start_serves_the_cache_and_authenticates_once_it_is_back(cloud, mounts):
    """The endpoint Keystone's catalog named at the last start is kept with the cache: a start
    while Keystone does not answer serves what is cached, and Glance is used again, with a fresh
    token, once Keystone answers."""
    ks, glance, clouds, image_id, data = cloud
    other = image_bytes(2**20 + 7, seed=92)
    other_id = glance.upload("behind-keystone-2", other)["id"]
    m = mounts("", name="ksdown")
    args = (str(m.path), "--cache-dir", str(m.cache_dir), "--os-cloud", "test")
    res = thunderfs("mount", *args, env=_env(clouds))
    assert res.returncode == 0, res.stderr + m.log_tail()
    m.read_pids()
    assert m.image(image_id).read_bytes() == data  # cached now
    assert m.umount().returncode == 0
    ks.stop()
    try:
        res = thunderfs("mount", *args, env=_env(clouds))
        assert res.returncode == 0, res.stderr + m.log_tail()
        m.read_pids()
        assert "Traceback" not in res.stderr
        assert m.image(image_id).read_bytes() == data  # from the cache alone
        assert "no Glance endpoint" not in m.log_tail() and "authenticating once Keystone answers" in m.log_tail()
    finally:
        ks.resume()
    # Keystone is back: a token, and the image never read before comes from Glance.
    assert wait_for(lambda: _reads(m.image(other_id)) == other, 60, "a Glance read with a new token")


def _reads(path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
