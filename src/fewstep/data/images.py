"""Image datasets and file readers.

Every function returns ``(x, labels, num_classes)``: ``x`` a float32 tensor
``[n, C, H, W]`` scaled to ``[-1, 1]`` (8-bit values ``v`` become ``v / 127.5 - 1``),
``labels`` a long tensor ``[n]`` or ``None``, and ``num_classes`` (0 without labels).
:func:`read_array_file` may also return points ``[n, d]`` or marked point clouds
``[n, N, 3]`` (the caller tells them apart by ``x.ndim``).

Files are parsed with numpy, struct and Pillow only; nothing is ever unpickled. A missing,
truncated or malformed file raises :class:`~fewstep.errors.UserError` naming the path.
"""
from __future__ import annotations

import gzip
import math
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..errors import UserError

ImageSet = tuple[torch.Tensor, Optional[torch.Tensor], int]
PathLike = Union[str, Path]

SHAPE_CLASSES = ("circle", "square", "triangle")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


# ----------------------------------------------------------------------------- helpers
def _from_uint8(a: np.ndarray) -> torch.Tensor:
    """8-bit pixels ``v`` in ``0..255`` to floats ``v / 127.5 - 1`` in ``[-1, 1]``."""
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C")).div_(127.5).sub_(1.0)


def _labelled(x: torch.Tensor, labels: Optional[np.ndarray], where: PathLike) -> ImageSet:
    """Check ``labels`` (1-D non-negative integers, one per sample) and pack the triple."""
    if labels is None:
        return x, None, 0
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(x):
        raise UserError(f"{where}: labels have shape {tuple(labels.shape)} but there are "
                        f"{len(x)} samples; give one integer label per sample")
    if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iub" or (len(labels) and labels.min() < 0):
        raise UserError(f"{where}: labels must be non-negative integers "
                        f"(got dtype {labels.dtype}); store class indices 0..K-1")
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y, int(y.max()) + 1 if len(y) else 0


