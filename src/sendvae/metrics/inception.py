"""The FID Inception-v3 (TF graph inception-2015-12-05) in PyTorch, as the ADM evaluator uses it.

Weights: pt_inception-2015-12-05-6726825d.pth, the TF graph's constants ported to the torchvision
Inception3 key layout (Conv2d_1a_3x3 ... Mixed_7c, fc with 1008 classes; no AuxLogits). The user passes
its path, or explicitly allows `download_weights` to fetch WEIGHTS_URL into torch's hub cache
(`cached_weights_path`), which later runs then use; nothing is downloaded without that permission.

The graph differs from torchvision's Inception3 in three places, all reproduced below:
- the average pools inside the A, C and E blocks ignore the zero padding (count_include_pad=False);
- the last E block (Mixed_7c) pools its fourth branch with a max pool instead of an average pool;
- the input goes through ResizeBilinear to 299 (TF1 semantics, see tf1_bilinear_resize), then
  (x - 128) / 128 on 0-255 pixel values.

For speed (none of it changes the state_dict): on CPU the network runs channels-last from the resize
on, and in eval without autograd through the weights every conv -> BN -> ReLU runs as one conv with the
BN folded into its weight and bias (ConvBNReLU), on CPU as oneDNN's fused conv + ReLU with a prepacked
weight. The features equal the unfolded computation within float32 rounding (~1e-6 relative).

Outputs, named after the TF tensors the ADM evaluator reads:
- "pool": pool_3:0, (N, 2048), the FID features (and precision/recall);
- "spatial": mixed_6/conv:0[..., :7] flattened in TF's (H, W, C) order, (N, 17 * 17 * 7 = 2023), the
  sFID features. In the TF graph the 17x17 blocks are mixed_3 (reduction, Mixed_6a) and mixed_4..mixed_7
  (Mixed_6b..Mixed_6e), so mixed_6/conv is the 1x1 branch of Mixed_6d after BN + ReLU: Mixed_6d.branch1x1,
  a (N, 192, 17, 17) map;
- "logits": pool_3 @ fc.weight^T, (N, 1008) without the bias, as ADM takes softmax/logits/MatMul's weight
  for the Inception Score.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime.weights import read_weights
from .conv_bn_relu import ConvBNReLU

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether x (N, C, H, W) is laid out as a contiguous (N, H, W, C) array and not also NCHW-contiguous
    (C == 1 or H == W == 1 are both)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def tf1_bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `tf.image.resize_bilinear` (align_corners=False, half_pixel_centers=False), (N, C, H, W).

    Output pixel i samples the input at src = i * (in / out) (no half-pixel offset), between
    i0 = floor(src) and i1 = min(i0 + 1, in - 1) with weight w = src - i0. As TF's kernel: the index
    math is float32, each input row is first interpolated horizontally, left + (right - left) * wx,
    and each output row then blends the two rows around it, top + (bottom - top) * wy.

    Both passes gather runs of contiguous memory rather than single values, so the result is
    bit-identical to gathering pixel by pixel at a fraction of the cost (gathering single values along
    the last dim of an NCHW tensor was over 10x slower on CPU: 116 vs 5 ms for 4 images, 256 -> 299).
    The result keeps the input's memory format. A channels-last input (uint8 NHWC images made float,
    as prepare does) is resized in its (N, H, W, C) memory: the horizontal pass gathers the C values
    of each source pixel from (N * H, W * C) rows, the vertical pass whole (w_out * C) rows; ~4 vs
    6.5 ms for the NCHW way plus a channels-last copy (4 images, 256 -> 299, one thread). Any other
    input goes through a (N, C, W, H) copy for the horizontal pass and comes out contiguous NCHW.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    h_in, w_in = x.shape[-2:]
    h_out, w_out = size

    def coords(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = torch.arange(n_out, dtype=torch.float32) * scale
        i0 = src.floor().long().clamp_(max=n_in - 1)
        i1 = (i0 + 1).clamp_(max=n_in - 1)
        return i0.to(x.device), i1.to(x.device), (src - i0.float()).to(x.device, x.dtype)

    y0, y1, wy = coords(h_in, h_out)
    x0, x1, wx = coords(w_in, w_out)
    if _is_channels_last(x):
        n, c = x.shape[:2]
        # A view with one image row of W pixels x C channels per row (index_select on the last dim of
        # a 2-d tensor: 6x faster than of the 3-d (N, H, W * C) view, torch 2.14).
        rows_in = x.permute(0, 2, 3, 1).reshape(n * h_in, w_in * c)
        pixel = lambda i: (i[:, None] * c + torch.arange(c, device=x.device)).flatten()  # pixel -> its C
        left, right = rows_in.index_select(1, pixel(x0)), rows_in.index_select(1, pixel(x1))
        rows = (left + (right - left) * wx.repeat_interleave(c)).view(n, h_in, w_out * c)
        top, bottom = rows.index_select(1, y0), rows.index_select(1, y1)  # (N, h_out, w_out * C)
        out = top + (bottom - top) * wy[:, None]
        return out.view(n, h_out, w_out, c).permute(0, 3, 1, 2)
    cols = x.transpose(2, 3).contiguous()  # (N, C, W, H): a column is a contiguous row here
    left, right = cols.index_select(2, x0), cols.index_select(2, x1)  # (N, C, w_out, H)
    rows = (left + (right - left) * wx[:, None]).transpose(2, 3).contiguous()  # (N, C, H, w_out)
    top, bottom = rows.index_select(2, y0), rows.index_select(2, y1)  # (N, C, h_out, w_out)
    return top + (bottom - top) * wy[:, None]


def _pool(x: torch.Tensor, kind: str, stride: int = 1) -> torch.Tensor:
    """The graph's 3x3 pools: stride 1 with padding 1 in the pooling branches (TF's average excludes the
    padding), stride 2 without padding in the stem and the two reduction blocks.

    On CPU an NCHW input is pooled in a channels-last copy and the result copied back to NCHW: ATen's
    NCHW CPU pooling kernels are 5-20x slower than its channels-last ones at these shapes (torch 2.14,
    the two copies included), and both take the window's max, or its sum in the same (row, column)
    order, so the result is bit-identical. The output keeps the input's memory format. FIDInceptionV3
    runs channels-last on CPU, so there it pools without copies; on GPU the kernels are used as they are.
    """
    nchw = x.device.type == "cpu" and x.is_contiguous()
    if nchw:
        x = x.contiguous(memory_format=torch.channels_last)
    pad = 1 if stride == 1 else 0
    if kind == "max":
        y = F.max_pool2d(x, kernel_size=3, stride=stride, padding=pad)
    else:
        y = F.avg_pool2d(x, kernel_size=3, stride=stride, padding=pad, count_include_pad=False)
    return y.contiguous() if nchw else y


class BlockA(nn.Module):
    """35x35 block (mixed, mixed_1, mixed_2): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBNReLU(cin, 64, kernel_size=1)
        self.branch5x5_1 = ConvBNReLU(cin, 48, kernel_size=1)
        self.branch5x5_2 = ConvBNReLU(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = ConvBNReLU(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, kernel_size=3, padding=1)
        self.branch_pool = ConvBNReLU(cin, pool_features, kernel_size=1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_pool(x, "avg"))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class BlockB(nn.Module):
    """35 -> 17 reduction (mixed_3): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2; torchvision's InceptionB layout."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBNReLU(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = ConvBNReLU(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), bd, _pool(x, "max", stride=2)], 1)


class BlockC(nn.Module):
    """17x17 block (mixed_4..mixed_7): 1x1 | factorised 7x7 | double factorised 7x7 | pool-1x1."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBNReLU(cin, 192, kernel_size=1)
        self.branch7x7_1 = ConvBNReLU(cin, c7, kernel_size=1)
        self.branch7x7_2 = ConvBNReLU(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBNReLU(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBNReLU(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = ConvBNReLU(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBNReLU(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBNReLU(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBNReLU(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = ConvBNReLU(cin, 192, kernel_size=1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            bd = conv(bd)
        bd = self.branch7x7dbl_5(bd)
        return [self.branch1x1(x), b7, bd, self.branch_pool(_pool(x, "avg"))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class BlockD(nn.Module):
    """17 -> 8 reduction (mixed_8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2; torchvision's InceptionD."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBNReLU(cin, 192, kernel_size=1)
        self.branch3x3_2 = ConvBNReLU(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = ConvBNReLU(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = ConvBNReLU(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBNReLU(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBNReLU(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([b3, b7, _pool(x, "max", stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block (mixed_9, mixed_10) with split 1x3 / 3x1 heads; `pool` is "avg" or, in mixed_10, "max"."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBNReLU(cin, 320, kernel_size=1)
        self.branch3x3_1 = ConvBNReLU(cin, 384, kernel_size=1)
        self.branch3x3_2a = ConvBNReLU(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBNReLU(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBNReLU(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = ConvBNReLU(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = ConvBNReLU(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBNReLU(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = ConvBNReLU(cin, 192, kernel_size=1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return [self.branch1x1(x), b3, bd, self.branch_pool(_pool(x, self.pool))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID TF graph; forward(images) -> {"pool", "spatial", "logits"}."""

    def __init__(self):
        super().__init__()
        # Stem: 299 -> 149 -> 147 -> 147 -> pool 73 -> 73 -> 71 -> pool 35.
        self.Conv2d_1a_3x3 = ConvBNReLU(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = ConvBNReLU(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = ConvBNReLU(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = ConvBNReLU(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = ConvBNReLU(80, 192, kernel_size=3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)  # 35 -> 17 reduction; max pool only, same as TF
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)  # 17 -> 8 reduction
        self.Mixed_7b = BlockE(1280, pool="avg")
        self.Mixed_7c = BlockE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Images -> float32 (N, 3, H, W) pixel values in [0, 255], the graph's input.

        uint8 (N, H, W, 3) (ADM .npz layout) or (N, 3, H, W) is taken as is; a float tensor must be
        (N, 3, H, W) in [-1, 1], the project's model convention. Results match the ADM evaluator
        exactly only for uint8 input, since its samples are quantised before evaluation.
        """
        if images.ndim != 4:
            raise ValueError(
                f"expected a batch of images (N, H, W, 3) or (N, 3, H, W), got {tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            if images.shape[-1] == 3 and images.shape[1] != 3:
                images = images.permute(0, 3, 1, 2)
            if images.shape[1] != 3:
                raise ValueError(f"expected 3 colour channels, got shape {tuple(images.shape)}")
            return images.float()
        if not images.is_floating_point() or images.shape[1] != 3:
            raise ValueError(
                f"float images must be (N, 3, H, W) in [-1, 1], got {images.dtype} {tuple(images.shape)}"
            )
        return (images.float() + 1.0) * 127.5

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (see prepare) -> {"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)}.

        On CPU the network runs channels-last: the resize, every conv (oneDNN's NHWC kernels; the
        stem's 3x3 convs at 147x147 take about half the time of NCHW) and the pools, without layout
        copies between them. uint8 NHWC input is channels-last as it comes (prepare's permute is a
        view); other input is copied into that layout once, after the resize. On other devices a
        resized input runs NCHW and a 299 px one in the layout it comes in.
        """
        x = self.prepare(images)
        if x.shape[-2:] != (299, 299):
            x = tf1_bilinear_resize(x, (299, 299))
            if x.device.type != "cpu":
                x = x.contiguous()
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _pool(x, "max", stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _pool(x, "max", stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))  # (N, 768, 17, 17)
        branches = self.Mixed_6d.branches(x)
        # mixed_6/conv:0[..., :7] in NHWC order: (N, 7, 17, 17) -> (N, 17, 17, 7) -> (N, 2023)
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_6e(torch.cat(branches, 1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # pool_3: 8x8 average pool
        logits = pool @ self.fc.weight.T  # (N, 1008), no bias as in ADM's softmax graph
        return {"pool": pool, "spatial": spatial, "logits": logits}


def cached_weights_path() -> Path:
    """Where `download_weights` puts the file: $TORCH_HOME/hub/checkpoints/<WEIGHTS_FILE>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def download_weights(dest: str | Path | None = None) -> Path:
    """Fetch WEIGHTS_URL to `dest` (default: the hub cache), atomically; a clear error when offline."""
    dest = Path(dest) if dest is not None else cached_weights_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(dest), progress=True)  # temp file + rename
    except Exception as e:  # URLError, HTTPError, OSError, ...: all mean "not downloaded"
        raise ConnectionError(
            f"could not download the FID Inception weights from {WEIGHTS_URL} ({e}); fetch {WEIGHTS_FILE} "
            "on a machine with internet and pass --inception-weights PATH"
        ) from e
    return dest


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build the FID Inception from a pt_inception-2015-12-05 state dict file; eval mode, no grads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Download {WEIGHTS_FILE} (the TF "
            f"inception-2015-12-05 graph ported to PyTorch by pytorch-fid) from {WEIGHTS_URL} "
            "and pass its path."
        )
    state = read_weights(path, "FID Inception weights")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    net = FIDInceptionV3()
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path} does not match the {WEIGHTS_FILE} layout: {e}") from e
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a {WEIGHTS_FILE} state dict: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    return net.eval().requires_grad_(False).to(device)
