"""Token clustering of CenterCLIP (semantics: shared/docs/clustering.md)."""

from centerclip_jax.clustering.kmedoids import kmedoids_pp
from centerclip_jax.clustering.kmedoids import pairwise_distances
from centerclip_jax.clustering.segments import ClusterSettings
from centerclip_jax.clustering.segments import ClusterStep
from centerclip_jax.clustering.segments import cluster_segments
from centerclip_jax.clustering.segments import cluster_step
from centerclip_jax.clustering.segments import cluster_step_with_info
from centerclip_jax.clustering.segments import segment_mask
from centerclip_jax.clustering.segments import plan_steps
from centerclip_jax.clustering.spectral import spectral_cluster

__all__ = [
    "ClusterSettings",
    "ClusterStep",
    "cluster_segments",
    "cluster_step",
    "cluster_step_with_info",
    "segment_mask",
    "kmedoids_pp",
    "pairwise_distances",
    "plan_steps",
    "spectral_cluster",
]
