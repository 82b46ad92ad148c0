"""How an erasure is judged: splits, the observer, metrics, partial leaks, forget quality and attacks."""
