from digits_jax.cli import entry

entry()
