"""ActivityNet Captions, paragraph-to-video retrieval on val_1 (sentences joined).

64 frames and 64 words; clustering after block 6 into 16 segments of 4 frames.
"""

from centerclip_jax import config as config_lib


def get_config():
  c = config_lib.dataset_config("activitynet_captions", "train", "", "val_1",
                                max_frames=64, max_words=64)
  c.train.lr = 1e-2        # authors' ActivityNet script
  return c