def _read_bytes(path: PathLike) -> bytes:
    """The bytes of ``path``, gunzipped when they start with the gzip magic ``1f 8b``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}; check the path")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise UserError(f"{path}: corrupt gzip data ({err}); download the file again")
    return raw


# ----------------------------------------------------------------------------- digits
def digits() -> ImageSet:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

    Pixel values ``0..16`` map to ``v / 8 - 1`` in ``[-1, 1]``; shape ``[1797, 1, 8, 8]``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float()[:, None] / 8.0 - 1.0
    return x, torch.from_numpy(bunch.target).long(), 10


# ----------------------------------------------------------------------------- shapes
def _shape_distance(labels: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                    r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) to a circle, square or triangle.

    circle ``|p| - r``; axis-aligned square of half side ``0.8 r``:
    ``max(|dx|, |dy|) - 0.8 r``; upward equilateral triangle of circumradius ``r``
    (inradius ``r/2``): ``max_i <n_i, p> - r/2`` over its three outward edge normals
    (exact inside, a slight under-estimate near the corners outside).
    """
    r = r[:, None, None]
    circle = torch.hypot(dx, dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.8 * r
    h = math.sqrt(3) / 2  # image y points down, so the bottom edge has normal (0, 1)
    slopes = torch.maximum(h * dx - 0.5 * dy, -h * dx - 0.5 * dy)
    triangle = torch.maximum(dy.expand_as(circle), slopes) - 0.5 * r
    kind = labels[:, None, None]
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


def shapes(n: int = 10000, size: int = 16, generator: Optional[torch.Generator] = None,
           antialias: bool = True) -> ImageSet:
    """Procedural coloured shapes on black: label 0 circle, 1 square, 2 triangle.

    Each image draws its class, a radius ``r ~ size * U[0.18, 0.32]``, a centre keeping
    the shape inside the frame, and a colour whose brightest channel is 1. Coverage of a
    pixel is ``clamp(1/2 - d, 0, 1)`` for the signed distance ``d`` of its centre (a
    one-pixel anti-aliased edge), or ``d <= 0`` without anti-aliasing; the image is
    ``-1 + 2 * coverage * colour``. Fully vectorised: one pass over ``[n, size, size]``.
    """
    if int(n) < 1 or int(size) < 4:
        raise UserError(f"shapes: need n >= 1 and size >= 4, got n={n}, size={size}")
    n, size, g = int(n), int(size), generator
    labels = torch.randint(0, 3, (n,), generator=g)
    radius = size * (0.18 + 0.14 * torch.rand(n, generator=g))
    centre = radius[:, None] + torch.rand(n, 2, generator=g) * (size - 2 * radius)[:, None]
    colour = torch.rand(n, 3, generator=g)
    colour = colour / colour.amax(1, keepdim=True)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dx = grid[None, None, :] - centre[:, 0, None, None]
    dy = grid[None, :, None] - centre[:, 1, None, None]
    dist = _shape_distance(labels, dx, dy, radius)
    cover = (0.5 - dist).clamp_(0, 1) if antialias else (dist <= 0).float()
    x = cover[:, None] * (2 * colour[:, :, None, None]) - 1
    return x, labels, 3


# ----------------------------------------------------------------------------- MNIST IDX
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(path: PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or not) into a numpy array.

    Layout: magic ``00 00 <dtype> <ndim>``, then ``ndim`` big-endian uint32 sizes, then
    the row-major data in big-endian ``dtype``.
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file (bad magic number); expected an "
                        f"MNIST-style file such as train-images-idx3-ubyte")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path}: IDX header is truncated; download the file again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(f"{path}: IDX header announces shape {dims} ({expected} bytes) but "
                        f"the file has {len(raw)} bytes; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def read_mnist_idx(images_path: PathLike, labels_path: Optional[PathLike] = None) -> ImageSet:
    """MNIST-format images (IDX ``[n, H, W]`` uint8) and optional labels (IDX ``[n]``)."""
    images = parse_idx(images_path)
    if images.ndim != 3:
        raise UserError(f"{images_path}: expected IDX images of shape [n, H, W], got "
                        f"{images.shape}; is this the labels file?")
    if images.dtype == np.uint8:
        x = _from_uint8(images)[:, None]
    else:
        x = torch.from_numpy(images.astype(np.float32))[:, None]
    labels = None if labels_path is None else parse_idx(labels_path)
    return _labelled(x, labels, labels_path if labels_path is not None else images_path)


# ----------------------------------------------------------------------------- CIFAR-10
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_files(path: Path) -> list[Path]:
    """The batch files named by ``path``: itself if a file, else its ``data_batch_*.bin``."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"CIFAR-10 path not found: {path}; check the path")
    for folder in (path, path / "cifar-10-batches-bin"):
        files = sorted(folder.glob("data_batch_*.bin"))
        if files:
            return files
    raise UserError(f"{path}: no CIFAR-10 binary batches (data_batch_1.bin ...); extract "
                    f"the binary version (cifar-10-binary.tar.gz) into this folder")


def read_cifar10_bin(folder_or_file: PathLike) -> ImageSet:
    """CIFAR-10 binary version: records of 1 label byte + 3072 pixel bytes (R, G, B planes
    of 32x32, row-major). A folder reads all ``data_batch_*.bin`` (the training set)."""
    xs, ys = [], []
    for file in _cifar_files(Path(folder_or_file)):
        raw = file.read_bytes()
        if not raw or len(raw) % _CIFAR_RECORD:
            raise UserError(f"{file}: size {len(raw)} is not a multiple of {_CIFAR_RECORD} "
                            f"bytes; not a CIFAR-10 binary batch, or truncated")
        rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
        if rec[:, 0].max() > 9:
            raise UserError(f"{file}: label byte above 9; not a CIFAR-10 binary batch "
                            f"(CIFAR-100 has 2 label bytes and is not supported)")
        ys.append(rec[:, 0])
        xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    x = _from_uint8(np.concatenate(xs))
    return x, torch.from_numpy(np.concatenate(ys).astype(np.int64)), 10


# ----------------------------------------------------------------------------- PNG folders
def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _list_images(root: Path) -> tuple[list[Path], Optional[list[int]], list[str]]:
    """Files and labels: images at the top level (no labels) or in class subfolders
    (label = index of the subfolder name in sorted order)."""
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}; check the path")
    top = _image_files(root)
    classes = sorted(d for d in root.iterdir() if d.is_dir() and _image_files(d))
    if top and classes:
        raise UserError(f"{root}: images both at the top level and in subfolders; put all "
                        f"of them in class subfolders or all at the top level")
    if top:
        return top, None, []
    if not classes:
        raise UserError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found here or in "
                        f"its subfolders")
    pairs = [(f, k) for k, d in enumerate(classes) for f in _image_files(d)]
    return [f for f, _ in pairs], [k for _, k in pairs], [d.name for d in classes]


def _probe(files: list[Path]) -> str:
    """Check that all images share one size; return the Pillow mode to convert to."""
    from PIL import Image

    size, gray = None, True
    for f in files:
        try:
            with Image.open(f) as im:
                im_size, mode = im.size, im.mode
        except OSError as err:
            raise UserError(f"{f}: cannot read image ({err})")
        if size is None:
            size, first = im_size, f
        elif im_size != size:
            raise UserError(f"{f}: size {im_size[0]}x{im_size[1]} differs from {first} "
                            f"({size[0]}x{size[1]}); resize all images to one size")
        gray = gray and mode in _GRAY_MODES
    return "L" if gray else "RGB"


def read_png_folder(path: PathLike) -> ImageSet:
    """A folder of same-sized images (PNG, also JPEG/BMP) read with Pillow.

    Images at the top level are unlabelled; images in subfolders are labelled by the
    sorted subfolder names. All grayscale gives 1 channel, otherwise RGB (alpha dropped).
    """
    from PIL import Image

    files, labels, _ = _list_images(Path(path))
    mode = _probe(files)
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert(mode), dtype=np.uint8))
        except OSError as err:
            raise UserError(f"{f}: cannot read image ({err})")
    stack = np.stack(arrays)
    x = _from_uint8(stack[:, None] if mode == "L" else stack.transpose(0, 3, 1, 2))
    return _labelled(x, None if labels is None else np.array(labels), path)


# ----------------------------------------------------------------------------- arrays
_X_KEYS = ("x", "samples", "data")
_CLOUD_KEYS = ("clouds", "points")
_Y_KEYS = ("labels", "y")


def _npy_header(fp) -> Optional[tuple]:
    """``(shape, fortran_order, dtype)`` from the header of the ``.npy`` stream ``fp`` (left at
    the first data byte), without reading the data; None where it is no readable header (the
    loader then says what is wrong)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            return fmt.read_array_header_1_0(fp)
        if version == (2, 0):
            return fmt.read_array_header_2_0(fp)
        impl = getattr(np.lib, "_format_impl", None)  # 3.0 (utf-8 field names): numpy's own reader
        return impl._read_array_header(fp, version) if impl is not None else None
    except (ValueError, OSError, EOFError, AttributeError, SyntaxError, TypeError):
        return None


def _memory_bytes() -> Optional[int]:
    """This machine's physical memory in bytes (None where it cannot be told)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _check_claim(where: str, header: tuple, holds: int) -> None:
    """Refuse an array whose header claims more bytes than its file holds (``holds``) or than
    this machine's memory: numpy would try to allocate them before noticing."""
    shape, _, dtype = header
    if dtype.hasobject:  # refused by the loader (no pickles)
        return
    count = math.prod(int(n) for n in shape)
    need = count * dtype.itemsize
    if need > holds:
        raise UserError(f"{where}: the header claims shape {tuple(shape)} of {dtype} ({count:,} elements, {need:,} "
                        f"bytes) but the file holds only {max(holds, 0):,} data bytes; it is truncated or corrupt: "
                        f"save it again with numpy.save / numpy.savez")
    mem = _memory_bytes()
    if mem is not None and need > mem:
        raise UserError(f"{where}: shape {tuple(shape)} of {dtype} needs {need / 2**30:.1f} GiB, more than this "
                        f"machine's {mem / 2**30:.1f} GiB of memory; use a smaller file")


def check_array_headers(path: PathLike, where: Optional[str] = None) -> None:
    """Read the header of a ``.npy`` (or of each ``.npy`` member of an ``.npz``) and refuse, with
    one UserError line starting with ``where`` (default: the path), an array that claims more
    elements than the file holds or this machine can allocate (a header claiming 2e12
    elements), before numpy allocates anything. Files that are no arrays at all are left to
    the loader, which says so."""
    path = Path(path)
    where = where or str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(6)
            f.seek(0)
            if head == b"\x93NUMPY":
                header = _npy_header(f)
                if header is not None:
                    _check_claim(where, header, path.stat().st_size - f.tell())
                return
            if not head.startswith(b"PK"):
                return
            with zipfile.ZipFile(f) as z:
                for info in z.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    with z.open(info) as member:
                        header = _npy_header(member)
                        if header is not None:
                            _check_claim(f"{where} (array '{info.filename[:-4]}')", header,
                                         info.file_size - member.tell())
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, NotImplementedError, RuntimeError):
        return  # not an archive numpy can read either: the loader's own line


