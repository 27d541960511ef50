"""The optimizer recipes of CenterCLIP (default) and CLIP4Clip as optax transforms.

`make_optimizer(optimizer='adamw')`, the authors' CenterCLIP runs (torch.optim.AdamW):

* Four groups: pretrained CLIP params (everything under the top-level key `clip`) at
  `lr * coef_lr`, new modules at `lr`; each split into weight decay / no weight decay.
* AdamW as torch: bias-corrected moments, betas (0.9, 0.98), eps 1e-6, decoupled weight
  decay 0.2 applied as `p -= lr_t * wd * p` (lr_t the scheduled lr of the group).
* Schedule per group, t = optimizer-update index (0 for the first update), T updates,
  w = int(warmup_proportion * T): `1e-8 + (lr - 1e-8) t / w` for t < w, then
  `0.5 lr (1 + cos(pi (t - w) / (T - w)))`, floored at 1e-8 (`warmup_linear_cosine`).
* Weight decay on every param except biases: the original's substring rule
  (`bias`, `LayerNorm.bias`, `LayerNorm.weight`) never matches CLIP's `ln_*`, so
  LayerNorm scales ARE decayed.
* Clipping of the global gradient norm over the trainable params at 1.0, with torch's
  `clip_grad_norm_` formula g * min(1, c / (||g|| + 1e-6)).

`optimizer='bertadam'`, CLIP4Clip's BertAdam: no bias correction (m / (sqrt(v) + eps)),
each parameter tensor clipped separately, the same decay rule, and `warmup_cosine`: with
x = t / T, lr x / warmup for x < warmup, else 0.5 lr (1 + cos(pi x)) (the cosine over the
whole progress; the first update has lr 0).

Freezing (both): `freeze_layer_num > -1` freezes every pretrained param except ln_final,
text_projection, logit_scale, visual ln_post and proj, and the residual blocks with
index >= freeze_layer_num of both towers (CLIP4Clip's `freeze_layer_num`; 0 freezes
exactly the token / positional / class embeddings, conv1 and ln_pre). Frozen params get
zero updates, no weight decay, no Adam state, and do not count in the global gradient
norm (in PyTorch they have no gradient at all).

`clip_mode`, `adam_bias_correction` and `decay_norm_scales` override single choices of
a recipe (`decay_norm_scales=False` also spares LayerNorm scales).

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


LR_FLOOR = 1e-8


def warmup_linear_cosine_schedule(base_lr: float, total_steps: int,
                                  warmup_proportion: float = 0.1,
                                  floor: float = LR_FLOOR) -> optax.Schedule:
  """The CenterCLIP runs' schedule of the update index t (0 for the first update).

  w = int(warmup_proportion * total_steps); t < w: floor + (base_lr - floor) * t / w;
  t >= w: max(floor, 0.5 * base_lr * (1 + cos(pi * (t - w) / (T - w)))), clamped at
  t = T. (optax's warmup_cosine_decay_schedule rounds the start of the warm-up to 0 in
  float32, so it is written out.)
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be a positive number of optimizer updates, got "
                     f"{total_steps}")
  if not 0 <= warmup_proportion < 1:
    raise ValueError(f"warmup_proportion must be in [0, 1), got {warmup_proportion}")
  warmup = int(warmup_proportion * total_steps)
  decay = float(total_steps - warmup)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    # 0.5 (1 + cos(pi x)) = sin^2(pi (1 - x) / 2), x = (t - w) / (T - w): accurate near T.
    rest = jnp.clip((total_steps - t) / decay, 0.0, 1.0)
    cosine = base_lr * jnp.square(jnp.sin(0.5 * math.pi * rest))
    if warmup > 0:
      ramp = floor + (base_lr - floor) * (t / warmup)
      cosine = jnp.where(t < warmup, ramp, cosine)
    return jnp.maximum(cosine, floor)

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


def trainable_mask(params: PyTree, *, freeze_layer_num: int = -1,
                   pretrained_prefix: str = "clip") -> PyTree:
  """Tree of bools, one per param leaf: False for the params `freeze_layer_num` freezes."""
  labels = param_groups(params, pretrained_prefix=pretrained_prefix,
                        freeze_layer_num=freeze_layer_num)
  return jax.tree.map(lambda label: label != FROZEN, labels)


# ----------------------------------------------------------------------------- transforms


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """torch's `clip_grad_norm_` over all updates: g * min(1, c / (||g||_global + 1e-6))."""

  def update_fn(updates, state, params=None):
    del params
    norm = optax.global_norm(updates)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


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


