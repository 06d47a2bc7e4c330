"""`python -m stip.cli`, as the tests, the demo and the server launcher start the CLI."""

from stip.cli import main

main()
