import sys

from digits_jax.cli import main

sys.exit(main())
