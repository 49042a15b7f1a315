"""One module per `embsum` subcommand; each exposes a click command named `command`."""
