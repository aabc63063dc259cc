"""Camera-aware proxies (O2CAP/TMGF): split every DBSCAN cluster by camera.

Each (cluster, camera) pair with at least one image becomes one proxy. Proxy ids are assigned in
cluster order, then in ascending camera order inside a cluster (the official ``cam_label_split``),
so the proxies of one cluster are a contiguous id range and ``cluster2proxy`` is a pointer array.
Outliers (label -1) get proxy label -1 and no proxy.

The tables are numpy arrays (they are built once per epoch, broadcast, checkpointed);
:func:`proxy_centers` turns features into the per-proxy centres that initialise the proxy memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_STATE_KEYS = ("proxy_labels", "proxy2cluster", "proxy2cam", "cluster_ptr", "cam_ptr", "cam_proxies")


@dataclass
class CameraProxies:
    """Proxy labels of the training images and the lookup tables the O2CAP losses use."""

    proxy_labels: np.ndarray
    """[N] int64: proxy id of every training image, -1 for DBSCAN outliers."""
    proxy2cluster: np.ndarray
    """[P] int64: the cluster each proxy belongs to (non-decreasing)."""
    proxy2cam: np.ndarray
    """[P] int64: the camera of each proxy's images."""
    cluster_ptr: np.ndarray
    """[K+1] int64: the proxies of cluster c are ids ``cluster_ptr[c]:cluster_ptr[c+1]`` (CSR)."""
    cam_ptr: np.ndarray
    """[C+1] int64: the proxies of camera c are ``cam_proxies[cam_ptr[c]:cam_ptr[c+1]]`` (CSR)."""
    cam_proxies: np.ndarray
    """[P] int64: proxy ids grouped by camera, ascending inside a camera."""

    @property
    def num_proxies(self) -> int:
        return int(self.proxy2cluster.shape[0])

    @property
    def num_clusters(self) -> int:
        return int(self.cluster_ptr.shape[0] - 1)

    @property
    def num_cams(self) -> int:
        """Number of camera ids (max camera id + 1 over all images, outliers included)."""
        return int(self.cam_ptr.shape[0] - 1)

    def cluster2proxy(self, cluster: int) -> np.ndarray:
        """All proxies of ``cluster`` (any camera)."""
        return np.arange(self.cluster_ptr[cluster], self.cluster_ptr[cluster + 1], dtype=np.int64)

    def cam2proxy(self, cam: int) -> np.ndarray:
        """All proxies made of images from camera ``cam`` (empty if all its images are outliers)."""
        return self.cam_proxies[self.cam_ptr[cam] : self.cam_ptr[cam + 1]]

    def proxy_sizes(self) -> np.ndarray:
        """[P] number of images per proxy."""
        valid = self.proxy_labels[self.proxy_labels >= 0]
        return np.bincount(valid, minlength=self.num_proxies).astype(np.int64)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays, so a resumed run reuses the epoch's proxies instead of re-clustering."""
        return {k: np.asarray(getattr(self, k)).copy() for k in _STATE_KEYS}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> CameraProxies:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise KeyError(f"CameraProxies state: missing keys {missing}; expected {list(_STATE_KEYS)}")
        out = cls(**{k: np.asarray(state[k], dtype=np.int64).copy() for k in _STATE_KEYS})
        out.validate()
        return out

    def validate(self) -> None:
        """Consistency of the tables with each other (e.g. read from a checkpoint); one-line errors."""
        p = self.num_proxies
        if self.proxy2cam.shape != (p,) or self.cam_proxies.shape != (p,):
            raise ValueError(f"CameraProxies: proxy2cam/cam_proxies must have shape ({p},), got "
                             f"{self.proxy2cam.shape}/{self.cam_proxies.shape}")
        for name, ptr, owner in (("cluster_ptr", self.cluster_ptr, self.proxy2cluster),
                                 ("cam_ptr", self.cam_ptr, self.proxy2cam[self.cam_proxies] if p else self.proxy2cam)):
            sizes = np.diff(ptr)
            if ptr.size == 0 or ptr[0] != 0 or ptr[-1] != p or (sizes < 0).any() or \
                    not np.array_equal(np.repeat(np.arange(sizes.size), sizes), owner):
                raise ValueError(f"CameraProxies: {name} does not match the proxy tables (num_proxies={p})")
        if p and not np.array_equal(np.sort(self.cam_proxies), np.arange(p)):
            raise ValueError("CameraProxies: cam_proxies must be a permutation of the proxy ids")
        if self.proxy_labels.size and (self.proxy_labels.min() < -1 or self.proxy_labels.max() >= p):
            raise ValueError(f"CameraProxies: proxy_labels must lie in [-1, {p}), got "
                             f"[{self.proxy_labels.min()}, {self.proxy_labels.max()}]")


