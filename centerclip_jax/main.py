r"""Entry point: `python -m centerclip_jax.main --config configs/msrvtt.py --workdir DIR`.

Flags only; `train.train_and_evaluate(config, workdir)` does the work. Override any config
field with `--config.key=value` (e.g. `--config.mode=eval`, `--config.init_from=DIR`,
`--config.model.cluster_algo=spectral`). The console shows the run's progress and
results; every log line (also of absl, orbax, TensorFlow, JAX) goes to `DIR/log.txt`, and
to the console too with `--verbosity=1`. Bad input ends with one `error:` line (exit 2).
"""

from __future__ import annotations

from centerclip_jax import console  # pylint: disable=g-import-not-at-top
console.quiet_tensorflow()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from centerclip_jax import config as config_lib
from centerclip_jax import console
from centerclip_jax import paths

LOG_FILE = "log.txt"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")


def main(argv):
  if len(argv) > 1:
    console.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
  if _CONFIG.value is None or not _WORKDIR.value:
    console.fail("--config and --workdir are required, e.g. --config configs/demo.py "
                 "--workdir runs/demo")
  with console.errors_as_one_line(ValueError, FileNotFoundError, NotADirectoryError,
                                  PermissionError):
    config_lib.validate(_CONFIG.value)
    if _CONFIG.value.data_dir:
      console.check_input_dir(_CONFIG.value.data_dir, "--config.data_dir")
    workdir = console.make_writable_dir(_WORKDIR.value, "--workdir")
    # A log file only on local disks: logging cannot append to an object in a bucket.
    log = console.setup_logging(None if paths.is_uri(workdir) else workdir / LOG_FILE)
    logging.info("running %s (%s)", _CONFIG.value.mode, flags.FLAGS["config"].config_filename)
    # Imported after the checks above, so that bad input fails in a second or two.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from centerclip_jax.training import trainer as train  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")  # TF is only the input pipeline
    console.say(f"{_CONFIG.value.mode} {flags.FLAGS['config'].config_filename} -> {workdir} "
                f"(log: {log})")
    train.train_and_evaluate(_CONFIG.value, str(workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=console.flags_parser("config", config_lib.normalize_switches))
