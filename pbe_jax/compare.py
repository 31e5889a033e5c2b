"""The old name of `python -m pbe_jax.parity` (the parity harness, now pbe_jax/parity/): kept so that
`python -m pbe_jax.compare ...` in someone's notes still runs. Nothing imports this module."""
if __name__ == "__main__":
    import sys

    from pbe_jax.parity.compare import main

    sys.exit(main())
