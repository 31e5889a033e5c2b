import sys

from pbe_jax.aot.cli import main

sys.exit(main())
