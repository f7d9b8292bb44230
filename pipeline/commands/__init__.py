"""One module per ``simplebits`` subcommand (or subcommand group); each defines ``register``."""
