"""Glance: the one Glance client (``origin``), the image listing (``catalog``) and Keystone tokens for it (``auth``)."""
