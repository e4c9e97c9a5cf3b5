"""The daemon as a running service: its control socket, per-image status, Prometheus metrics and systemd."""
