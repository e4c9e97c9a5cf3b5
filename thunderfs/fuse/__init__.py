"""The FUSE side: Operations (the one errno boundary) and the inode table.  pyfuse3 is imported here and in the daemon only."""
