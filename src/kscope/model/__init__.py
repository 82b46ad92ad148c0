"""The model side: loading, named sites, all hooking, prefix KV caches, readouts of the answer."""
