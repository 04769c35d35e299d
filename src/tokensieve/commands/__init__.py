"""The subcommands of `tokensieve` and what they share (`options`); the entry point `cli.py` only assembles them."""
