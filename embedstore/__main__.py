"""``python -m embedstore`` runs the command line."""

from __future__ import annotations

from embedstore.cli import main

main()
