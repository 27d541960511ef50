"""The weight converter: formats, the rules table, extras, storage, errors, and the CLI."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from centerclip_jax.models import clip as clip_lib
from centerclip_jax.weights import porting
from centerclip_jax.weights.porting import CheckpointError
from tests import torch_checkpoints as tc

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_clip_weights.py"
TINY = tc.TINY
W = TINY.vision_width


@pytest.fixture(scope="module")
def model():
  return tc.reference_model(TINY, seed=3)


@pytest.fixture(scope="module")
def torch_sd(model):
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
  folder = tmp_path_factory.mktemp("convert")
  out = {"plain": tc.write_state_dict(model, folder / "plain.pt"),
         "bf16": tc.write_state_dict(model, folder / "bf16.pt", torch.bfloat16),
         "ddp": folder / "ckpt.best.pth.tar", "bare": folder / "pytorch_model.bin.2"}
  tc.write_finetuned(model, out["ddp"], ddp=True)
  tc.write_finetuned(model, out["bare"], ddp=False)
  torch.save(model.state_dict(), folder / "legacy.pt", _use_new_zipfile_serialization=False)
  out["legacy"] = folder / "legacy.pt"
  rounded = tc.reference_model(TINY, seed=3)
  half_names = tc.round_to_fp16_(rounded)
  out["torchscript"] = tc.write_torchscript(rounded, folder / "ViT-tiny.pt", half_names)
  out["rounded_sd"] = {k: v.detach().clone() for k, v in rounded.state_dict().items()}
  out["half_names"] = half_names
  return out


@pytest.fixture(scope="module")
def plain(files):
  state, kind = porting.read_torch_checkpoint(files["plain"])
  return (kind, state) + porting.torch_to_flax(state)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _assert_trees_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


# ----------------------------------------------------------------------------- the rules


def test_rules_table(plain, torch_sd):
  """Every rule, checked on the tensors themselves (block 1 of each tower)."""
  kind, _, config, params, extras, report = plain
  assert kind == "state_dict" and config == TINY and extras == {} and report.prefix == ""
  t = {k: v.numpy() for k, v in torch_sd.items()}
  vis, txt = params["visual"], params
  np.testing.assert_array_equal(vis["conv1"]["kernel"], t["visual.conv1.weight"].transpose(2, 3, 1, 0))
  assert vis["conv1"]["kernel"].shape == (8, 8, 3, W)
  for tower, prefix in ((vis["transformer"], "visual.transformer"), (txt["transformer"], "transformer")):
    block, key = tower["resblocks_1"], f"{prefix}.resblocks.1"
    w, b = t[f"{key}.attn.in_proj_weight"], t[f"{key}.attn.in_proj_bias"]
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
      np.testing.assert_array_equal(block["attn"][name]["kernel"], w[i * W:(i + 1) * W].T)
      np.testing.assert_array_equal(block["attn"][name]["bias"], b[i * W:(i + 1) * W])
    np.testing.assert_array_equal(block["attn"]["out_proj"]["kernel"], t[f"{key}.attn.out_proj.weight"].T)
    np.testing.assert_array_equal(block["mlp"]["c_fc"]["kernel"], t[f"{key}.mlp.c_fc.weight"].T)
    np.testing.assert_array_equal(block["mlp"]["c_proj"]["bias"], t[f"{key}.mlp.c_proj.bias"])
    np.testing.assert_array_equal(block["ln_2"]["scale"], t[f"{key}.ln_2.weight"])
    np.testing.assert_array_equal(block["ln_2"]["bias"], t[f"{key}.ln_2.bias"])
  np.testing.assert_array_equal(txt["token_embedding"]["embedding"], t["token_embedding.weight"])
  for name in ("text_projection", "positional_embedding", "logit_scale"):
    np.testing.assert_array_equal(txt[name], t[name])
  for name in ("class_embedding", "positional_embedding", "proj"):
    np.testing.assert_array_equal(vis[name], t[f"visual.{name}"])
  np.testing.assert_array_equal(vis["ln_post"]["scale"], t["visual.ln_post.weight"])
  np.testing.assert_array_equal(params["ln_final"]["bias"], t["ln_final.bias"])
  assert all(v.dtype == np.float32 for v in _flat(params).values())


def test_tree_matches_flax_init(plain):
  """Same paths and shapes as the Flax model's own `init_params`."""
  params = plain[3]
  init = jax.eval_shape(lambda rng: clip_lib.init_params(TINY, rng), jax.random.key(0))
  assert {k: v.shape for k, v in _flat(params).items()} == {
      k: v.shape for k, v in _flat(init).items()}
  assert plain[5].num_params == sum(v.size for v in _flat(params).values())


