"""DiDeMo, paragraph-to-video retrieval (moment descriptions joined), test split.

64 frames and 64 words, one example (the paragraph) per video and epoch; clustering
after block 6 into 16 segments of 4 frames.
"""

from centerclip_jax import config as config_lib


def get_config():
  return config_lib.dataset_config("didemo", "train", "val", "test", train_examples="videos",
                                   max_frames=64, max_words=64)
