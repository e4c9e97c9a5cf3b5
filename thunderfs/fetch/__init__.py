"""The read corridor below the FUSE side: Reader, Fetcher (single flight, priorities) and the sources it asks in order (peers, then Glance) behind one protocol (``source.Source``)."""
