"""A video-text dataset built in an Apache Beam pipeline (TFDS's distributed path).

A build whose download config names a Beam runner or pipeline options
(`prepare_data NAME --beam_runner=...`) runs here instead of the process pool:

  * the driver parses the annotations and finds the video files
    (`VideoTextBuilder.plan`), as the pool build does;
  * the pipeline decodes each distinct video once with the pool's per-video
    function (`video.encode_video_jpeg`; no frame cache, workers share no disk),
    emits one example per (split, video) to TFDS's writers and one status record
    per video (error, frames decoded), gathered into one JSON file in the
    dataset's folder;
  * after the pipeline the driver reads the statuses back and records the
    build report with `VideoTextBuilder.sort_out`, the pool build's code.

Needs `apache-beam` (requirements-beam.txt). The videos and the data_dir must
be readable and writable by every worker: on a distributed runner a bucket, from
which each worker copies the one video it decodes (`video.encode_video_jpeg`).
"""

from __future__ import annotations

import json
import os
import re
import time

import apache_beam as beam
from etils import epath

from centerclip_jax.data import video
from centerclip_jax.data.datasets import common

_STATUS = "status"
_STATUS_FILE = "beam_video_status.json"  # In the dataset's folder until the build ends.


def runner_name(download_config) -> str:
  """The runner a download config asks for ('DirectRunner' if only options)."""
  runner = download_config.beam_runner
  if runner is None:
    options = download_config.beam_options.view_as(beam.options.pipeline_options.StandardOptions)
    runner = options.runner or "DirectRunner"
  return runner if isinstance(runner, str) else type(runner).__name__


def decode(unit):
  """(request, [(split index, job)]) -> its examples, tagged by split, and a status."""
  request, jobs = unit
  result = video.encode_video_jpeg(request)
  error = common.decode_error(result)
  yield beam.pvalue.TaggedOutput(_STATUS, {
      "path": request.path, "start": request.start_time, "end": request.end_time,
      "error": error, "num_frames": result.num_frames})
  if error is None:
    for split, job in jobs:
      yield split, (job.video_id, common.make_example(job, result))


def _write_status(statuses, file: str) -> None:
  epath.Path(file).write_text(json.dumps(sorted(statuses, key=json.dumps)))


def split_generators(builder, dl_manager, pipeline):
  """`_split_generators` of a Beam build: {split: PCollection of (key, example)}."""
  splits, paths, unique = builder.plan(dl_manager)
  names = list(splits)
  jobs = {key: [] for key, _ in unique}
  for i, name in enumerate(names):
    for job in splits[name]:
      if (path := paths[name, job.video_id]) is not None:
        jobs[path, job.start_time, job.end_time].append((i, job))
  units = [(builder.request(key[0], job, return_frames=True, cache=False), jobs[key])
           for key, job in unique]
  if not units:  # Every video missing: the pool build's message.
    builder.sort_out(dl_manager, splits, paths, {}, {}, {"videos": 0})
    raise builder.no_video_error(dl_manager)
  status_file = os.fspath(builder.data_path / _STATUS_FILE)
  builder.beam_state = {"dl_manager": dl_manager, "splits": splits, "paths": paths,
                        "videos": len(units), "status_file": status_file,
                        "start": time.perf_counter()}
  decoded = (pipeline
             | "Videos" >> beam.Create(units)
             | "Decode" >> beam.FlatMap(decode).with_outputs(_STATUS, main="examples"))
  _ = (decoded[_STATUS]
       | "GatherStatus" >> beam.combiners.ToList()
       | "WriteStatus" >> beam.Map(_write_status, file=status_file))
  per_split = decoded.examples | "BySplit" >> beam.Partition(
      lambda example, _: example[0], len(names))
  # A split without any video file is left out (TFDS cannot write an empty split).
  return {name: per_split[i] | f"{name}_examples" >> beam.Values()
          for i, name in enumerate(names)
          if any(paths[name, job.video_id] is not None for job in splits[name])}


def explain(builder, error: ValueError) -> ValueError:
  """TFDS's error for a split left empty by the pipeline, in terms of the videos."""
  if not (match := re.search(r"generated examples is 0 for split (\S+?)\.", str(error))):
    return error
  return ValueError(
      f"{builder.name}: no video of split {match.group(1)} could be decoded in the Beam "
      "pipeline, and TFDS cannot write an empty split (the process-pool build, without "
      "--beam_runner, leaves it out and lists its videos in the report)")


def process_result(builder, pipeline_result) -> None:
  """After the pipeline: the statuses -> the build report (`sort_out`)."""
  del pipeline_result
  state = builder.beam_state
  file = epath.Path(state["status_file"])
  errors, frames = {}, {}
  for status in json.loads(file.read_text()):
    key = (status["path"], status["start"], status["end"])
    frames[key] = status["num_frames"]
    if status["error"] is not None:
      errors[key] = status["error"]
  file.unlink()
  if len(frames) != state["videos"]:
    raise RuntimeError(f"{file}: {len(frames)} video statuses for {state['videos']} videos")
  builder.sort_out(state["dl_manager"], state["splits"], state["paths"], errors, frames, {
      "videos": state["videos"], "seconds": time.perf_counter() - state["start"],
      "workers": None, "runner": builder.beam_runner})
