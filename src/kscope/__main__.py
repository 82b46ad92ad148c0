"""``python -m kscope``: the command line."""

from kscope.app.cli import main

main()