def make_camera_proxies(labels: np.ndarray, camids: np.ndarray, num_cams: int | None = None) -> CameraProxies:
    """Split clusters into camera-aware proxies.

    Args:
        labels: [N] cluster label per image, -1 for outliers (DBSCAN output).
        camids: [N] 0-based camera id per image.
        num_cams: number of camera ids; default ``camids.max() + 1``.
    """
    labels = np.asarray(labels)
    camids = np.asarray(camids)
    if labels.ndim != 1 or camids.shape != labels.shape:
        raise ValueError(f"make_camera_proxies: labels {labels.shape} and camids {camids.shape} "
                         "must be equal 1-D shapes")
    if labels.size and not (np.issubdtype(labels.dtype, np.integer) and np.issubdtype(camids.dtype, np.integer)):
        raise ValueError(f"make_camera_proxies: labels/camids must be integers, got {labels.dtype}/{camids.dtype}")
    labels = labels.astype(np.int64)
    camids = camids.astype(np.int64)
    if labels.size and labels.min() < -1:
        raise ValueError(f"make_camera_proxies: labels must be >= -1, got min {labels.min()}")
    if camids.size and camids.min() < 0:
        raise ValueError(f"make_camera_proxies: camids must be 0-based, got min {camids.min()}")
    c = int(camids.max()) + 1 if camids.size else 0
    if num_cams is not None:
        if num_cams < c:
            raise ValueError(f"make_camera_proxies: num_cams={num_cams} but camids go up to {c - 1}")
        c = num_cams
    k = int(labels.max()) + 1 if labels.size else 0

    valid = labels >= 0
    # One key per (cluster, camera); sorted unique keys are exactly the official id order.
    keys = labels[valid] * max(c, 1) + camids[valid]
    ukeys, inverse = np.unique(keys, return_inverse=True)
    proxy_labels = np.full(labels.shape, -1, dtype=np.int64)
    proxy_labels[valid] = inverse.reshape(-1)
    proxy2cluster = (ukeys // max(c, 1)).astype(np.int64)
    proxy2cam = (ukeys % max(c, 1)).astype(np.int64)
    cluster_ptr = np.searchsorted(proxy2cluster, np.arange(k + 1), side="left").astype(np.int64)
    cam_proxies = np.argsort(proxy2cam, kind="stable").astype(np.int64)
    cam_ptr = np.zeros(c + 1, dtype=np.int64)
    np.cumsum(np.bincount(proxy2cam, minlength=c), out=cam_ptr[1:])
    return CameraProxies(proxy_labels, proxy2cluster, proxy2cam, cluster_ptr, cam_ptr, cam_proxies)


@torch.no_grad()
def proxy_centers(features: torch.Tensor, proxy_labels: np.ndarray | torch.Tensor, num_proxies: int | None = None,
                  chunk: int = 8192) -> torch.Tensor:
    """L2-normalised mean of the L2-normalised features of each proxy's images.

    Args:
        features: [N, D] or [S, N, D] (S slots: global + parts), any float dtype, any device.
        proxy_labels: [N] proxy id per image, -1 for outliers (ignored).
        num_proxies: P; default ``max(proxy_labels) + 1``.
        chunk: rows normalised at a time (bounds the temporary copy for large N).
    Returns:
        [S, P, D] float32 on the features' device (S = 1 for 2-D input).
    """
    if features.dim() == 2:
        features = features.unsqueeze(0)
    if features.dim() != 3:
        raise ValueError(f"proxy_centers: features must be [N, D] or [S, N, D], got {tuple(features.shape)}")
    s, n, d = features.shape
    labels = torch.as_tensor(np.asarray(proxy_labels) if not torch.is_tensor(proxy_labels) else proxy_labels)
    labels = labels.to(device=features.device, dtype=torch.long)
    if labels.shape != (n,):
        raise ValueError(f"proxy_centers: proxy_labels must have shape ({n},), got {tuple(labels.shape)}")
    p = int(labels.max().item()) + 1 if num_proxies is None else num_proxies
    if n and int(labels.max()) >= p:
        raise ValueError(f"proxy_centers: proxy label {int(labels.max())} >= num_proxies={p}")
    # Outliers go to a spare row P that is dropped at the end (no boolean-mask copy of the features).
    target = torch.where(labels >= 0, labels, p)
    counts = torch.bincount(target, minlength=p + 1)[:p]
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(f"proxy_centers: proxies without images (e.g. ids {empty}); num_proxies={p} too large?")
    sums = torch.zeros(s, p + 1, d, dtype=torch.float32, device=features.device)
    for start in range(0, n, chunk):
        x = F.normalize(features[:, start : start + chunk].float(), dim=-1)
        sums.index_add_(1, target[start : start + chunk], x)
    return F.normalize(sums[:, :p], dim=-1)


__all__ = ["CameraProxies", "make_camera_proxies", "proxy_centers"]
