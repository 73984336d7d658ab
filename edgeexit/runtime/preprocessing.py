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


def _taps(pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps along one axis of length ``n`` at positions ``pos`` (clipped to the axis): the
    two source indices around each position and the float32 weight of the second."""
    pos = np.clip(pos, 0, n - 1)
    i0 = np.floor(pos).astype(np.intp)
    return i0, np.minimum(i0 + 1, n - 1), (pos - i0).astype(np.float32)


def resize_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """HxWxC float32 bilinear resize with half-pixel centres (align_corners=False)."""
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return img
    y0, y1, wy = _taps((np.arange(out_h) + 0.5) * h / out_h - 0.5, h)
    x0, x1, wx = _taps((np.arange(out_w) + 0.5) * w / out_w - 0.5, w)
    wy, wx = wy[:, None, None], wx[None, :, None]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB → HxWx1 uint8 with PIL's ``convert("L")`` arithmetic (ITU-R BT.601, rounded),
    as the training data was made."""
    r, g, b = (rgb[:, :, i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, :, None]


def resize_uint8(img: np.ndarray, out_h: int, out_w: int, gray: bool = False) -> np.ndarray:
    """HxWxC uint8 → out_h x out_w x C uint8 (``gray``: `to_gray` first, C = 1): bilinear (half-pixel
    centres), rounded to the nearest integer: the ``"bilinear"`` resize of artifacts made before the area
    shrink. It takes 4 source pixels per output pixel, so a large shrink aliases.

    Only the rows and columns the taps touch are gathered (still uint8) and converted, so a 1080p frame
    costs what its output costs; each output value is the same float arithmetic on the same pixels as
    `resize_bilinear` of the whole converted frame, bit for bit."""
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return to_gray(img) if gray and img.shape[2] == 3 else img
    y0, y1, wy = _taps((np.arange(out_h) + 0.5) * h / out_h - 0.5, h)
    x0, x1, wx = _taps((np.arange(out_w) + 0.5) * w / out_w - 0.5, w)
    rows, (y0, y1) = _used(h, y0, y1)
    cols, (x0, x1) = _used(w, x0, x1)
    sub = img[rows][:, cols]
    if gray and sub.shape[2] == 3:
        sub = to_gray(sub)
    sub = sub.astype(np.float32)
    wy, wx = wy[:, None, None], wx[None, :, None]
    top = sub[y0][:, x0] * (1 - wx) + sub[y0][:, x1] * wx
    bottom = sub[y1][:, x0] * (1 - wx) + sub[y1][:, x1] * wx
    return np.clip(np.rint(top * (1 - wy) + bottom * wy), 0, 255).astype(np.uint8)


def _used(n: int, *taps: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The source indices the taps use (sorted, unique) and the taps renumbered into them."""
    used = np.unique(np.concatenate(taps))
    return used, tuple(np.searchsorted(used, t) for t in taps)


# How a frame of another size is brought to the network's input size (the manifest's
# ``preprocessing.resize``). "area": every source pixel is read once, into the mean of its f x f block
# (f = the integer part of the shrink), and the remaining shrink (under 2x) is bilinear; "bilinear":
# the older 4-pixel sample, kept so that models trained with it still see what they were trained on.
RESIZE_METHODS = ("area", "bilinear")
DEFAULT_RESIZE = "area"
_GRAY_WEIGHTS = np.array([19595, 38470, 7471], dtype=np.float32) / np.float32(65536)


def _block_factor(size: int, out: int) -> tuple[int, int, int]:
    """(factor, offset, blocks) along one axis: the largest integer factor f that leaves at least
    ``out`` blocks, and the centred crop it reads. Fewer than f source pixels are left out in all,
    split between the two edges: under half an output pixel's span at each."""
    f = max(1, size // out)
    blocks = size // f
    return f, (size - blocks * f) // 2, blocks


def _row_sums(img: np.ndarray, fy: int, oy: int, blocks: int) -> np.ndarray:
    """Sums of each ``fy`` consecutive rows of the crop, exact in integers: one pass over the frame,
    each step a long contiguous add."""
    a = img[oy : oy + blocks * fy]
    if fy == 1:
        return a
    acc = a[0::fy].astype(np.uint16 if fy * 255 <= 0xFFFF else np.uint32)
    for k in range(1, fy):
        acc += a[k::fy]
    return acc


def _col_sums(acc: np.ndarray, fx: int, ox: int, blocks: int, dtype) -> np.ndarray:
    """Sums of each ``fx`` consecutive pixels along axis 1, exact in integers. Each row is one long
    channel-interleaved vector: sliding sums of 1, 2, 4, ... pixels by doubling (long contiguous
    adds, ~log2(fx) passes), combined along fx's binary digits, then one pick per block. Summing
    fx strided columns instead runs numpy's inner loop over 3 values at a time: 3x slower."""
    h, _, c = acc.shape
    x = np.ascontiguousarray(acc[:, ox : ox + blocks * fx], dtype=dtype).reshape(h, -1)
    if fx == 1:
        return x.reshape(h, blocks, c)
    result, covered = None, 0  # result[:, i]: the sum of `covered` pixels starting at element i
    power, width, n = x, 1, fx  # power[:, i]: the sum of `width` pixels starting at element i
    while True:
        if n & 1:
            if result is None:
                result, covered = power, width
            else:
                shift = covered * c
                m = min(result.shape[1], power.shape[1] - shift)
                result = result[:, :m] + power[:, shift : shift + m]
                covered += width
        n >>= 1
        if not n:
            break
        shift = width * c
        power = power[:, :-shift] + power[:, shift:]
        width *= 2
    if result is None:  # fx >= 2 has a highest binary digit, and that digit set it
        raise AssertionError("no block sum for fx >= 2")
    starts = (np.arange(blocks)[:, None] * (fx * c) + np.arange(c)[None, :]).ravel()
    return result[:, starts].reshape(h, blocks, c)


def _bilinear_at(img: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """HxWxC float32 sampled bilinearly at row positions ``ys`` and column positions ``xs`` (clipped),
    as two 1-D passes: rows first (whole-row gathers), then columns."""
    y0, y1, wy = _taps(ys, img.shape[0])
    x0, x1, wx = _taps(xs, img.shape[1])
    wy, wx = wy[:, None, None], wx[None, :, None]
    rows = np.take(img, y0, axis=0) * (1 - wy) + np.take(img, y1, axis=0) * wy
    return np.take(rows, x0, axis=1) * (1 - wx) + np.take(rows, x1, axis=1) * wx


def shrink_area(img: np.ndarray, out_h: int, out_w: int, gray: bool = False, bgr: bool = False) -> np.ndarray:
    """HxWxC uint8 → out_h x out_w x C' uint8 (C' = 1 when ``gray``, else C), anti-aliased.

    Each source pixel is read once, into an exact integer sum over its f_y x f_x block (f = the
    integer part of the shrink along that axis); float work is done only on the block means, whose
    grid is at most 2x the output: the rest of the shrink is bilinear at half-pixel centres, and the
    gray conversion (BT.601, PIL's weights) is applied to the means. ``bgr``: the frame's channels are
    BGR (OpenCV's order); they are reversed on the small means, not on the frame (a reversed view
    of a whole frame makes every add stride backwards: 10x slower). One rounding, at the end. A frame
    no larger than twice the output along an axis is not blocked along it (f = 1: plain bilinear), so
    an upscale, or a frame already at the output size, is bilinear or unchanged. Training's folder
    reader and the runtime both call this, so their images agree bit for bit."""
    h, w, c = img.shape
    if (h, w) == (out_h, out_w) and not (gray and c == 3):
        return img[:, :, ::-1] if bgr and c == 3 else img
    fy, oy, by = _block_factor(h, out_h)
    fx, ox, bx = _block_factor(w, out_w)
    dtype = np.uint16 if fy * fx * 255 <= 0xFFFF else np.uint32
    sums = _col_sums(_row_sums(img, fy, oy, by), fx, ox, bx, dtype)
    means = sums.astype(np.float32)
    if fy * fx > 1:
        means *= np.float32(1.0 / (fy * fx))
    if gray and c == 3:
        # one fixed order of float operations for RGB and BGR frames, so both round alike
        r, g, b = (means[:, :, i] for i in ((2, 1, 0) if bgr else (0, 1, 2)))
        wr, wg, wb = _GRAY_WEIGHTS
        means = (r * wr + g * wg + b * wb)[:, :, None]
    elif bgr and c == 3:
        means = means[:, :, ::-1]
    if (by, bx) != (out_h, out_w) or fy * fx > 1:
        # block i's centre is source coordinate oy + i*fy + (fy-1)/2; the output pixel's is
        # (j + 0.5) * h / out_h - 0.5 (half-pixel centres, as the bilinear resize)
        ys = ((np.arange(out_h) + 0.5) * (h / out_h) - 0.5 - oy - (fy - 1) / 2) / fy
        xs = ((np.arange(out_w) + 0.5) * (w / out_w) - 0.5 - ox - (fx - 1) / 2) / fx
        means = _bilinear_at(means, ys, xs)
    return np.clip(np.rint(means), 0, 255).astype(np.uint8)


def frame_to_input_uint8(
    img: np.ndarray, out_h: int, out_w: int, in_chans: int, resize: str = DEFAULT_RESIZE, bgr: bool = False
) -> np.ndarray:
    """An RGB (``bgr``: BGR) or gray HxWxC uint8 image → out_h x out_w x in_chans uint8 (RGB or
    gray), the network's input before normalisation. The one conversion behind both a camera frame
    at run time and an image file in training (data/folder.py), so the two agree bit for bit.
    ``resize``: one of RESIZE_METHODS."""
    if resize == "area":
        img = shrink_area(img, out_h, out_w, gray=in_chans == 1, bgr=bgr)
    elif resize == "bilinear":
        if bgr and img.shape[2] == 3:
            img = img[:, :, ::-1]
        img = resize_uint8(img, out_h, out_w, gray=in_chans == 1)
    else:
        raise ValueError(f"unknown resize {resize!r}: expected one of {', '.join(RESIZE_METHODS)}")
    if in_chans == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img


class Preprocessor:
    def __init__(self, preprocessing, input_order: str = "RGB") -> None:
        """``preprocessing``: the artifact's `Preprocessing` (runtime/artifact.py) or its dict form."""
        if input_order not in ("RGB", "BGR"):
            raise ValueError(f"input_order must be RGB or BGR, got {input_order}")
        if isinstance(preprocessing, Preprocessing):
            resize = preprocessing.resize
            preprocessing = preprocessing.to_dict()
        else:
            resize = preprocessing.get("resize")
        # no method named: the manifest predates the choice, and its model was trained on bilinear
        self.resize = "bilinear" if resize is None else resize
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"preprocessing.resize {resize!r} is not one of {', '.join(RESIZE_METHODS)}")
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
        # the same conversion (with rounding) as the training data's: frames match it exactly
        bgr = self.input_order == "BGR"
        img = frame_to_input_uint8(img, self.height, self.width, self.in_chans, self.resize, bgr=bgr)
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
