"""``python -m unipruning_cli <command>`` (as ``torchrun ... -m unipruning_cli prune``): the ``unipruning`` CLI."""

from .cli import main

main()
