"""The one feature schema that every video-text TFDS builder writes.

One example = one video with all its captions:

  video_id:   text, the dataset's own id (e.g. 'video7020').
  frames:     [T, H, W, 3] uint8 frames, each stored as a JPEG (decode lazily: the input
              pipeline loads them with `tfds.decode.SkipDecoding()` and decodes only the
              frames it samples). Resampled to `fps`, shorter side `short_side`.
  num_frames: T.
  fps:        the frame rate of `frames` after resampling.
  captions:   every caption of the video, in the annotation's order (a paragraph dataset
              stores one caption: the sentences joined with a space).
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds


def video_text_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "video_id": tfds.features.Text(),
      "frames": tfds.features.Sequence(
          tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")),
      "num_frames": tfds.features.Scalar(dtype=tf.int32),
      "fps": tfds.features.Scalar(dtype=tf.float32),
      "captions": tfds.features.Sequence(tfds.features.Text()),
  })
