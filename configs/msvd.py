"""MSVD: every test caption is a query (multi-caption split); model selection on val.

Trains on every (video, caption) pair once per epoch, as the authors' MSVD loader.
"""

from centerclip_jax import config as config_lib


def get_config():
  return config_lib.dataset_config("msvd", "train", "val", "test", train_examples="captions")
