"""Chunk owners by rendezvous hashing: the same owner for every node that knows the same members,
whole windows to one owner, the windows spread over the members, and few move when one joins."""

from __future__ import annotations

from collections import Counter

from thunderfs.p2p.owners import WINDOW, owner, window

CONTENT = bytes(range(32))
CS = 2**16
PER = WINDOW // CS  # chunks a window


def test_every_node_names_the_same_owner_whatever_order_it_knows_the_members_in():
    members = [f"node{i}" for i in range(32)]
    for c in range(0, 4096, 7):
        assert owner(CONTENT, window(c, CS), members) == owner(CONTENT, window(c, CS), list(reversed(members)))


def test_a_windows_chunks_have_one_owner_and_the_windows_spread_over_the_members():
    members = [f"node{i}" for i in range(8)]
    for w in range(64):
        assert len({owner(CONTENT, window(c, CS), members) for c in range(w * PER, (w + 1) * PER)}) == 1
    counts = Counter(owner(CONTENT, window(w * PER, CS), members) for w in range(2048))
    assert set(counts) == set(members) and max(counts.values()) < 2 * 2048 / len(members)


def test_a_member_that_joins_takes_windows_only_from_the_others_about_its_share():
    members = [f"node{i}" for i in range(16)]
    before = {w: owner(CONTENT, window(w * PER, CS), members) for w in range(2048)}
    after = {w: owner(CONTENT, window(w * PER, CS), members + ["new"]) for w in range(2048)}
    moved = [w for w in before if before[w] != after[w]]
    assert all(after[w] == "new" for w in moved)  # nothing moves between the old members
    assert 0.5 * 2048 / 17 < len(moved) < 1.5 * 2048 / 17
