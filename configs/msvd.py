"""MSVD: every test caption is a query (multi-caption split); model selection on val."""

from centerclip_jax import config as config_lib


def get_config():
  return config_lib.dataset_config("msvd", "train", "val", "test")
