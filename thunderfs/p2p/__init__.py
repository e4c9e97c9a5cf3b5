"""The peer-to-peer room: this node as a client of its peers (the peer and seed sources, the
directory of holders and manifests, claims, the peer client) and as their server (the peer server,
the announcer)."""
