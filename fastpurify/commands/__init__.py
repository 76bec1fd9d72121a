"""The subcommands of the ``fastpurify`` command line, one module each."""
