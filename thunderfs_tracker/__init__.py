"""thunderfs-tracker: which node holds which chunks, ranked by nearness."""

__version__ = "0.1.0"
