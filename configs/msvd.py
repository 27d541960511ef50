"""MSVD: every test caption is a query (multi-caption split); model selection on val."""

from centerclip_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "msvd"
  c.train_split = "train"
  c.val_split = "val"
  c.eval_split = "test"
  return c
