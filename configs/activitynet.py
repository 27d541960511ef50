"""ActivityNet Captions, paragraph-to-video retrieval on val_1 (sentences joined).

64 frames and 64 words; clustering after block 6 into 16 segments of 4 frames.
"""

from centerclip_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "activitynet_captions"
  c.train_split = "train"
  c.val_split = ""
  c.eval_split = "val_1"
  c.model = config_lib.model_config(max_frames=64)
  c.model.max_words = 64
  c.model.target_frames_blocks = (64,) * 6 + (16,) * 6
  c.train.lr = 1e-2        # authors' ActivityNet script
  c.eval.batch_size = 16
  return c
