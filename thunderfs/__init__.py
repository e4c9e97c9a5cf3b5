"""thunderfs: Glance images as lazily fetched, locally cached, peer-relayed read-only files."""

__version__ = "0.1.0"
