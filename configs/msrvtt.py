r"""MSR-VTT, the paper's main recipe: ViT-B/32, 12 frames, 32 words, `B6 - 4, 49`
k-medoids++, global batch 128, 5 epochs over every (video, caption) pair of the 9k list.

  python -m centerclip_jax.main --config configs/msrvtt.py --workdir runs/msrvtt \
      --config.init_from=clip/ViT-B-32 --config.data_dir=~/tensorflow_datasets

`--config configs/msrvtt.py:train_7k` trains on the 7k list instead of the 9k one.
The 1k-A test split has no validation split beside it: like the original, model
selection uses the test split (`results.json` says so).
"""

from centerclip_jax import config as config_lib


def get_config(arg: str = "train_9k"):
  if arg not in ("train_9k", "train_7k"):
    raise ValueError(f"configs/msrvtt.py: argument must be train_9k or train_7k, got {arg!r}")
  # 9k: every (video, caption) pair once per epoch (the authors' --expand_msrvtt_sentences);
  # 7k: CLIP4Clip's loader, one random caption per video.
  c = config_lib.dataset_config("msrvtt", arg, "", "test_1k",
                                train_examples="captions" if arg == "train_9k" else "videos")
  c.train.lr = 5e-3        # authors' MSR-VTT script: lr 5e-3, coef_lr 1e-3 (CLIP at 5e-6)
  c.train.coef_lr = 1e-3
  return c
