"""The command line, the whole-study run and its report."""
