"""The `stip` command line. Each command is a thin wrapper over the Python API of one party's subpackage.

One module per command group: developer (protect, inspect, verify, rekey), server (serve, enclave), apikey, client
(chat, embed, classify, proxy), all_parties (demo, bench, audit). Importing them registers their commands on `app`, in
the order `stip --help` lists them.
"""

from stip.cli.app import app, main
from stip.cli import developer, server, apikey, client, all_parties  # noqa: F401,E402 - registers the commands

__all__ = ["app", "main"]
