"""One module per evaluation, each with its config, typed result and figure."""