# Per recipe: (schedule, clip_mode, adam_bias_correction, decay_norm_scales).
RECIPES = {
    "adamw": (warmup_linear_cosine_schedule, "global", True, True),
    "bertadam": (warmup_cosine_schedule, "per_param", False, True),
}


def make_optimizer(
    params: PyTree,
    *,
    lr: float,
    coef_lr: float,
    total_steps: int,
    optimizer: str = "adamw",
    warmup_proportion: float = 0.1,
    weight_decay: float = 0.2,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-6,
    clip_norm: Optional[float] = 1.0,
    clip_mode: Optional[str] = None,
    grad_accum_steps: int = 1,
    freeze_layer_num: int = -1,
    pretrained_prefix: str = "clip",
    adam_bias_correction: Optional[bool] = None,
    decay_norm_scales: Optional[bool] = None,
) -> Tuple[optax.GradientTransformation, Dict[str, optax.Schedule]]:
  """The CenterCLIP (`'adamw'`) or CLIP4Clip (`'bertadam'`) optimizer as one optax
  transformation (see the module docstring).

  Args:
    params: the model params (or their `jax.eval_shape` structure); used to check the
      tree and to build the group labels.
    lr: base learning rate of the new modules.
    coef_lr: the pretrained CLIP params train at `lr * coef_lr`.
    total_steps: number of optimizer *updates* (micro-batches / grad_accum_steps).
    optimizer: 'adamw' (CenterCLIP's torch.optim.AdamW runs) or 'bertadam' (CLIP4Clip).
    warmup_proportion: fraction of total_steps of warm-up (the shape depends on the
      recipe; see the module docstring).
    weight_decay: decoupled weight decay (lr-scaled, as AdamW and BertAdam).
    b1, b2, eps: Adam constants (0.9, 0.98, 1e-6 in both recipes).
    clip_norm: gradient clipping threshold; None or <= 0 disables clipping.
    clip_mode: None (the recipe's), 'global' (global norm over trainable params),
      'per_param' (each tensor, as BertAdam) or 'none'.
    grad_accum_steps: k > 1 wraps everything in `optax.MultiSteps`: k micro-batch
      gradients are averaged, and the k-th call applies one update (the others return
      zero updates).
    freeze_layer_num: -1 trains everything; n >= 0 freezes CLIP as CLIP4Clip does.
    pretrained_prefix: top-level key of the pretrained CLIP params.
    adam_bias_correction: None (the recipe's); False gives BertAdam's moments.
    decay_norm_scales: None (the recipe's: True, the original's rule); False spares
      LayerNorm scales from weight decay.

  Returns:
    (transformation, {'pretrained': schedule, 'new': schedule}); the schedules map the
    optimizer-update index (0 for the first update) to the learning rate, for logging.
  """
  if optimizer not in RECIPES:
    raise ValueError(f"optimizer must be one of {sorted(RECIPES)}, got {optimizer!r}")
  schedule_fn, default_clip, default_bias, default_norm = RECIPES[optimizer]
  clip_mode = default_clip if clip_mode is None else clip_mode
  adam_bias_correction = default_bias if adam_bias_correction is None else adam_bias_correction
  decay_norm_scales = default_norm if decay_norm_scales is None else decay_norm_scales
  if clip_mode not in ("global", "per_param", "none"):
    raise ValueError(f"clip_mode must be 'global', 'per_param' or 'none', got {clip_mode!r}")
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
  if lr < 0 or coef_lr < 0:
    raise ValueError(f"lr ({lr}) and coef_lr ({coef_lr}) must be >= 0")
  if not isinstance(params, Mapping):
    raise ValueError("make_optimizer: params must be a dict tree "
                     f"({{'{pretrained_prefix}': <CLIP params>, ...}}), "
                     f"got {type(params).__name__}")
  if freeze_layer_num > -1 and pretrained_prefix not in params:
    raise ValueError(
        f"make_optimizer: freeze_layer_num={freeze_layer_num} freezes the pretrained params "
        f"under the top-level key {pretrained_prefix!r}, but params has only the keys "
        f"{sorted(params)}; set pretrained_prefix to the CLIP subtree's key")

  schedules = {
      "pretrained": schedule_fn(lr * coef_lr, total_steps, warmup_proportion),
      "new": schedule_fn(lr, total_steps, warmup_proportion),
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
    transforms[name] = group(schedules[source], decay=not name.endswith("no_decay"))

  chain = []
  if clip_norm is not None and clip_norm > 0 and clip_mode != "none":
    if clip_mode == "global":
      trainable = lambda p: jax.tree.map(lambda l: l != FROZEN, label_fn(p))
      chain.append(optax.masked(clip_by_global_norm_torch(clip_norm), trainable))
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
