import sys

from pbe_jax.parity.compare import main

sys.exit(main())
