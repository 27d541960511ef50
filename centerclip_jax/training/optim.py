"""AdamW with CLIP4Clip/CenterCLIP parameter groups, schedule, clipping and freezing.

The original (PyTorch) recipe, reproduced here as optax transforms:

* Four groups: pretrained CLIP params (everything under the top-level key `clip`) at
  `lr * coef_lr`, new modules at `lr`; each split into weight decay / no weight decay.
* `warmup_cosine` of CLIP4Clip's BertAdam: with progress x = step / total_steps,
  lr(x) = x / warmup for x < warmup, else 0.5 * (1 + cos(pi * x)). The cosine runs over
  the *whole* progress (not over the post-warm-up part), so the lr steps down from ~1
  to 0.5 * (1 + cos(pi * warmup)) (0.976 for warmup 0.1) when the warm-up ends. Step 0
  (the first update) has lr 0, as in BertAdam, whose step counter starts at 0.
* Gradient clipping at norm 1. CLIP4Clip's BertAdam clips *each parameter tensor*
  separately (`clip_grad_norm_(p, 1.0)` per param); CenterCLIP's loop may also clip the
  global norm first. Default here: global-norm clipping over the trainable params
  (`clip_mode='global'`); `clip_mode='per_param'` is the BertAdam behaviour
  (g * min(1, c / (||g|| + 1e-6)) per tensor, PyTorch's formula); `'none'` disables it.
* BertAdam has no Adam bias correction; optax AdamW has. Default: bias correction on
  (AdamW); `adam_bias_correction=False` gives BertAdam's update m / (sqrt(v) + eps).
* `freeze_layer_num > -1` freezes every pretrained param except ln_final,
  text_projection, logit_scale, visual ln_post and proj, and the residual blocks with
  index >= freeze_layer_num of both towers. Frozen params get zero updates, no weight
  decay, no Adam state, and do not count in the global gradient norm (in PyTorch they
  have no gradient at all).
* No weight decay on biases and on LayerNorm params. Note: CLIP4Clip's PyTorch rule is
  a substring match on ['bias', 'LayerNorm.bias', 'LayerNorm.weight'], which in CLIP
  (LayerNorms named ln_1, ln_2, ...) only catches biases: CLIP's LayerNorm *weights*
  were decayed. `decay_norm_scales=True` reproduces that.

Param paths: the retrieval model's tree is {'clip': <CLIP tree of models/clip.py>,
<new modules...>}.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

FROZEN = "frozen"
GROUPS = ("pretrained_decay", "pretrained_no_decay", "new_decay", "new_no_decay")
_NORM_MODULE = re.compile(r"(^|_)ln($|_|\d)|norm", re.IGNORECASE)
_RESBLOCK = re.compile(r"^resblocks_(\d+)$")


# ----------------------------------------------------------------------------- schedule


def warmup_cosine_schedule(base_lr: float, total_steps: int,
                           warmup_proportion: float = 0.1) -> optax.Schedule:
  """CLIP4Clip's BertAdam `warmup_cosine` as an optax schedule of the update index.

  lr(step) = base_lr * f(x), x = min(step / total_steps, 1),
  f(x) = x / warmup if x < warmup else 0.5 * (1 + cos(pi * x)).
  Progress is clamped at 1 (the original never runs past `t_total`, where the cosine
  would rise again).
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be a positive number of optimizer updates, got "
                     f"{total_steps}")
  if not (warmup_proportion < 1.0):
    raise ValueError(f"warmup_proportion must be < 1 (a fraction of total_steps), got "
                     f"{warmup_proportion}")
  warmup = float(warmup_proportion)

  def schedule(step):
    x = jnp.minimum(jnp.asarray(step, jnp.float32) / float(total_steps), 1.0)
    cosine = jnp.square(jnp.cos(0.5 * math.pi * x))  # = 0.5 * (1 + cos(pi x)), exact near x = 1.
    if warmup > 0:
      f = jnp.where(x < warmup, x / warmup, cosine)
    else:
      f = cosine
    return base_lr * f

  return schedule


# ----------------------------------------------------------------------------- groups


def _names(path) -> Tuple[str, ...]:
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(str(k.idx))
    else:
      out.append(str(k))
  return tuple(out)


