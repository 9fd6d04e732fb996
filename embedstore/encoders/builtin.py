"""The built-in, weight-free encoder: stain, texture and nuclear-density features of H&E tiles.

A documented baseline and the offline default (``DEFAULT_ENCODER = "builtin"``). It needs no
weights and no torch; it is deterministic and vectorised over the batch with NumPy/SciPy.

Features (128, float32), computed on tiles resized to 224 px at 0.5 µm/px:

- colour deconvolution (Ruifrok & Johnston 2001, H&E-DAB matrix): mean and std of the
  haematoxylin (H), eosin (E) and DAB/residual optical densities (OD); 10/25/50/75/90 %
  quantiles of H and E; H–E correlation, eosin share, tissue fraction, H and E within tissue,
  eosin-dominant fraction, eosin under nuclei (16 + 7);
- OD histograms: 8 bins each of H, E and grey OD, and a 4 x 4 joint H–E histogram (40);
- nuclear-density proxy: fraction of strongly haematoxylin-stained pixels at two thresholds,
  and counts and mean strength of difference-of-Gaussian blobs of H at three nuclear scales (8);
- multi-scale texture on a pyramid (grey OD at 0.5, 1, 2 µm/px; H at 1, 2, 4 µm/px):
  gradient-magnitude mean and std, Haar-like detail energy (one difference-of-Gaussian-like
  band per octave) of grey, H and E, grey-level co-occurrence contrast and homogeneity at
  distances 1, 2, 4, and uniform local binary pattern histograms at two scales (12 + 7 + 12 + 20);
- mean and std of the R, G, B optical densities (6).

Stain features are computed at half resolution (1 µm/px), which keeps it above 200 tiles/s
on one core.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import numpy as np

from embedstore import _schema
from embedstore.encoders._config import EncoderCfg
from embedstore.encoders._preprocess import check_tiles
from embedstore.encoders._runtime import Encoder

LOG = logging.getLogger(__name__)

VERSION = "builtin-1"
DIM = 128
SIZE = 224

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image's rgb_from_hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)

# Fixed parameters; they go into the fingerprint, so changing one changes it.
PARAMS: dict[str, Any] = {
    "od_max": 2.0,  # OD range of the fine histograms
    "fine_bins": 128,
    "coarse_edges": [0, 3, 6, 13, 19, 29, 38, 51, 128],  # fine-bin indices: OD 0, .05, .09, .2, .3, .45, .6, .8, 2
    "joint_edges": [0.1, 0.3, 0.6],  # H and E OD levels of the 4 x 4 joint histogram
    "tissue_od": 0.1,  # mean RGB OD above which a pixel is tissue
    "nuclear_od": [0.35, 0.6],  # H OD thresholds of the nuclear-density proxy
    "blob_sigmas": [1.5, 2.4, 3.84],  # px at 1 µm/px (level 1), x1.6 apart: lymphocyte .. tumour nuclei
    "blob_min": 0.04,  # minimum DoG response of a counted blob
    "glcm_levels": 8,
    "glcm_max_od": 1.2,
    "glcm_distances": [1, 2, 4],
    "quantiles": [0.1, 0.25, 0.5, 0.75, 0.9],
}

# OD of each 8-bit value; +1 keeps log finite on black pixels.
_OD_LUT = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def _uniform_lbp_lut() -> np.ndarray:
    """Map an 8-bit LBP code to 10 bins: number of set bits for uniform patterns, 9 for the rest."""
    lut = np.empty(256, dtype=np.int64)
    for code in range(256):
        bits = [(code >> i) & 1 for i in range(8)]
        transitions = sum(bits[i] != bits[(i + 1) % 8] for i in range(8))
        lut[code] = sum(bits) if transitions <= 2 else 9
    return lut


_LBP_LUT = _uniform_lbp_lut()


def _down2(x: np.ndarray) -> np.ndarray:
    """2 x 2 block mean of a (B, H, W[, C]) stack (one pyramid octave)."""
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    # four strided adds are several times faster than a reshape + mean over two axes
    s = x[:, 0 : 2 * h2 : 2, 0 : 2 * w2 : 2] + x[:, 1 : 2 * h2 : 2, 0 : 2 * w2 : 2]
    s += x[:, 0 : 2 * h2 : 2, 1 : 2 * w2 : 2]
    s += x[:, 1 : 2 * h2 : 2, 1 : 2 * w2 : 2]
    return s * np.float32(0.25)


def _detail_energy(x: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Mean |x - its 2 x 2 block mean|: the energy of one Haar/DoG band per tile."""
    b, h2, w2 = coarse.shape
    fine = x[:, : 2 * h2, : 2 * w2].reshape(b, h2, 2, w2, 2)
    return np.abs(fine - coarse[:, :, None, :, None]).mean(axis=(1, 2, 3, 4))


