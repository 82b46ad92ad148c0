"""How a secret is removed: the key-conditioned solver and every editor, each an object that applies and restores itself."""