def _clip_param_trainable_when_frozen(names: Tuple[str, ...], freeze_layer_num: int) -> bool:
  """CLIP4Clip's `freeze_cip_layers` rule; `names` is the path inside the CLIP tree."""
  if names[:1] in (("ln_final",), ("text_projection",), ("logit_scale",)):
    return True
  if names[:2] in (("visual", "ln_post"), ("visual", "proj")):
    return True
  if names[:1] == ("transformer",):
    block = names[1:2]
  elif names[:2] == ("visual", "transformer"):
    block = names[2:3]
  else:
    return False
  m = _RESBLOCK.match(block[0]) if block else None
  return bool(m) and int(m.group(1)) >= freeze_layer_num


def _no_decay(names: Tuple[str, ...], decay_norm_scales: bool) -> bool:
  leaf = names[-1]
  parent = names[-2] if len(names) > 1 else ""
  if leaf == "bias":
    return True
  if leaf == "scale" and _NORM_MODULE.search(parent):
    return not decay_norm_scales
  return False


def param_groups(params: PyTree, *, pretrained_prefix: str = "clip", freeze_layer_num: int = -1,
                 decay_norm_scales: bool = False) -> PyTree:
  """Tree of group labels, one per param leaf.

  Labels: 'frozen', 'pretrained_decay', 'pretrained_no_decay', 'new_decay',
  'new_no_decay'. Pretrained = under the top-level key `pretrained_prefix`.
  """
  if freeze_layer_num < -1:
    raise ValueError(f"freeze_layer_num must be >= -1 (-1: freeze nothing), got "
                     f"{freeze_layer_num}")

  def label(path, _):
    names = _names(path)
    pretrained = names[:1] == (pretrained_prefix,)
    if (pretrained and freeze_layer_num > -1
        and not _clip_param_trainable_when_frozen(names[1:], freeze_layer_num)):
      return FROZEN
    group = "pretrained" if pretrained else "new"
    return f"{group}_no_decay" if _no_decay(names, decay_norm_scales) else f"{group}_decay"

  return jax.tree_util.tree_map_with_path(label, params)


# ----------------------------------------------------------------------------- transforms


def clip_by_tensor_norm(max_norm: float) -> optax.GradientTransformation:
  """Clips each gradient tensor to norm `max_norm` separately (BertAdam's per-param clip).

  g -> g * min(1, max_norm / (||g|| + 1e-6)), PyTorch's `clip_grad_norm_` on one tensor.
  """

  def update_fn(updates, state, params=None):
    del params

    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
      return (g * coef).astype(g.dtype)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class ScaleByAdamNoBiasState(NamedTuple):
  mu: PyTree
  nu: PyTree


