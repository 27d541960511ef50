r"""Draw which patch tokens CenterCLIP's clustering keeps: `centerclip_jax.visualize`.

  python tools/visualize_clusters.py --config configs/msrvtt.py \
      [--config.init_from=CKPT] --video clip.mp4 --output out_dir [--scale 2]

The same program as `python -m centerclip_jax.visualize` (see there).
"""

from centerclip_jax.visualize import *  # pylint: disable=wildcard-import,unused-wildcard-import
from centerclip_jax import visualize as _app

if __name__ == "__main__":
  _app.run()
