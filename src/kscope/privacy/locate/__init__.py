"""Where the secrets live: the restore/zero trace, per-person unit scores, DEPN / KN selection, SAE fit."""
