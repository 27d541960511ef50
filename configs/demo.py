r"""The built-in demo: a small CLIP trained from scratch on the synthetic benchmark.

  python -m centerclip_jax.main --config configs/demo.py --workdir runs/demo

Builds `synthetic_video_text` on first use (no download), trains with CenterCLIP token
clustering (k-medoids++, after block 1: 8 frames -> 4 segments of 8 tokens), evaluates
text<->video retrieval on the test split and prints the table. The same `main` trains
MSR-VTT. `--config configs/demo.py:baseline` runs the no-clustering baseline.
"""

from centerclip_jax import config as config_lib


def get_config(arg: str = "centerclip"):
  if arg not in ("centerclip", "baseline"):
    raise ValueError(f"configs/demo.py: argument must be centerclip or baseline, got {arg!r}")
  c = config_lib.base_config()
  c.allow_random_init = True      # trained from scratch: no CLIP weights to convert
  c.dataset = "synthetic_video_text"
  c.train_split = "train"
  c.val_split = "val"
  c.eval_split = "test"
  c.model = config_lib.model_config(max_frames=8, num_blocks=3, tokens_per_frame=16)
  c.model.clip_dims = dict(
      embed_dim=128, image_resolution=32, vision_layers=3, vision_width=128,
      vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=128,
      transformer_heads=2, transformer_layers=2)
  c.model.max_words = 24
  c.model.target_frames_blocks = (8, 4, 4)
  c.model.cluster_num_blocks = (16, 8, 8)
  c.model.cluster_inter = 1 if arg == "centerclip" else 0
  c.train.global_batch_size = 64
  c.train.num_epochs = 10
  c.train.lr = 1e-3
  c.train.coef_lr = 1.0           # random init: every parameter is new
  c.train.freeze_layer_num = -1   # random init: nothing to keep frozen
  c.train.weight_decay = 0.01
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 10_000
  c.train.eval_every_epochs = 100  # select on the final step; the test eval runs at the end
  c.eval.batch_size = 50
  c.data.shuffle_buffer = 2000
  c.data.decode_short_side = 64   # the synthetic frames are 64 x 64
  c.data.train_examples = "videos"  # one random caption per video and epoch
  return c
