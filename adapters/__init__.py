"""Framework adapters: ``swr_array.adapters.torch`` and ``swr_array.adapters.jax``."""
