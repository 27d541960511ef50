"""centerclip_jax: CenterCLIP (token clustering for text-video retrieval) in JAX/Flax."""

__version__ = "0.1.0"