def _load_arrays(path: Path) -> tuple[np.ndarray, Optional[np.ndarray], Optional[str]]:
    """``(x, labels, key)`` from a ``.npy`` (no labels, key None) or ``.npz`` (keys
    x/samples/data or clouds/points, and labels/y), never unpickling; absurd headers are
    refused before any allocation (:func:`check_array_headers`)."""
    check_array_headers(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None, None
        with loaded:
            found = [k for k in (*_X_KEYS, *_CLOUD_KEYS) if k in loaded.files]
            if not found:
                raise UserError(f"{path}: no array named {' / '.join(_X_KEYS + _CLOUD_KEYS)} (found: "
                                f"{', '.join(loaded.files) or 'none'}); save samples as 'x' (clouds as 'clouds')")
            if any(k in _CLOUD_KEYS for k in found) and len(found) > 1:
                raise UserError(f"{path}: holds both {' and '.join(repr(k) for k in found)}, so it is unclear "
                                f"which array is the data; keep only 'clouds' for point clouds or 'x' for the rest")
            ykey = next((k for k in _Y_KEYS if k in loaded.files), None)
            return loaded[found[0]], None if ykey is None else loaded[ykey], found[0]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: cannot read as .npy/.npz without pickle ({err})")


def _to_channels_first(a: np.ndarray, path: Path) -> np.ndarray:
    """``[n, C, H, W]`` stays; ``[n, H, W, C]`` is transposed (C in 1, 3, 4)."""
    first, last = a.shape[1] in (1, 3, 4), a.shape[3] in (1, 3, 4)
    if first:
        return a
    if last:
        return a.transpose(0, 3, 1, 2)
    raise UserError(f"{path}: cannot tell the channel axis of shape {a.shape}; save images "
                    f"as [n, C, H, W] or [n, H, W, C] with C in 1, 3, 4")


def read_array_file(path: PathLike, clouds: bool = False) -> ImageSet:
    """Samples from ``.npy``/``.npz``: ``[n, d]`` points (float32, unchanged), ``[n, H, W]``
    grayscale, ``[n, C, H, W]`` or ``[n, H, W, C]`` images, or ``[n, N, 3]`` point clouds.
    uint8 images are rescaled to ``[-1, 1]``; float images are taken as already in ``[-1, 1]``.

    Point clouds (float32 coordinates, unchanged) are read only when marked, since
    ``[n, N, 3]`` is also the shape of grayscale images 3 pixels wide: ``clouds=True``
    (the registry's ``clouds:FILE`` spec) or an ``.npz`` array named ``clouds`` or
    ``points``. A marked array must be ``[n, N, 3]``; an unmarked ``[n, H, 3]`` array is
    refused as ambiguous (mark it, or save images as ``[n, 1, H, W]``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}; check the path")
    a, labels, key = _load_arrays(path)
    if clouds or key in _CLOUD_KEYS:
        where = f"array '{key}' of {path}" if key in _CLOUD_KEYS else f"clouds:{path}"
        if a.dtype.kind not in "iuf" or a.ndim != 3 or a.shape[2] != 3 or a.shape[0] == 0 or a.shape[1] == 0:
            raise UserError(f"{where}: expected point clouds [n, N, 3] (n clouds of N points in 3-D), "
                            f"got {a.dtype} {a.shape}")
    elif a.ndim == 3 and a.shape[2] == 3:
        raise UserError(f"{path}: shape {a.shape} is ambiguous (point clouds [n, N, 3] or grayscale images "
                        f"3 pixels wide); give clouds:{path} (or an .npz array named 'clouds') for clouds, "
                        f"or save images as [n, 1, H, W]")
    elif a.dtype.kind not in "biuf" or a.ndim not in (2, 3, 4) or a.shape[0] == 0:
        raise UserError(f"{path}: expected numbers of shape [n, d] (points) or [n, H, W], "
                        f"[n, C, H, W], [n, H, W, C] (images), got {a.dtype} {a.shape}")
    elif a.ndim == 3:
        a = a[:, None]
    if a.ndim == 4:
        a = _to_channels_first(a, path)
    is_u8_image = a.dtype == np.uint8 and a.ndim == 4
    x = _from_uint8(a) if is_u8_image else torch.from_numpy(np.array(a, np.float32, order="C"))
    if not torch.isfinite(x).all():
        raise UserError(f"{path}: contains NaN or infinite values; clean the data first")
    return _labelled(x, labels, path)
