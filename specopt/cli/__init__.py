"""The ``specopt`` command line (entry point :func:`specopt.cli.main.main`)."""
