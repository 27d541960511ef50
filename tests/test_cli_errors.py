"""Every user-facing command, fed bad input as a subprocess: exit status != 0, one line on
stderr naming the field or file, no traceback, and nothing computed (each fails before
any dataset is read or anything compiles, so each case takes a few seconds)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")
MSRVTT = str(REPO / "configs" / "msrvtt.py")
UNWRITABLE = "/proc/centerclip_no_such_dir/out"  # mkdir fails there, even for root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  (root / "a_file").write_text("not a folder")
  (root / "bad_utf8.txt").write_bytes(b"a dog runs\n\xff\xfe broken\n")
  (root / "caps.txt").write_text("a dog runs\n")
  (root / "empty_data").mkdir()
  return root


def run(args, env_extra=None, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def assert_one_line_error(proc, *needles):
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
  assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr[-3000:]}"
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


MAIN = ["-m", "centerclip_jax.main"]


def main_cases(f):
  data = f"--config.data_dir={f / 'empty_data'}"
  return {
      "workdir_is_file": ([*MAIN, "--config", DEMO, "--workdir", str(f / "a_file"), data],
                          ("--workdir", "a_file", "is a file")),
      "workdir_unwritable": ([*MAIN, "--config", DEMO, "--workdir", UNWRITABLE, data],
                             ("--workdir", "cannot write")),
      "workdir_under_file": ([*MAIN, "--config", DEMO, "--workdir", str(f / "a_file" / "w")],
                             ("--workdir", "a_file")),
      "data_dir_is_file": ([*MAIN, "--config", DEMO, "--workdir", str(f / "w1"),
                            f"--config.data_dir={f / 'a_file'}"], ("data_dir", "a_file")),
      "config_missing": ([*MAIN, "--config", "configs/nope.py", "--workdir", str(f / "w2")],
                         ("--config", "configs/nope.py", "no such config file")),
      "config_arg_bad": ([*MAIN, "--config", DEMO + ":bogus", "--workdir", str(f / "w2")],
                         ("centerclip or baseline",)),
      "misspelt_key": ([*MAIN, "--config", DEMO, "--workdir", str(f / "w3"),
                        "--config.trian.lr=1"], ("--config.trian.lr", 'did you mean "train"')),
      "misspelt_leaf": ([*MAIN, "--config", DEMO, "--workdir", str(f / "w3"),
                         "--config.train.lrr=1"], ("--config.train.lrr", 'did you mean "lr"')),
      "bad_value": ([*MAIN, "--config", DEMO, "--workdir", str(f / "w3"),
                     "--config.train.global_batch_size=many"], ("global_batch_size",)),
      "random_weights": ([*MAIN, "--config", MSRVTT, "--workdir", str(f / "w4")],
                         ("config.init_from", "convert_clip_weights.py", "allow_random_init")),
      "eval_batch_zero": ([*MAIN, "--config", DEMO, "--workdir", str(f / "w5"), data,
                           "--config.eval.batch_size=0"], ("eval.batch_size",)),
      # A True/False switch is accepted where the original's 0/1 is (the int key
      # cluster_inter, the bool pre_norm); the run then stops at the bad workdir.
      "switches_parse": ([*MAIN, "--config", DEMO, "--workdir", str(f / "a_file"), data,
                          "--config.model.cluster_inter=True", "--config.model.pre_norm=0"],
                         ("--workdir",)),
  }


ENCODE = ["-m", "centerclip_jax.encode"]


def encode_cases(f):
  base = [*ENCODE, "--config", MSRVTT, "--config.allow_random_init=True"]
  caps = ["--captions", str(f / "caps.txt")]
  return {
      "output_missing_folder": ([*base, *caps, "--output", str(f / "nope" / "out.npz")],
                                ("--output", "does not exist")),
      "output_is_folder": ([*base, *caps, "--output", str(f)], ("--output", "is a folder")),
      "output_unwritable": ([*base, *caps, "--output", UNWRITABLE], ("--output",)),
      "batch_size_zero": ([*base, *caps, "--output", str(f / "o.npz"), "--batch_size=0"],
                          ("--batch_size", ">= 1")),
      "fps_negative": ([*base, "--videos", str(f / "caps.txt"), "--output", str(f / "o.npz"),
                        "--fps=-1"], ("--fps", "> 0")),
      "video_missing": ([*base, "--videos", str(f / "a.mp4"), str(f / "b.mp4"),
                         "--output", str(f / "o.npz")], ("--videos", "a.mp4", "no such file")),
      "captions_not_utf8": ([*base, "--captions", str(f / "bad_utf8.txt"),
                             "--output", str(f / "o.npz")], ("bad_utf8.txt", "line 2", "UTF-8")),
      "random_weights": ([*ENCODE, "--config", MSRVTT, *caps, "--output", str(f / "o.npz")],
                         ("config.init_from",)),
      "config_missing": ([*ENCODE, "--config", "nope.py", *caps, "--output", str(f / "o.npz")],
                         ("--config", "nope.py")),
  }


SEARCH = ["-m", "centerclip_jax.search"]


def search_cases(f):
  index = ["index", "--config", MSRVTT, "--videos", str(f), "--index", str(f / "idx")]
  return {
      "index_batch_zero": ([*SEARCH, *index, "--batch_size=0"], ("--batch_size", ">= 1")),
      "index_fps_negative": ([*SEARCH, *index, "--fps=-1"], ("--fps", "> 0")),
      "index_misspelt_key": ([*SEARCH, *index, "--config.modle.max_frames=4"],
                             ("--config.modle.max_frames", "no field 'modle'", "did you mean")),
      "index_random_weights": ([*SEARCH, *index], ("config.init_from",)),
      "query_top_k_zero": ([*SEARCH, "query", "--index", str(f / "idx"), "--top_k=0", "a dog"],
                           ("--top_k", ">= 1")),
  }


CONVERT = [str(REPO / "tools" / "convert_clip_weights.py")]


def convert_cases(f):
  return {
      "input_missing": ([*CONVERT, "--input", str(f / "nope.pt"), "--output", str(f / "c1")],
                        ("nope.pt", "no such file")),
      "input_is_folder": ([*CONVERT, "--input", str(f), "--output", str(f / "c2")],
                          ("--input", "is a folder")),
      "input_not_torch": ([*CONVERT, "--input", str(f / "caps.txt"), "--output", str(f / "c3")],
                          ("caps.txt", "not a PyTorch checkpoint")),
      "output_under_file": ([*CONVERT, "--input", str(f / "caps.txt"),
                             "--output", str(f / "a_file" / "c")], ("--output", "a_file")),
  }


VISUALIZE = ["-m", "centerclip_jax.visualize"]


def visualize_cases(f):
  base = [*VISUALIZE, "--config", MSRVTT, "--config.allow_random_init=True"]
  return {
      "video_missing": ([*base, "--video", str(f / "v.mp4"), "--output", str(f / "png")],
                        ("--video", "v.mp4", "no such file")),
      "fps_negative": ([*base, "--video", str(f / "caps.txt"), "--output", str(f / "png"),
                        "--fps=-1"], ("--fps",)),
      "output_is_file": ([*base, "--video", str(f / "caps.txt"), "--output", str(f / "a_file")],
                         ("--output", "a_file")),
      "config_missing": ([*VISUALIZE, "--config", "nope.py", "--video", "x", "--output", "y"],
                         ("--config", "nope.py")),
      "tool_wrapper": ([str(REPO / "tools" / "visualize_clusters.py"), "--config", MSRVTT,
                        "--video", str(f / "v.mp4"), "--output", str(f / "png")],
                       ("--video", "v.mp4")),
  }


CASES = {"main": main_cases, "encode": encode_cases, "search": search_cases,
         "convert": convert_cases, "visualize": visualize_cases}
IDS = [(cmd, name) for cmd, fn in CASES.items() for name in fn(pathlib.Path("/x"))]


@pytest.mark.parametrize("command,case", IDS, ids=[f"{c}-{n}" for c, n in IDS])
def test_bad_input_is_one_line(files, command, case):
  args, needles = CASES[command](files)[case]
  proc = run(args)
  assert_one_line_error(proc, *needles)
  assert not any((files / "empty_data").iterdir()), "a dataset was built before the error"


def test_mesh_constraint_checked_before_the_dataset_is_read(files):
  """6 devices and the demo's global batch 64: one line naming the fields, before the
  dataset is built (its data_dir stays empty) or anything compiles."""
  proc = run([*MAIN, "--config", DEMO, "--workdir", str(files / "mesh"),
              f"--config.data_dir={files / 'empty_data'}"],
             env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=6"})
  line = assert_one_line_error(proc, "config.train.global_batch_size=64", "6 device(s)",
                               "e.g. 60 or 66")
  assert not any((files / "empty_data").iterdir())
  assert "grad_accum" not in line
  proc = run([*MAIN, "--config", DEMO, "--workdir", str(files / "mesh"),
              f"--config.data_dir={files / 'empty_data'}", "--config.train.grad_accum_steps=16"],
             env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert_one_line_error(proc, "config.train.grad_accum_steps=16 = 4 examples",
                        "8 device(s)", "multiple of 128")


def test_the_log_folder_in_tmpdir_does_not_shadow_the_package(tmp_path):
  """Commands without an output folder log under $TMPDIR. Started from $TMPDIR itself,
  a log folder named `centerclip_jax` shadowed the package (a namespace package of logs:
  `main` then failed to find its datasets' files)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
  proc = subprocess.run(
      [sys.executable, "-m", "centerclip_jax.search", "query", "--index",
       str(tmp_path / "no_index"), "a dog"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert_one_line_error(proc, "no_index")
  assert [p for p in tmp_path.iterdir() if p.is_dir()]  # the log folder is there
  code = "import centerclip_jax; print(centerclip_jax.__file__)"
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.stdout.strip() == str(REPO / "centerclip_jax" / "__init__.py"), proc.stdout
