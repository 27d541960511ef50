"""Video-text TFDS builders; importing this package registers them with TFDS.

Names: 'msrvtt', 'msvd', 'lsmdc', 'activitynet_captions', 'didemo' (and the
demo 'synthetic_video_text'). Every builder writes `features.video_text_features()`.
"""

from __future__ import annotations

from centerclip_jax.data.datasets.activitynet import ActivitynetCaptions
from centerclip_jax.data.datasets.common import VideoTextBuilder, VideoTextConfig
from centerclip_jax.data.datasets.didemo import Didemo
from centerclip_jax.data.datasets.lsmdc import Lsmdc
from centerclip_jax.data.datasets.msrvtt import Msrvtt
from centerclip_jax.data.datasets.msvd import Msvd

try:
  from centerclip_jax.data.datasets import synthetic  # Registers 'synthetic_video_text'.
except ModuleNotFoundError as e:
  if e.name != f"{__name__}.synthetic":
    raise

BUILDERS = {cls.name: cls for cls in (Msrvtt, Msvd, Lsmdc, ActivitynetCaptions, Didemo)}
