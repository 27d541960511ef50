"""LSMDC (LSMDC16 task 1): 1,000-clip public test, model selection on val."""

from centerclip_jax import config as config_lib


def get_config():
  return config_lib.dataset_config("lsmdc", "train", "val", "test")
