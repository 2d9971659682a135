"""`python -m mt` (and `torchrun -m mt`) run the command line."""

from mt.cli import main

main()