def _hist(values: np.ndarray, nbins: int, vmax: float) -> np.ndarray:
    """Per-tile histogram of (B, ...) values on [0, vmax] with ``nbins`` bins, as fractions."""
    b = values.shape[0]
    idx = np.minimum((values.reshape(b, -1) * (nbins / vmax)).astype(np.int64), nbins - 1)
    idx += (np.arange(b, dtype=np.int64) * nbins)[:, None]
    counts = np.bincount(idx.ravel(), minlength=b * nbins).reshape(b, nbins)
    return counts / counts.sum(axis=1, keepdims=True)


def _hist_quantiles(hist: np.ndarray, qs: list[float], vmax: float) -> np.ndarray:
    """Quantiles from fine histograms (bin centres), (B, len(qs))."""
    nb = hist.shape[1]
    cdf = np.cumsum(hist, axis=1)
    idx = np.stack([(cdf < q).sum(axis=1) for q in qs], axis=1)
    return (np.minimum(idx, nb - 1) + 0.5) * (vmax / nb)


def _grad_stats(x: np.ndarray) -> np.ndarray:
    """Mean and std of the forward-difference gradient magnitude, (B, 2)."""
    gx = x[:, :-1, 1:] - x[:, :-1, :-1]
    gy = x[:, 1:, :-1] - x[:, :-1, :-1]
    g = np.sqrt(gx * gx + gy * gy)
    return np.stack([g.mean(axis=(1, 2)), g.std(axis=(1, 2))], axis=1)


def _glcm(q: np.ndarray, distances: list[int]) -> np.ndarray:
    """Grey-level co-occurrence contrast and homogeneity, averaged over horizontal and vertical offsets."""
    out = []
    for d in distances:
        dh = (q[:, :, d:] - q[:, :, :-d]).astype(np.float32)
        dv = (q[:, d:, :] - q[:, :-d, :]).astype(np.float32)
        contrast = 0.5 * ((dh * dh).mean(axis=(1, 2)) + (dv * dv).mean(axis=(1, 2)))
        homog = 0.5 * ((1.0 / (1.0 + np.abs(dh))).mean(axis=(1, 2)) + (1.0 / (1.0 + np.abs(dv))).mean(axis=(1, 2)))
        out += [contrast / 10.0, homog]  # contrast of 8 levels rarely exceeds ~10: keep features O(1)
    return np.stack(out, axis=1)


