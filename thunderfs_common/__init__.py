"""What the daemon and the tracker both use and neither owns: request signing, Keystone
sessions, TOML config files, HOST:PORT and sizes.  Imports neither ``thunderfs`` nor
``thunderfs_tracker``."""
