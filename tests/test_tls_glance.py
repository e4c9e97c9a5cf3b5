"""Glance over HTTPS (nginx terminating TLS in front of a real Glance): the lean receive path's
TLS reads the same bytes as plain HTTP, and a certificate nobody vouches for (a machine in the
middle) is refused with a clear line, never read from."""

from __future__ import annotations

import errno

import pytest

from harness.tls_proxy import TLSProxy


@pytest.fixture
def tls_glance(glance, tmp_path):
    with TLSProxy(tmp_path / "tls", glance.url) as proxy:
        yield proxy


def test_images_read_through_a_tls_glance_byte_for_byte(tls_glance, mounts, images, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_glance.ca_file))  # the daemon trusts what httpx trusts
    image_id = images.add(9 * 2**20 + 12345, seed=80)
    m = mounts(tls_glance.url, "--readahead", "4M")
    m.mount()
    assert m.image(image_id).read_bytes() == images.data[image_id]
    s = m.stats()
    assert s["glance"]["range_requests"] >= 2 and s["glance"]["errors"] == 0
    conns = s["fetch"]["origin_connections"]
    assert conns["failures"] == 0 and conns["reused"] >= 1  # keep-alive over TLS too


def test_a_glance_certificate_nobody_vouches_for_is_refused_clearly(tls_glance, mounts, images, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    image_id = images.add(3 * 2**20, seed=81)
    m = mounts(tls_glance.url, "--fetch-timeout", "3")
    res = m.try_mount()
    if res.returncode == 0:  # up on its cache, Glance unreachable: reads fail, none is served
        with pytest.raises(OSError) as exc:
            m.image(image_id).read_bytes()
        assert exc.value.errno in (errno.EIO, errno.ENOENT)
        text = m.log_tail()
    else:
        text = res.stderr + m.log_tail()
    assert "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text
