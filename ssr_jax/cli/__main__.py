"""`python -m ssr_jax.cli COMMAND ...` (what `ssr-jax plan` re-runs itself with)."""
import sys

from ssr_jax.cli import main

sys.exit(main())
