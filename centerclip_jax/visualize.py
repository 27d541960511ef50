r"""Draw which patch tokens CenterCLIP's clustering keeps, like the paper's figure.

  python -m centerclip_jax.visualize --config configs/msrvtt.py \
      [--config.init_from=CKPT] --video clip.mp4 --output out_dir [--scale 2]

(`tools/visualize_clusters.py` is the same program.) For every clustering step and every
segment of the video it writes `step<i>_segment<s>.png`: the segment's frames side by side
(the model's uint8 input frames after resizing and cropping, each upscaled `--scale`
times), every patch the step clusters tinted by its cluster's colour (K distinct
colours, alpha-blended), each medoid patch outlined by a white rectangle; patches that an
earlier step already dropped are darkened. It also prints the kept medoids (frame, patch
row and column). The medoids come from `centerclip_jax.inference.clusters`, i.e. from the
model's own modules and clustering code. Steps after an `aggregation='mean'` step keep
cluster means, not patches: those are listed, not drawn. Logs go to `OUTPUT/log.txt`.
"""

from __future__ import annotations

import colorsys
import pathlib

from centerclip_jax import console  # pylint: disable=g-import-not-at-top
console.quiet_tensorflow()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image
from PIL import ImageDraw

from centerclip_jax import config as config_lib
from centerclip_jax import console
from centerclip_jax import paths
from centerclip_jax.inference import clusters as cluster_inspect
from centerclip_jax.inference import encoder as encode
from centerclip_jax.weights import loading

OUTLINE = (255, 255, 255)
TINT_ALPHA = 0.45
DROPPED_DARKEN = 0.6


def palette(k: int) -> np.ndarray:
  """`[k, 3]` uint8 distinct colours (golden-angle hues; never white, max channel < 250)."""
  out = []
  for i in range(k):
    hue = (i * 0.618033988749895) % 1.0
    sat = (0.95, 0.6)[(i // 2) % 2] if k > 12 else 0.9
    val = (0.95, 0.7)[i % 2] if k > 12 else 0.95
    out.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)])
  return np.asarray(out, np.uint8).reshape(k, 3)


