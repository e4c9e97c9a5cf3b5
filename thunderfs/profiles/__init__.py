"""Boot access profiles on a node: recording what readers touch first, prefetching along the cluster's profile, warming whole images, and the control socket's operations for them."""