def _lbp_hist(x: np.ndarray) -> np.ndarray:
    """Uniform LBP(8, 1) histogram (10 bins) per tile."""
    c = x[:, 1:-1, 1:-1]
    h, w = c.shape[1:]
    code = np.zeros(c.shape, dtype=np.uint8)
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]  # clockwise
    for bit, (dy, dx) in enumerate(offsets):
        nb = x[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        code |= (nb >= c).astype(np.uint8) << bit
    bins = _LBP_LUT[code]
    return _hist(bins.astype(np.float32) + 0.5, 10, 10.0)


def _blobs(h1: np.ndarray, sigmas: list[float], min_resp: float) -> np.ndarray:
    """Count (per 1000 px) and mean strength of difference-of-Gaussian maxima of H at each scale.

    ``sigmas`` must grow by a factor of 1.6 (a scale space): each DoG is G(s) - G(1.6 s), so every
    Gaussian but the first is reused, and each is made from the previous one by a smaller blur.
    """
    from scipy import ndimage

    area = h1.shape[1] * h1.shape[2] / 1000.0
    ladder = [*sigmas, 1.6 * sigmas[-1]]
    blurred = [ndimage.gaussian_filter(h1, sigma=(0, ladder[0], ladder[0]), mode="nearest", truncate=2.5)]
    for lo, hi in itertools.pairwise(ladder):
        inc = float(np.sqrt(hi * hi - lo * lo))  # G(hi) = G(lo) * G(inc)
        blurred.append(ndimage.gaussian_filter(blurred[-1], sigma=(0, inc, inc), mode="nearest", truncate=2.5))
    out = []
    for g1, g2 in itertools.pairwise(blurred):
        dog = g1 - g2
        peak = (dog == ndimage.maximum_filter(dog, size=(1, 3, 3), mode="nearest")) & (dog > min_resp)
        n = peak.sum(axis=(1, 2))
        strength = np.where(n > 0, (dog * peak).sum(axis=(1, 2)) / np.maximum(n, 1), 0.0)
        out += [n / area, strength * 10.0]
    return np.stack(out, axis=1)


def _feature_names() -> list[str]:
    qs = [int(q * 100) for q in PARAMS["quantiles"]]
    names = ["h_mean", "h_std", "e_mean", "e_std", "d_mean", "d_std"]
    names += [f"h_q{q}" for q in qs] + [f"e_q{q}" for q in qs]
    names += ["he_corr", "eosin_share", "tissue_frac", "h_in_tissue", "e_in_tissue", "eosin_dominant", "e_under_nuclei"]
    names += [f"hist_{c}_{i}" for c in ("h", "e", "grey") for i in range(8)]
    names += [f"joint_he_{i // 4}{i % 4}" for i in range(16)]
    names += [f"nuclear_frac_{t}" for t in PARAMS["nuclear_od"]]
    names += [f"blob_{k}_s{s}" for s in PARAMS["blob_sigmas"] for k in ("count", "strength")]
    names += [
        f"grad_{k}_{x}" for x in ("grey_l0", "grey_l1", "grey_l2", "h_l1", "h_l2", "h_l3") for k in ("mean", "std")
    ]
    names += [f"detail_{x}" for x in ("grey_l0", "grey_l1", "grey_l2", "h_l1", "h_l2", "e_l1", "e_l2")]
    names += [
        f"glcm_{k}_d{d}_{x}" for x in ("grey", "h") for d in PARAMS["glcm_distances"] for k in ("contrast", "homog")
    ]
    names += [f"lbp_{x}_{i}" for x in ("grey_l1", "grey_l2") for i in range(10)]
    names += [f"od_{k}_{c}" for k in ("mean", "std") for c in "rgb"]
    return names


FEATURE_NAMES: list[str] = _feature_names()  # column names of the 128 features, in order


def builtin_features(tiles: np.ndarray) -> np.ndarray:
    """Hand-made morphology features of uint8 RGB tiles.

    Parameters
    ----------
    tiles
        uint8 ``(B, H, W, 3)``; 224 px at 0.5 µm/px is what the parameters are tuned for.

    Returns
    -------
    ``(B, 128)`` float32, finite (also for blank tiles).
    """
    p = PARAMS
    b = tiles.shape[0]
    eps = np.float32(1e-6)
    rgb_od = _OD_LUT[tiles]  # (B, H, W, 3) float32
    grey0 = (rgb_od[..., 0] + rgb_od[..., 1] + rgb_od[..., 2]) * np.float32(1 / 3)
    # Stain work runs at half resolution (1 µm/px): 4x cheaper, and stain statistics barely change.
    od1 = _down2(rgb_od)
    hed = np.maximum(od1 @ HED_FROM_RGB, 0.0)  # stain concentrations; negatives are noise
    hh, ee, dd = (np.ascontiguousarray(hed[..., i]) for i in range(3))
    g1 = _down2(grey0)

    feats: list[np.ndarray] = []
    # stain statistics
    means = [ch.mean(axis=(1, 2)) for ch in (hh, ee, dd)]
    for ch, m in zip((hh, ee, dd), means, strict=True):
        feats += [m[:, None], ch.std(axis=(1, 2))[:, None]]
    fine_h = _hist(hh, p["fine_bins"], p["od_max"])
    fine_e = _hist(ee, p["fine_bins"], p["od_max"])
    fine_g = _hist(g1, p["fine_bins"], p["od_max"])
    feats += [
        _hist_quantiles(fine_h, p["quantiles"], p["od_max"]),
        _hist_quantiles(fine_e, p["quantiles"], p["od_max"]),
    ]
    mh, me = means[0], means[1]
    hc = hh.reshape(b, -1) - mh[:, None]
    ec = ee.reshape(b, -1) - me[:, None]
    corr = (hc * ec).mean(axis=1) / (np.sqrt((hc * hc).mean(axis=1) * (ec * ec).mean(axis=1)) + eps)
    tmask = g1 > p["tissue_od"]
    tissue = tmask.mean(axis=(1, 2))
    n_t = np.maximum(tmask.sum(axis=(1, 2)), 1)
    h_in = (hh * tmask).sum(axis=(1, 2)) / n_t  # stain intensity within tissue, independent of tissue fraction
    e_in = (ee * tmask).sum(axis=(1, 2)) / n_t
    e_dom = ((ee > hh) & tmask).mean(axis=(1, 2))  # eosin-dominant tissue (stroma, cytoplasm)
    nuc = hh > p["nuclear_od"][0]
    e_nuc = (ee * nuc).sum(axis=(1, 2)) / np.maximum(nuc.sum(axis=(1, 2)), 1)  # eosin under nuclei
    feats.append(np.stack([corr, me / (mh + me + eps), tissue, h_in, e_in, e_dom, e_nuc], axis=1))
    # OD histograms: coarse bins of the fine ones, plus the joint H-E histogram
    edges = p["coarse_edges"]
    for fine in (fine_h, fine_e, fine_g):
        feats.append(np.stack([fine[:, a:z].sum(axis=1) for a, z in itertools.pairwise(edges)], axis=1))
    t1, t2, t3 = p["joint_edges"]
    qh = (hh > t1).astype(np.int8) + (hh > t2) + (hh > t3)
    qe = (ee > t1).astype(np.int8) + (ee > t2) + (ee > t3)
    feats.append(_hist((qh * 4 + qe).astype(np.float32) + 0.5, 16, 16.0))
    # nuclear density proxy
    feats.append(np.stack([(hh > t).mean(axis=(1, 2)) for t in p["nuclear_od"]], axis=1))
    feats.append(_blobs(hh, p["blob_sigmas"], p["blob_min"]))
    # multi-scale texture on a pyramid (levels 0..3 of grey, 1..3 of H and E)
    g2, h2, e2 = _down2(g1), _down2(hh), _down2(ee)
    for x in (grey0, g1, g2, hh, h2, _down2(h2)):
        feats.append(_grad_stats(x))
    for fine, coarse in (
        (grey0, g1),
        (g1, g2),
        (g2, _down2(g2)),
        (hh, h2),
        (h2, _down2(h2)),
        (ee, e2),
        (e2, _down2(e2)),
    ):
        feats.append(_detail_energy(fine, coarse)[:, None])
    levels = p["glcm_levels"]
    for x in (g1, hh):
        q = np.minimum((x * (levels / p["glcm_max_od"])).astype(np.int8), levels - 1)
        feats.append(_glcm(q, p["glcm_distances"]))
    feats += [_lbp_hist(g1), _lbp_hist(g2)]
    # plain colour, from the OD means (exact per-channel means of the 8-bit values are not needed)
    rgb = od1.reshape(b, -1, 3)
    feats += [rgb.mean(axis=1), rgb.std(axis=1)]

    out = np.concatenate([np.asarray(f, dtype=np.float32).reshape(b, -1) for f in feats], axis=1)
    if out.shape[1] != DIM:  # a code change that alters the layout must also change DIM and VERSION
        msg = f"builtin feature layout has {out.shape[1]} columns, expected {DIM}"
        raise RuntimeError(msg)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


class BuiltinPreprocess:
    """Picklable transform of the built-in encoder: checks the batch and resizes tiles to 224 px."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 ``(B, H, W, 3)`` -> uint8 ``(B, size, size, 3)``."""
        tiles = check_tiles(tiles, self.name)
        if tiles.shape[1:3] == (self.size, self.size):
            return tiles
        from PIL import Image

        return np.stack(
            [np.asarray(Image.fromarray(t).resize((self.size, self.size), Image.Resampling.BILINEAR)) for t in tiles]
        )


class BuiltinEncoder(Encoder):
    """The weight-free encoder; ``model`` is ``None`` and everything runs in NumPy on the CPU."""

    def transform(self) -> BuiltinPreprocess:
        """Picklable per-batch preprocessing: uint8 tiles resized to 224 px (NumPy)."""
        return BuiltinPreprocess(self.name, self.cfg.input_size)

    def to(self, device: str = "cpu", precision: str = "auto") -> BuiltinEncoder:
        """No-op: the built-in encoder always runs on the CPU in float32."""
        if device not in ("cpu", "auto"):
            LOG.info("%s runs on the CPU; ignoring device=%s", self.name, device)
        return self

    def forward(self, batch: Any) -> np.ndarray:
        """Features of a transformed batch, ``(B, 128)`` float32."""
        arr = check_tiles(np.asarray(batch), self.name)
        if arr.shape[0] == 0:
            return np.zeros((0, DIM), dtype=np.float32)
        return builtin_features(arr)


BUILTIN_CFG = EncoderCfg(
    name="builtin",
    family="builtin",
    architecture=VERSION,
    dim=DIM,
    input_size=SIZE,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    interpolation="bilinear",
    target_mpp=0.5,  # nuclear blob scales are tuned for 20x
    license="MIT",
    gated=False,
    pooling="features",
    source="none (hand-made features)",
)


def create_builtin(weights: str | None = None) -> BuiltinEncoder:
    """Build the built-in encoder (``weights`` must be ``None``: it has none)."""
    from embedstore.errors import BadInput

    if weights is not None:
        msg = f"builtin: has no weights, got weights={weights!r}; leave weights unset"
        raise BadInput(msg)
    digest = f"{VERSION}:" + json.dumps(PARAMS, sort_keys=True)
    fp = _schema.fingerprint(digest, BUILTIN_CFG.preprocessing())
    return BuiltinEncoder(BUILTIN_CFG, None, fp, "none")
