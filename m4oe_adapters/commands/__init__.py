"""One module per ``m4oe`` subcommand (see :mod:`m4oe_adapters.cli`)."""
