r"""ActivityNet Captions, paragraph-to-video retrieval on val_1 (sentences joined).

The authors' ActivityNet script: 60 frames, 77 words, 8 epochs, lr 1e-2, global batch
128, one example (the paragraph) per video and epoch; clustering after block 6 to 20
segments of 3 frames. Named variants: `configs/activitynet.py:60_15` (15 segments of 4
frames) and `:64` (64 frames, 16 segments of 4).
"""

from centerclip_jax import config as config_lib

VARIANTS = {"60": (60, 20), "60_15": (60, 15), "64": (64, 16)}  # (frames, segments)


def get_config(arg: str = "60"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/activitynet.py: argument must be one of {sorted(VARIANTS)}, "
                     f"got {arg!r}")
  frames, segments = VARIANTS[arg]
  c = config_lib.dataset_config("activitynet_captions", "train", "", "val_1",
                                train_examples="videos", max_frames=frames, max_words=77,
                                segments=segments)
  c.train.lr = 1e-2
  c.train.num_epochs = 8
  return c
