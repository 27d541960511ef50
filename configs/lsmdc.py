"""LSMDC (LSMDC16 task 1): 1,000-clip public test, model selection on val.

The authors' script: 12 frames, 32 words, lr 5e-3, coef_lr 1e-3, 5 epochs, global batch
128; each clip has one sentence (one example per clip and epoch).
"""

from centerclip_jax import config as config_lib


def get_config():
  return config_lib.dataset_config("lsmdc", "train", "val", "test", train_examples="videos")