def outline_width(patch_size: int, scale: int) -> int:
  return max(1, patch_size * scale // 16)


def patch_box(frame: int, patch: int, grid: int, patch_size: int, res: int, scale: int):
  """(x0, y0, x1, y1) pixel box (inclusive) of a patch in the side-by-side image."""
  row, col = divmod(int(patch), grid)
  x0 = (int(frame) * res + col * patch_size) * scale
  y0 = row * patch_size * scale
  size = patch_size * scale
  return x0, y0, x0 + size - 1, y0 + size - 1


def render_segment(frames: np.ndarray, patch_size: int, sources: np.ndarray,
                   assignment: np.ndarray, medoids: np.ndarray, k: int, scale: int = 1
                   ) -> Image.Image:
  """One segment's picture.

  Args:
    frames: `[D, res, res, 3]` uint8 input frames of the segment.
    patch_size: ViT patch size in pixels.
    sources: `[M]` input patch (`frame * N + patch`) of each clustered point.
    assignment: `[M]` cluster of each point.
    medoids: `[K]` medoid point indices.
    k: number of clusters (palette size).
    scale: integer upscaling of every frame.
  Returns:
    RGB image of size (D * res * scale, res * scale).
  """
  d, res = frames.shape[0], frames.shape[1]
  grid = res // patch_size
  n = grid * grid
  strip = np.concatenate(list(frames), axis=1).astype(np.float32)  # [res, D*res, 3]
  strip = np.repeat(np.repeat(strip, scale, axis=0), scale, axis=1)
  colours = palette(k).astype(np.float32)
  clustered = np.zeros(d * n, bool)
  for src, a in zip(sources, assignment):
    x0, y0, x1, y1 = patch_box(src // n, src % n, grid, patch_size, res, scale)
    region = strip[y0:y1 + 1, x0:x1 + 1]
    region[:] = (1 - TINT_ALPHA) * region + TINT_ALPHA * colours[a]
    clustered[src] = True
  for src in np.flatnonzero(~clustered):
    x0, y0, x1, y1 = patch_box(src // n, src % n, grid, patch_size, res, scale)
    strip[y0:y1 + 1, x0:x1 + 1] *= 1 - DROPPED_DARKEN
  image = Image.fromarray(np.clip(np.round(strip), 0, 255).astype(np.uint8), "RGB")
  draw = ImageDraw.Draw(image)
  width = outline_width(patch_size, scale)
  for m in medoids:
    src = int(sources[m])
    draw.rectangle(patch_box(src // n, src % n, grid, patch_size, res, scale),
                   outline=OUTLINE, width=width)
  return image


def visualize(config, video: str, output: str, *, fps: float = 3.0, scale: int = 0
              ) -> list[pathlib.Path]:
  """Writes the PNGs of every drawable step/segment; prints the medoids; returns paths."""
  config_lib.validate(config)
  model, params = loading.load_model(config)
  cfg = model.clip_config
  res, patch = cfg.image_resolution, cfg.vision_patch_size
  scale = scale if scale > 0 else max(1, 224 // res)
  frames, mask, _ = encode.file_inputs(video, fps=fps,
                                       short_side=config.data.decode_short_side,
                                       max_frames=model.max_frames, resolution=res,
                                       jpeg_quality=config.data.jpeg_quality)
  steps = cluster_inspect.cluster_medoids(model, params, frames[None], mask[None])
  rgb = np.asarray(frames)  # uint8 [max_frames, res, res, 3]: what the model saw
  out_dir = paths.user_path(output)  # local or gs://
  out_dir.mkdir(parents=True, exist_ok=True)
  grid = cfg.grid_size
  written = []
  for i, sc in enumerate(steps, start=1):
    st = sc.step
    print(f"step {i}: before block {st.block + 1}, {st.frames_before} -> {st.frames_after} "
          f"segments per video ({sc.input_frames} input frames each), K={st.k} "
          f"({model.settings.algo})")
    patches = sc.medoid_patches()
    if patches is None:
      print("  not drawn: an earlier step averaged its clusters (aggregation='mean'), so "
            "these tokens are not patches; medoid token indices per segment:")
    for s in range(sc.medoids.shape[1]):
      first = s * sc.input_frames
      padded = int((~mask[first:first + sc.input_frames]).sum())
      where = f"  segment {s} (frames {first}-{first + sc.input_frames - 1}" + (
          f", {padded} padding" if padded else "") + ")"
      if patches is None:
        print(f"{where}: {sc.medoids[0, s].tolist()}")
        continue
      kept = " ".join(f"f{first + f}({p // grid},{p % grid})" for f, p in patches[0, s])
      image = render_segment(rgb[first:first + sc.input_frames], patch, sc.sources[0, s],
                             sc.assignment[0, s], sc.medoids[0, s], st.k, scale)
      path = out_dir / f"step{i}_segment{s}.png"
      with path.open("wb") as f:
        image.save(f, format="PNG")
      written.append(path)
      print(f"{where}: kept frame(row,col) {kept} -> {path}")
  return written


def define_flags() -> dict:
  """The CLI's flags (defined only when run as a program)."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Config file."),
      "video": flags.DEFINE_string("video", None, "Video file or .npy frames [T, H, W, 3]."),
      "output": flags.DEFINE_string("output", None, "Folder for the PNGs."),
      "fps": flags.DEFINE_float("fps", 3.0, "Frame rate the video is decoded at."),
      "scale": flags.DEFINE_integer("scale", 0, "Upscaling per frame (0: 224 // resolution)."),
  }


def main(argv, cli_flags):
  if len(argv) > 1:
    console.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config, video, output, fps, scale = (cli_flags[k].value for k in
                                       ("config", "video", "output", "fps", "scale"))
  if config is None or video is None or output is None:
    console.fail("--config, --video and --output are required")
  if scale < 0:
    console.fail(f"--scale must be >= 0 (0: 224 // resolution), got {scale}")
  with console.errors_as_one_line(encode.InputError, ValueError, FileNotFoundError):
    if not pathlib.Path(video).is_file():
      raise encode.InputError(f"--video: {video}: no such file")
    encode.check_fps(fps)
    config_lib.validate(config)
    out = console.make_writable_dir(output, "--output")
    console.setup_logging(None if paths.is_uri(out) else out / "log.txt")
    visualize(config, video, str(out), fps=fps, scale=scale)


def run() -> None:
  """`python -m centerclip_jax.visualize` (and `tools/visualize_clusters.py`)."""
  cli_flags = define_flags()
  app.run(lambda argv: main(argv, cli_flags),
          flags_parser=console.flags_parser("config", config_lib.normalize_switches))


if __name__ == "__main__":
  run()
