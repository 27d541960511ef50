"""DiDeMo, paragraph-to-video retrieval (moment descriptions joined), test split."""

from centerclip_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "didemo"
  c.train_split = "train"
  c.val_split = "val"
  c.eval_split = "test"
  c.model = config_lib.model_config(max_frames=64)
  c.model.max_words = 64
  c.model.target_frames_blocks = (64,) * 6 + (16,) * 6
  c.eval.batch_size = 16
  return c
