"""Chunk data on local disk: the store (data files, eviction, checksums), its LMDB index, and hole punching."""
