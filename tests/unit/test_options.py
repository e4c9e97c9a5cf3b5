"""Each option declared once: the command line, the config file and the checks all come from
the settings' dataclass (``thunderfs_common.options``), for the daemon and the tracker."""

from __future__ import annotations

import argparse

import pytest

from thunderfs.config import MountConfig
from thunderfs_common import options
from thunderfs_common.hostport import parse_host_port
from thunderfs_tracker.config import TrackerConfig


def mount_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    options.add_arguments(p, MountConfig)
    return p.parse_args(list(argv))


def load(*argv, file_text: str | None = None, tmp_path=None) -> MountConfig:
    path = None
    if file_text is not None:
        path = tmp_path / "thunderfs.toml"
        path.write_text(file_text)
    return options.load(MountConfig, mount_args(*argv), path)


def test_defaults_then_the_file_then_the_flags(tmp_path):
    c = load("/mnt", "--cache-dir", str(tmp_path), "--cache-size", "512M", tmp_path=tmp_path,
             file_text='glance = "http://g:9292"\ncache_size = "1G"\nfetch_timeout = 7\n')
    assert (c.cache_size, c.fetch_timeout, c.glance, c.chunk_size) == (512 * 2**20, 7.0, "http://g:9292", 65536)
    assert c.cache_dir == tmp_path.resolve() and c.allow_other and c.image_mode == 0o440


def test_settings_are_frozen(tmp_path):
    c = load("/mnt", "--cache-dir", str(tmp_path))
    with pytest.raises(AttributeError):
        c.cache_size = 1


@pytest.mark.parametrize("argv, words", [
    (["--chunk-size", "100K"], "--chunk-size must be a power of two"),
    (["--cache-size", "lots"], "--cache-size: not a size"),
    (["--cache-size", "1K"], "smaller than one chunk"),
    (["--fetch-timeout", "0"], "--fetch-timeout must be positive"),
    (["--origin-concurrency", "x"], "--origin-concurrency must be a whole number"),
    (["--glance", "glance:9292"], "--glance must be an http(s) URL"),
    (["--tracker", "http://t:7070"], "--tracker and --peer-listen go together"),
    (["--tracker", "http://t:7070", "--peer-listen", "0.0.0.0:7071"], "needs --peer-url"),
    (["--tracker", "http://t:7070", "--peer-listen", "10.0.0.5:0"], "--peer-listen must be HOST:PORT with a port from 1"),
    (["--node-id", "bad/name"], "--node-id must match"),
    (["--image-mode", "640"], "--image-mode must have read bits only"),
    (["--image-mode", "9"], "--image-mode: invalid literal"),
])
def test_a_bad_flag_is_refused_naming_it(tmp_path, argv, words):
    with pytest.raises(options.OptionError, match=None) as info:
        load("/mnt", "--cache-dir", str(tmp_path), *argv)
    assert words in str(info.value)


@pytest.mark.parametrize("text, words", [
    ('cache_sise = "1G"\n', "unknown key cache_sise"),
    ('fetch_timeout = "soon"\n', "fetch_timeout must be a number, not 'soon'"),
    ('foreground = "yes"\n', "foreground must be true or false"),
    ('cache_size = "lots"\n', "cache_size: not a size"),
    ('ready_fd = 3\n', "unknown key ready_fd"),
    ('glance = "http://x\n', "does not parse"),
])
def test_a_bad_config_file_is_refused_naming_the_file_and_key(tmp_path, text, words):
    with pytest.raises(options.OptionError) as info:
        load("/mnt", "--cache-dir", str(tmp_path), tmp_path=tmp_path, file_text=text)
    assert words in str(info.value) and "thunderfs.toml" in str(info.value)


def test_what_is_required_is_said_with_where_it_may_come_from(tmp_path):
    with pytest.raises(options.OptionError, match="MOUNTPOINT is needed .* mountpoint in the config file"):
        load("--cache-dir", str(tmp_path))
    assert load(tmp_path=tmp_path, file_text=f'mountpoint = "/m"\ncache_dir = "{tmp_path}"\n').mountpoint.name == "m"


def test_a_peer_url_is_derived_once_from_the_listening_address(tmp_path):
    c = load("/mnt", "--cache-dir", str(tmp_path), "--tracker", "http://a:7070,http://b:7070",
             "--peer-listen", "10.0.0.5:7071")
    assert c.peer_url == "http://10.0.0.5:7071" and c.peer_address == ("10.0.0.5", 7071)
    assert c.tracker_urls == ["http://a:7070", "http://b:7070"]


def test_every_option_has_a_flag_and_a_help_line():
    p = argparse.ArgumentParser()
    options.add_arguments(p, MountConfig)
    text = p.format_help()
    for flag in ("--cache-size", "--no-allow-other", "--peer-listen", "--nova-base-dir", "--record-window"):
        assert flag in text
    assert "--ready-fd" not in text  # hidden


def test_the_tracker_takes_its_options_from_the_same_schema(tmp_path):
    p = argparse.ArgumentParser()
    options.add_arguments(p, TrackerConfig)
    conf = tmp_path / "tracker.toml"
    conf.write_text('listen = "[::1]:7070"\nnode_ttl = 40\n')
    c = options.load(TrackerConfig, p.parse_args(["--state-dir", str(tmp_path), "--heartbeat", "5"]), conf)
    assert (c.listen, c.node_ttl, c.heartbeat, c.store) == (("::1", 7070), 40.0, 5.0, "memory")
    with pytest.raises(options.OptionError, match="--node-ttl must be longer than --heartbeat"):
        options.load(TrackerConfig, p.parse_args(["--state-dir", "s", "--listen", ":1", "--heartbeat", "50"]))
    with pytest.raises(options.OptionError, match="neither memory nor a redis"):
        options.load(TrackerConfig, p.parse_args(["--state-dir", "s", "--listen", ":1", "--store", "mysql://x"]))


def test_host_port():
    assert parse_host_port(":7070", "--listen") == ("0.0.0.0", 7070)
    for bad in ("7070", "h:0", "h:70000", "h:x", None):
        with pytest.raises(ValueError, match="--listen must be HOST:PORT"):
            parse_host_port(bad, "--listen")


def test_files_the_settings_name_are_checked_against_the_host_apart_from_the_values(tmp_path):
    secret = tmp_path / "secret"
    c = load("/mnt", "--cache-dir", str(tmp_path), "--secret-file", str(secret))  # the value is fine
    assert c.missing_files() == [f"--secret-file {secret} does not exist"]
    secret.write_bytes(b"x" * 32)
    assert c.missing_files() == []