def test_legacy_pickle_format(files, plain):
  state, kind = porting.read_torch_checkpoint(files["legacy"])
  assert kind == "state_dict"
  _assert_trees_equal(porting.torch_to_flax(state)[1], plain[3])


def test_torchscript_archive(files):
  state, kind = porting.read_torch_checkpoint(files["torchscript"])
  assert kind == "torchscript"
  for name in ("input_resolution", "context_length", "vocab_size"):
    assert name not in state
  raw = torch.jit.load(str(files["torchscript"])).state_dict()
  assert {str(raw[n].dtype) for n in files["half_names"]} == {"torch.float16"}
  assert all(v.dtype == np.float32 for v in state.values())
  assert sorted(state) == sorted(files["rounded_sd"])
  for k, v in files["rounded_sd"].items():
    np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)
  config, params, extras, _ = porting.torch_to_flax(state)
  assert config == TINY and extras == {}


def test_bfloat16_state_dict(files, torch_sd):
  state, _ = porting.read_torch_checkpoint(files["bf16"])
  key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
  assert state[key].dtype == np.float32
  np.testing.assert_array_equal(state[key], torch_sd[key].to(torch.bfloat16).float().numpy())
  assert not np.array_equal(state[key], torch_sd[key].numpy())


@pytest.mark.parametrize("which,prefix", [("ddp", "module.clip."), ("bare", "clip.")])
def test_finetuned_prefixes_and_extras(files, plain, which, prefix):
  state, kind = porting.read_torch_checkpoint(files[which])
  assert kind == "finetuned"
  config, params, extras, report = porting.torch_to_flax(state)
  assert config == TINY and report.prefix == prefix
  _assert_trees_equal(params, plain[3])
  expected = tc.finetuned_extras(TINY)
  float_names = {k for k, v in expected.items() if v.is_floating_point()}
  assert set(extras) == float_names and len(float_names) == 4
  for k in float_names:
    assert extras[k].dtype == np.float32
    np.testing.assert_array_equal(extras[k], expected[k].numpy())
  assert report.ignored == ("clip.visual.position_ids",)
  assert set(report.extras) == float_names


# ----------------------------------------------------------------------------- bad files


def _one_line_error(path, *fragments):
  with pytest.raises(CheckpointError) as info:
    porting.read_torch_checkpoint(path)
  msg = str(info.value)
  assert "\n" not in msg and str(path) in msg, msg
  for fragment in fragments:
    assert fragment in msg, msg
  assert isinstance(info.value, ValueError)
  return msg