def scale_by_adam_no_bias_correction(b1: float, b2: float, eps: float
                                     ) -> optax.GradientTransformation:
  """BertAdam's moment update without bias correction: m / (sqrt(v) + eps)."""

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, jnp.float32)
    return ScaleByAdamNoBiasState(jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    out = jax.tree.map(lambda m, v, g: (m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu, nu, updates)
    return out, ScaleByAdamNoBiasState(mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    params: PyTree,
    *,
    lr: float,
    coef_lr: float,
    total_steps: int,
    warmup_proportion: float = 0.1,
    weight_decay: float = 0.2,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-6,
    clip_norm: Optional[float] = 1.0,
    clip_mode: str = "global",
    grad_accum_steps: int = 1,
    freeze_layer_num: int = -1,
    pretrained_prefix: str = "clip",
    adam_bias_correction: bool = True,
    decay_norm_scales: bool = False,
) -> Tuple[optax.GradientTransformation, Dict[str, optax.Schedule]]:
  """The CLIP4Clip/CenterCLIP optimizer as one optax transformation.

  Args:
    params: the model params (or their `jax.eval_shape` structure); used to check the
      tree and to build the group labels.
    lr: base learning rate of the new modules.
    coef_lr: the pretrained CLIP params train at `lr * coef_lr`.
    total_steps: number of optimizer *updates* (micro-batches / grad_accum_steps).
    warmup_proportion: fraction of total_steps of linear warm-up (then cosine; see the
      module docstring for the exact shape).
    weight_decay: decoupled weight decay (lr-scaled, as AdamW and BertAdam).
    b1, b2, eps: Adam constants (CLIP4Clip: 0.9, 0.98, 1e-6).
    clip_norm: gradient clipping threshold; None or <= 0 disables clipping.
    clip_mode: 'global' (global norm over trainable params), 'per_param' (each tensor,
      as BertAdam) or 'none'.
    grad_accum_steps: k > 1 wraps everything in `optax.MultiSteps`: k micro-batch
      gradients are averaged, and the k-th call applies one update (the others return
      zero updates).
    freeze_layer_num: -1 trains everything; n >= 0 freezes CLIP as CLIP4Clip does.
    pretrained_prefix: top-level key of the pretrained CLIP params.
    adam_bias_correction: False gives BertAdam's (uncorrected) moments.
    decay_norm_scales: True decays LayerNorm scales (CLIP4Clip's literal rule).

  Returns:
    (transformation, {'pretrained': schedule, 'new': schedule}); the schedules map the
    optimizer-update index (0 for the first update) to the learning rate, for logging.
  """
  if clip_mode not in ("global", "per_param", "none"):
    raise ValueError(f"clip_mode must be 'global', 'per_param' or 'none', got {clip_mode!r}")
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
  if lr < 0 or coef_lr < 0:
    raise ValueError(f"lr ({lr}) and coef_lr ({coef_lr}) must be >= 0")
  if not isinstance(params, Mapping):
    raise ValueError("make_optimizer: params must be a dict tree "
                     f"({{'{pretrained_prefix}': <CLIP params>, ...}}), got {type(params).__name__}")
  if freeze_layer_num > -1 and pretrained_prefix not in params:
    raise ValueError(
        f"make_optimizer: freeze_layer_num={freeze_layer_num} freezes the pretrained params "
        f"under the top-level key {pretrained_prefix!r}, but params has only the keys "
        f"{sorted(params)}; set pretrained_prefix to the CLIP subtree's key")

  schedules = {
      "pretrained": warmup_cosine_schedule(lr * coef_lr, total_steps, warmup_proportion),
      "new": warmup_cosine_schedule(lr, total_steps, warmup_proportion),
  }
  label_fn = lambda p: param_groups(p, pretrained_prefix=pretrained_prefix,
                                    freeze_layer_num=freeze_layer_num,
                                    decay_norm_scales=decay_norm_scales)
  label_fn(params)  # Fails early on a bad tree.

  def adam():
    if adam_bias_correction:
      return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    return scale_by_adam_no_bias_correction(b1, b2, eps)

  def group(schedule, decay):
    parts = [adam()]
    if decay and weight_decay > 0:
      parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)

  transforms = {FROZEN: optax.set_to_zero()}
  for name in GROUPS:
    source = "pretrained" if name.startswith("pretrained") else "new"
    transforms[name] = group(schedules[source], decay=name.endswith("_decay")
                             and not name.endswith("no_decay"))

  chain = []
  if clip_norm is not None and clip_norm > 0 and clip_mode != "none":
    if clip_mode == "global":
      trainable = lambda p: jax.tree.map(lambda l: l != FROZEN, label_fn(p))
      chain.append(optax.masked(optax.clip_by_global_norm(clip_norm), trainable))
    else:
      chain.append(clip_by_tensor_norm(clip_norm))
  chain.append(optax.multi_transform(transforms, label_fn))
  tx = optax.chain(*chain)
  if grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps).gradient_transformation()
  return tx, schedules


def clamp_logit_scale(params: PyTree, *, min_value: Optional[float] = 0.1,
                      max_value: Optional[float] = math.log(100.0),
                      pretrained_prefix: str = "clip") -> PyTree:
  """Clamps params[pretrained_prefix]['logit_scale'] after an update.

  CLIP4Clip clamps to max ln(100) after every step; CenterCLIP to [0.1, ln(100)].
  """
  clip_params = params.get(pretrained_prefix) if isinstance(params, Mapping) else None
  if clip_params is None or "logit_scale" not in clip_params:
    raise ValueError(f"clamp_logit_scale: no params['{pretrained_prefix}']['logit_scale']")
  value = jnp.clip(clip_params["logit_scale"], min_value, max_value)
  return {**params, pretrained_prefix: {**clip_params, "logit_scale": value}}
