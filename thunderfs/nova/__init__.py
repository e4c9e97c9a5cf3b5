"""Nova's image cache (``_base``) kept as links into the mount."""