def test_truncated_files(files, tmp_path):
  for name in ("plain", "legacy", "torchscript"):
    data = files[name].read_bytes()
    cut = tmp_path / f"{name}.pt"
    cut.write_bytes(data[: len(data) // 2])
    msg = _one_line_error(cut)
    assert "truncated" in msg or "corrupt" in msg, msg


def test_random_bytes_and_empty_file(tmp_path):
  noise = tmp_path / "noise.pt"
  noise.write_bytes(b"\x13" + np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  _one_line_error(noise, "not a PyTorch checkpoint")
  empty = tmp_path / "empty.bin"
  empty.write_bytes(b"")
  _one_line_error(empty, "not a PyTorch checkpoint")
  _one_line_error(tmp_path / "absent.pt", "no such file")


def test_not_a_clip_state_dict(tmp_path):
  path = tmp_path / "linear.pth"
  torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).state_dict(), path)
  _one_line_error(path, "not a CLIP checkpoint", "token_embedding.weight")
  notes = tmp_path / "list.pt"
  torch.save([1, 2, 3], notes)
  _one_line_error(notes, "not a state dict")


def test_resnet_clip_is_refused(tmp_path, torch_sd):
  text_keys = {k: v for k, v in torch_sd.items() if not k.startswith("visual.")}
  resnet = dict(text_keys, **{"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
                              "visual.attnpool.positional_embedding": torch.zeros(50, 2048),
                              "visual.attnpool.c_proj.weight": torch.zeros(32, 2048)})
  path = tmp_path / "RN50.pt"
  torch.save(resnet, path)
  _one_line_error(path, "ResNet")


def test_hugging_face_layout_is_refused(tmp_path):
  path = tmp_path / "pytorch_model.bin"
  torch.save({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
              "vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4)}, path)
  _one_line_error(path, "Hugging Face")


def test_pickled_module_is_refused(tmp_path, model):
  path = tmp_path / "whole_model.pt"
  torch.save(model, path)
  _one_line_error(path, "refused to unpickle", "weights_only")


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_not_executed(tmp_path, writer):
  marker = str(tmp_path / "PWNED")
  path = tmp_path / "evil.pt"
  if writer == "torch.save":
    torch.save({"visual.proj": torch.zeros(2, 2), "hook": _Payload(marker)}, path)
  else:
    path.write_bytes(pickle.dumps({"hook": _Payload(marker)}, protocol=2))
  msg = _one_line_error(path, "refused to unpickle")
  assert "mkdir" in msg, msg
  assert not os.path.exists(marker)


# ----------------------------------------------------------------------------- key errors


def _numpy_sd(torch_sd):
  return {k: v.numpy().copy() for k, v in torch_sd.items()}


def _key_error(state) -> str:
  with pytest.raises(CheckpointError) as info:
    porting.torch_to_flax(state)
  return str(info.value)


def test_missing_keys_are_all_listed(torch_sd):
  state = _numpy_sd(torch_sd)
  del state["visual.transformer.resblocks.1.ln_2.bias"], state["ln_final.bias"]
  msg = _key_error(state)
  assert "missing 2" in msg and "visual.transformer.resblocks.1.ln_2.bias" in msg
  assert "ln_final.bias" in msg and "unused" not in msg


def test_unused_keys_are_all_listed(torch_sd):
  state = _numpy_sd(torch_sd)
  state["visual.transformer.resblocks.0.attn.bias_k"] = np.zeros((1, 1, W), np.float32)
  state["text_pooler.weight"] = np.zeros((3, 3), np.float32)
  state["input_resolution"] = np.array(32)  # dropped by the reader, not by torch_to_flax
  msg = _key_error(state)
  for key in ("visual.transformer.resblocks.0.attn.bias_k", "text_pooler.weight", "input_resolution"):
    assert key in msg, msg
  assert "unused 3" in msg and "missing" not in msg


def test_misshaped_keys_are_all_listed(torch_sd):
  state = _numpy_sd(torch_sd)
  state["visual.proj"] = state["visual.proj"][:, :16]
  state["transformer.resblocks.0.mlp.c_fc.weight"] = state["transformer.resblocks.0.mlp.c_fc.weight"].T
  state["visual.transformer.resblocks.1.attn.in_proj_weight"] = np.zeros((2 * W, W), np.float32)
  msg = _key_error(state)
  assert "mis-shaped 3" in msg, msg
  assert f"visual.proj [{W}, 16] (expected [{W}, 32])" in msg
  assert f"transformer.resblocks.0.mlp.c_fc.weight [{W}, {4 * W}] (expected [{4 * W}, {W}])" in msg
  assert f"visual.transformer.resblocks.1.attn.in_proj_weight [{2 * W}, {W}] (expected [{3 * W}, {W}])" in msg


def test_all_problems_reported_at_once(torch_sd):
  state = _numpy_sd(torch_sd)
  del state["visual.ln_pre.weight"]
  state["visual.extra_token"] = np.zeros((W,), np.float32)
  state["visual.ln_post.bias"] = np.zeros((W + 1,), np.float32)
  msg = _key_error(state)
  assert "missing 1" in msg and "unused 1" in msg and "mis-shaped 1" in msg
  for key in ("visual.ln_pre.weight", "visual.extra_token", "visual.ln_post.bias"):
    assert key in msg, msg


def test_impossible_width_is_a_clear_error(torch_sd):
  state = _numpy_sd(torch_sd)
  state["ln_final.weight"] = np.zeros((W + 1,), np.float32)  # the text width is inferred from it
  assert "text width 129" in _key_error(state)


# ----------------------------------------------------------------------------- storage


def test_save_and_load_round_trip(files, tmp_path):
  state, kind = porting.read_torch_checkpoint(files["ddp"])
  config, params, extras, report = porting.torch_to_flax(state)
  meta = porting.conversion_metadata(files["ddp"], kind, report)
  out = porting.save_converted(tmp_path / "ft", config, params, extras, meta)
  assert sorted(p.name for p in out.iterdir()) == ["clip_config.json", "conversion.json", "params"]
  config2, params2, extras2 = porting.load_converted(out)
  assert config2 == config
  _assert_trees_equal(params2, params)
  assert sorted(extras2) == sorted(extras)
  for k in extras:
    np.testing.assert_array_equal(extras2[k], extras[k])
  written = json.loads((out / "conversion.json").read_text())
  assert written["source_kind"] == "finetuned" and written["key_prefix"] == "module.clip."
  assert written["source_sha256"] == porting.file_sha256(files["ddp"])
  assert sorted(written["extras"]) == sorted(extras) and "torch" in written["versions"]
  with pytest.raises(FileExistsError):
    porting.save_converted(out, config, params, extras, meta)
  assert not list(tmp_path.glob(".ft.tmp-*"))


def test_load_converted_errors(plain, tmp_path):
  with pytest.raises(CheckpointError, match="convert_clip_weights.py"):
    porting.load_converted(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="not a converted CLIP checkpoint"):
    porting.load_converted(tmp_path / "empty")
  _, _, config, params, extras, report = plain
  out = porting.save_converted(tmp_path / "c", config, params, extras, {"source": "test"})
  cfg = json.loads((out / "clip_config.json").read_text())
  (out / "clip_config.json").write_text(json.dumps(dict(cfg, vision_layers=3)))
  with pytest.raises(CheckpointError) as info:
    porting.load_converted(out)
  assert "missing" in str(info.value) and "visual/transformer/resblocks_2/ln_1/scale" in str(info.value)


# ----------------------------------------------------------------------------- the CLI


def _run_tool(*args):
  return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_converts_verifies_and_refuses_to_overwrite(files, plain, tmp_path):
  out = tmp_path / "vit_tiny"
  done = _run_tool("--input", files["ddp"], "--output", out, "--verify")
  assert done.returncode == 0, done.stdout + done.stderr
  assert "verify: max abs diff" in done.stdout and "extra tensor frame_position_embeddings" in done.stdout
  config, params, extras = porting.load_converted(out)
  assert config == TINY and len(extras) == 4
  _assert_trees_equal(params, plain[3])
  stamp = (out / "conversion.json").read_text()
  again = _run_tool("--input", files["plain"], "--output", out)
  assert again.returncode == 2 and "--overwrite" in again.stderr
  assert (out / "conversion.json").read_text() == stamp


def test_cli_main_in_process(files, tmp_path, caplog):
  tool = _import_tool()
  out = tmp_path / "c"
  caplog.set_level(logging.INFO)
  assert tool.main(["--input", str(files["plain"]), "--output", str(out)]) == 0
  assert tool.main(["--input", str(files["bf16"]), "--output", str(out), "--overwrite"]) == 0
  assert json.loads((out / "conversion.json").read_text())["source"].endswith("bf16.pt")
  junk = tmp_path / "junk.pt"
  junk.write_bytes(b"not a checkpoint at all")
  caplog.clear()
  assert tool.main(["--input", str(junk), "--output", str(tmp_path / "x")]) == 1
  errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert len(errors) == 1 and str(junk) in errors[0] and "\n" not in errors[0]
  assert not (tmp_path / "x").exists()
  other = tmp_path / "mine"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  assert tool.main(["--input", str(files["plain"]), "--output", str(other), "--overwrite"]) == 2
  assert (other / "notes.txt").read_text() == "keep me"


def _import_tool():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("convert_clip_weights", TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
