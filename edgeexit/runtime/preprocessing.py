"""Frame → network input, from the manifest's `preprocessing` block (numpy only).

Accepted inputs (validated once per call; a bad one raises ValueError naming what was expected):
- uint8 HxWxC frames (C = 3, in ``input_order``: RGB or BGR as stated at load, or C = 1) or HxW gray;
  resized (bilinear) to ``input_size``, converted to the model's channels, normalised;
- float32/float64 CxHxW arrays that are already preprocessed: ``(pixel / 255 - mean) / std`` per
  channel, at ``input_size``. A float frame is never rescaled or guessed at. Its values must be
  finite, and each must be one that normalised 0..1 pixels can give (within the smallest and the
  largest (p - mean) / std over channels and p in [0, 1]), so an unnormalised 0..255 float frame, or
  one value of 50.0 in a normalised one, is refused rather than classified as garbage. (An
  unnormalised 0..1 frame lies in range and cannot be told apart: pass uint8 frames when in doubt.)
"""

from __future__ import annotations

import math

import numpy as np

from edgeexit.runtime.artifact import Preprocessing

_F32 = np.dtype(np.float32)


def resize_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """HxWxC float32 bilinear resize with half-pixel centres (align_corners=False)."""
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return img
    ys = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0).astype(np.float32)[:, None, None]
    wx = (xs - x0).astype(np.float32)[None, :, None]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB → HxWx1 uint8 with PIL's ``convert("L")`` arithmetic (ITU-R BT.601, rounded),
    as the training data was made."""
    r, g, b = (rgb[:, :, i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, :, None]


def resize_uint8(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """HxWxC uint8 → out_h x out_w x C uint8: bilinear (half-pixel centres), rounded to the nearest
    integer. Training data (ImageFolder) and camera frames both go through this function."""
    if img.shape[:2] == (out_h, out_w):
        return img
    return np.clip(np.rint(resize_bilinear(img.astype(np.float32), out_h, out_w)), 0, 255).astype(np.uint8)


class Preprocessor:
    def __init__(self, preprocessing, input_order: str = "RGB") -> None:
        """``preprocessing``: the artifact's `Preprocessing` (runtime/artifact.py) or its dict form."""
        if input_order not in ("RGB", "BGR"):
            raise ValueError(f"input_order must be RGB or BGR, got {input_order}")
        if isinstance(preprocessing, Preprocessing):
            preprocessing = preprocessing.to_dict()
        self.input_order = input_order
        self.in_chans = int(preprocessing["in_chans"])
        self.height, self.width = (int(s) for s in preprocessing["input_size"])
        self.mean = np.asarray(preprocessing["mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(preprocessing["std"], dtype=np.float32).reshape(-1, 1, 1)
        self.chw_shape = (self.in_chans, self.height, self.width)
        # A float frame is checked on the hot path by its extremes: every value must lie where
        # (p - mean) / std can for some channel and some p in [0, 1] (a min and a max: NaN fails too),
        # so one value of 50.0 in a normalised frame is refused, not only a frame of 0..255 values.
        self._size = self.in_chans * self.height * self.width
        bound = np.maximum(np.abs(self.mean), np.abs(1 - self.mean)) / self.std
        slack = 1e-3 * float(bound.max()) + 1e-6
        self._lo = float((-self.mean / self.std).min()) - slack
        self._hi = float(((1 - self.mean) / self.std).max()) + slack
        if not (math.isfinite(self._lo) and math.isfinite(self._hi)):
            raise ValueError("preprocessing mean/std are not finite in float32")
        # uint8 → normalised float32 as one table lookup per channel: the table holds exactly
        # (v * (1/255) - mean) / std in float32 for every byte v, so results are bit-identical to the
        # arithmetic, at half its cost (and a tenth of its cost inside a predict call: no temporaries)
        values = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
        self._lut = np.ascontiguousarray((values[None, :] - self.mean.reshape(-1, 1)) / self.std.reshape(-1, 1))

    def expected(self) -> str:
        return (
            f"a uint8 HxWx3 ({self.input_order}) or HxW frame, or a float CxHxW array of shape "
            f"{self.chw_shape} that is already normalised"
        )

    def __call__(self, frame) -> np.ndarray:
        """One frame → float32 (C, H, W)."""
        if type(frame) is np.ndarray and frame.dtype == _F32 and frame.shape == self.chw_shape:
            x = frame if frame.flags.c_contiguous else np.ascontiguousarray(frame)
            if not (x.min() >= self._lo and x.max() <= self._hi):  # NaN fails this too
                self._float_range_error(x)
            return x
        return self._checked(frame)

    def _float_range_error(self, x: np.ndarray) -> None:
        if not np.isfinite(x).all():
            raise ValueError("input contains NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        raise ValueError(
            f"float input must be normalised ((pixel/255 - mean)/std); its values {lo:.3g}..{hi:.3g} are beyond "
            f"what normalised pixels can give ({self._lo:.3g}..{self._hi:.3g}): pass the uint8 frame instead"
        )

    def _checked(self, frame) -> np.ndarray:
        if not isinstance(frame, np.ndarray):
            raise ValueError(f"expected a numpy array ({self.expected()}), got {type(frame).__name__}")
        if frame.dtype == np.uint8:
            return self._from_uint8(frame)
        if frame.dtype in (np.float32, np.float64, np.float16):
            if frame.shape != self.chw_shape:
                raise ValueError(f"float input must be {self.chw_shape} (C, H, W, normalised); got shape {frame.shape}")
            x = np.ascontiguousarray(frame, dtype=np.float32)
            if not (x.min() >= self._lo and x.max() <= self._hi):
                self._float_range_error(x)
            return x
        raise ValueError(f"unsupported dtype {frame.dtype}: expected {self.expected()}")

    def _from_uint8(self, frame: np.ndarray) -> np.ndarray:
        if frame.ndim == 2:
            img = frame[:, :, None]
        elif frame.ndim == 3 and frame.shape[2] in (1, 3):
            img = frame
        elif frame.ndim == 3 and frame.shape[0] in (1, 3) and frame.shape[2] not in (1, 3):
            raise ValueError(
                f"uint8 frames must be HxWxC (channels last); got shape {frame.shape} which looks "
                "like CxHxW: use frame.transpose(1, 2, 0)"
            )
        else:
            raise ValueError(f"expected {self.expected()}; got a uint8 array of shape {frame.shape}")
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"empty frame of shape {frame.shape}")
        if img.shape[2] == 3 and self.input_order == "BGR":
            img = img[:, :, ::-1]
        if self.in_chans == 1 and img.shape[2] == 3:
            img = to_gray(img)
        elif self.in_chans == 3 and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        # the same uint8 resize (with rounding) as the training data: frames match it exactly
        img = resize_uint8(img, self.height, self.width)
        if self.in_chans == 1:
            return self._lut[0][img[:, :, 0]][None]
        out = np.empty(self.chw_shape, dtype=np.float32)
        for c in range(self.in_chans):
            np.take(self._lut[c], img[:, :, c], out=out[c])
        return out

    def batch(self, frames) -> np.ndarray:
        """A list of frames, an NxHxWxC uint8 array, or an NxCxHxW float array → float32 (N, C, H, W)."""
        if isinstance(frames, np.ndarray) and frames.dtype != np.uint8 and frames.ndim == 4:
            if frames.dtype not in (np.float32, np.float64, np.float16):  # the same dtypes as one frame
                raise ValueError(f"unsupported dtype {frames.dtype}: expected uint8 frames or normalised floats")
            if frames.shape[1:] != self.chw_shape:
                raise ValueError(f"float batch must be (N, {', '.join(map(str, self.chw_shape))}); got {frames.shape}")
            x = np.ascontiguousarray(frames, dtype=np.float32)
            flat = x.reshape(len(x), -1)
            ok = (flat.min(axis=1) >= self._lo) & (flat.max(axis=1) <= self._hi)
            if not ok.all():
                self._float_range_error(x[int(np.argmin(ok))])
            return x
        if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4:
            frames = list(frames)
        elif isinstance(frames, np.ndarray):
            raise ValueError(
                f"predict_batch expects a list of frames, an NxHxWxC uint8 array or an NxCxHxW float array; got "
                f"a {frames.dtype} array of shape {frames.shape} (one frame? wrap it in a list; gray frames: "
                "add a channel axis, NxHxWx1)"
            )
        if not isinstance(frames, list | tuple) or len(frames) == 0:
            raise ValueError("predict_batch expects a non-empty list of frames or a 4-D array")
        return np.stack([self(f) for f in frames])
