"""This node as a member of the cluster: telling the tracker what it holds (``announcer``) and serving its chunks to peers (``peer_server``)."""
