"""The erase study: the orchestration that reads top to bottom, and what it records."""
