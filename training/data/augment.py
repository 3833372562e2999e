"""Domain randomization for rendered X-rays (after the FluoroSAM paper), seeded and reproducible.

Raw DRRs are clean line integrals; real images differ in exposure, detector noise, processing (log
or not, windowing, CLAHE, inverted display), blur and occlusions. Each call draws one random
"imaging chain" from a seed:

1. physics: either the line integral with Gaussian noise, or a transmission image I = exp(-k*integral)
   with Poisson quantum noise, then -log (the usual display) or left as transmission (bone dark);
2. random windowing (percentile window, sometimes clipping the bone or the lungs);
3. from albumentations: Gaussian blur, gamma, brightness/contrast ("Gaussian contrast"), inversion,
   coarse dropout, detector Gaussian noise; CLAHE from kornia (works on floats, unlike
   albumentations' 8-bit CLAHE).

:func:`domain_randomize` makes only photometric changes, so masks stay valid. :func:`anatomy_warp` is the
geometric part: one CT is one body, so a random anisotropic scale (vertically up to 1.25x, because the
bundled CT is a supine shallow-inspiration scan and chest films are taken in deep inspiration), small
rotation/shear and a smooth elastic field (albumentations) stand in for other body habitus, moving image and
masks together. :func:`zoom_out` shrinks the raw render and its masks into the frame with air around them:
the bundled CT's views fill the frame with the chest, and the model learned lungs that fill a fixed share of
the frame (on real films its lung masks grow when the film is padded and shrink when it is cropped), while
films also show the neck, shoulders and air around the body. :func:`inspiration_stretch` lowers the dome under
a fixed apex (deeper inspiration), which a uniform scale cannot.
None ever flips horizontally (laterality matters).
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch


def _photometric_pipeline(seed: int) -> A.Compose:
    return A.Compose([
        A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.3, 1.5), p=0.3),
        A.RandomGamma(gamma_limit=(60, 160), p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.3, p=0.5),
        A.InvertImg(p=0.15),
        A.CoarseDropout(num_holes_range=(1, 6), hole_height_range=(0.03, 0.15), hole_width_range=(0.03, 0.15),
                        fill="random_uniform", p=0.3),
        A.GaussNoise(std_range=(0.005, 0.04), p=0.4),
    ], seed=seed)


def _warp_pipeline(seed: int) -> A.Compose:
    return A.Compose([
        A.Affine(scale={"x": (0.85, 1.15), "y": (0.9, 1.25)}, rotate=(-7, 7), shear=(-5, 5),
                 translate_percent=(-0.04, 0.04), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1.0),
        A.ElasticTransform(alpha=30, sigma=12, approximate=True, border_mode=cv2.BORDER_CONSTANT, fill=0,
                           fill_mask=0, p=0.5),
    ], seed=seed)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def domain_randomize(raw: np.ndarray, seed: int, epoch: int = 0, index: int = 0) -> np.ndarray:
    """Randomized float32 image in [0, 1] from a raw line-integral DRR; same arguments -> same output."""
    if raw.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {raw.shape}")
    seed = _seed(seed, epoch, index)
    rng = np.random.default_rng(seed)
    image = np.asarray(raw, dtype=np.float64)
    peak = float(np.percentile(image, 99.5)) or 1.0
    if rng.random() < 0.6:
        k = rng.uniform(2.0, 6.0) / peak  # attenuation scale: the densest path transmits e^-2 .. e^-6
        photons = 10 ** rng.uniform(2.5, 4.5)
        counts = rng.poisson(photons * np.exp(-k * image)) + 0.5
        transmission = counts / photons
        image = -np.log(transmission) if rng.random() < 0.75 else transmission
    else:
        image = image + rng.normal(0, rng.uniform(0.0, 0.02) * peak, image.shape)
    lo, hi = np.percentile(image, [rng.uniform(0, 8), rng.uniform(92, 100)])
    image = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    if rng.random() < 0.25:
        clip_limit = float(rng.uniform(1.5, 6.0))
        image = torch_clahe(image, clip_limit)
    out = _photometric_pipeline(int(rng.integers(2**31)))(image=image)["image"]
    return np.clip(out, 0, 1).astype(np.float32)


def torch_clahe(image01: np.ndarray, clip_limit: float) -> np.ndarray:
    import kornia

    t = torch.from_numpy(np.ascontiguousarray(image01, dtype=np.float32))[None, None]
    return kornia.enhance.equalize_clahe(t, clip_limit=clip_limit, grid_size=(8, 8))[0, 0].numpy()


def _check_image_and_masks(image: np.ndarray, masks: np.ndarray) -> None:
    if image.ndim != 2 or masks.ndim != 3 or masks.shape[1:] != image.shape:
        raise ValueError(f"expected image (H, W) and masks (C, H, W), got {image.shape} and {masks.shape}")


# Geometric changes move masks with nearest-neighbour sampling, so 8 classes packed as the bits of one byte move
# exactly as 8 separate masks would: 122 classes cost 16 channels instead of 122.
def _pack_channels_last(masks: np.ndarray) -> np.ndarray:
    """(C, H, W) bool -> (H, W, ceil(C / 8)) uint8, the layout OpenCV and albumentations resample."""
    return np.moveaxis(np.packbits(masks, axis=0), 0, -1)


def _unpack_channels_last(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`_pack_channels_last` (OpenCV drops a single channel axis: restored here)."""
    packed = packed.reshape(*packed.shape[:2], -1)
    return np.unpackbits(np.moveaxis(packed, -1, 0), axis=0, count=count).astype(bool)


