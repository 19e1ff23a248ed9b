"""Soak tests: long runs, marked ``slow`` and left out of ``make test``; ``make soak`` runs them."""
