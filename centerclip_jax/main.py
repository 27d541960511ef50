r"""Entry point: `python -m centerclip_jax.main --config configs/msrvtt.py --workdir DIR`.

Flags only; `train.train_and_evaluate(config, workdir)` does the work. Override any config
field with `--config.key=value` (e.g. `--config.mode=eval`, `--config.init_from=DIR`,
`--config.model.cluster_algo=spectral`).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from centerclip_jax.training import trainer as train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # TF is only the input pipeline
  logging.info("running %s (%s)", _CONFIG.value.mode, flags.FLAGS["config"].config_filename)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