ZOOM_OUT_SCALE = (0.6, 0.95)  # the rendered frame's new side as a share of the old one


def zoom_out(raw: np.ndarray, masks: np.ndarray, seed: int, epoch: int = 0,
             index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A raw line-integral render (H, W) and its masks (C, H, W) bool, shrunk together by a random factor to a
    random place in the same frame; the rest is air (line integral 0), so the imaging chain that
    :func:`domain_randomize` draws afterwards treats it as air."""
    _check_image_and_masks(raw, masks)
    rng = np.random.default_rng(_seed(seed, epoch, index, 0x200F))
    h, w = raw.shape
    scale = rng.uniform(*ZOOM_OUT_SCALE)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    y0, x0 = int(rng.integers(0, h - new_h + 1)), int(rng.integers(0, w - new_w + 1))
    image = np.zeros((h, w), np.float32)
    image[y0:y0 + new_h, x0:x0 + new_w] = cv2.resize(raw.astype(np.float32), (new_w, new_h),
                                                     interpolation=cv2.INTER_AREA)
    packed = _pack_channels_last(masks)
    placed = np.zeros_like(packed)
    placed[y0:y0 + new_h, x0:x0 + new_w] = cv2.resize(packed, (new_w, new_h),
                                                      interpolation=cv2.INTER_NEAREST).reshape(new_h, new_w, -1)
    return image, _unpack_channels_last(placed, len(masks))


INSPIRATION_SCALE = (1.05, 1.35)  # lung height after / before: the dome descends, the rib spaces widen


def inspiration_stretch(raw: np.ndarray, masks: np.ndarray, lungs: int, seed: int, epoch: int = 0,
                        index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A raw render (H, W) and its masks (C, H, W) bool stretched vertically between the lung apex and the lowest
    lung row, the abdomen below shifted down unscaled (its lowest rows leave the frame): a deeper inspiration.
    The bundled CT is a supine, shallow-inspiration scan whose dome sits high; upright films are taken in deep
    inspiration, so the model must find where a lung ends from the dome's edge in the image, not from its height
    under the apex (the uniform scale of :func:`anatomy_warp` keeps that ratio). ``lungs``: the channel whose
    rows fix the apex and the base; a view without it is returned unchanged."""
    _check_image_and_masks(raw, masks)
    rows = np.flatnonzero(masks[lungs].any(axis=1))
    if rows.size < 2:
        return raw, masks
    h, w = raw.shape
    rng = np.random.default_rng(_seed(seed, epoch, index, 0x1A5))
    apex, base = float(rows[0]), float(rows[-1])
    new_base = apex + (base - apex) * rng.uniform(*INSPIRATION_SCALE)
    # Output row -> source row, increasing: above the apex unchanged, apex..base stretched onto apex..new_base,
    # below that the same rows shifted down.
    out_rows = np.arange(h, dtype=np.float64)
    source_rows = np.where(out_rows <= new_base, np.interp(out_rows, [0.0, apex, new_base], [0.0, apex, base]),
                           base + out_rows - new_base)
    map_y = np.repeat(source_rows.astype(np.float32)[:, None], w, axis=1)
    map_x = np.repeat(np.arange(w, dtype=np.float32)[None, :], h, axis=0)
    image = cv2.remap(raw.astype(np.float32), map_x, map_y, interpolation=cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_REPLICATE)
    packed = cv2.remap(_pack_channels_last(masks), map_x, map_y, interpolation=cv2.INTER_NEAREST,
                       borderMode=cv2.BORDER_REPLICATE)
    return image, _unpack_channels_last(packed, len(masks))


def anatomy_warp(image: np.ndarray, masks: np.ndarray, seed: int, epoch: int = 0,
                 index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The same random affine + elastic warp applied to an image (H, W) and its masks (C, H, W) bool."""
    _check_image_and_masks(image, masks)
    out = _warp_pipeline(_seed(seed, epoch, index, 0x57A9))(image=image.astype(np.float32),
                                                           mask=_pack_channels_last(masks))
    return out["image"], _unpack_channels_last(out["mask"], len(masks))
