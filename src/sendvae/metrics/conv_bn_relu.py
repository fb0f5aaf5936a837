"""The FID Inception's conv unit for inference: conv -> BN -> ReLU with the BN folded into the conv, fused.

In eval without autograd through the weights, BN(conv(x)) = conv(x; W * g / s, (b - mu) * g / s + beta) with
s = sqrt(var + eps): one conv, its folded weight and bias cached until a weight or a BN statistic changes;
on CPU it runs as oneDNN's conv + bias + ReLU in one kernel with a prepacked weight (the ops torch.compile's
CPU weight freezing emits; checked once against F.conv2d, else plain F.conv2d). Training mode, or a
gradient through the weights, runs torchvision's BasicConv2d as it is. The state_dict is BasicConv2d's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torchvision.models.inception import BasicConv2d


@functools.cache
def _onednn_fused_conv() -> bool:
    """Whether this torch build runs oneDNN's conv + bias + ReLU in one kernel with a prepacked weight
    (mkldnn::_convolution_pointwise and _reorder_convolution_weight, the ops torch.compile's CPU weight
    freezing emits): checked once, on a small conv against F.conv2d."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)  # leaves the global RNG alone
            x, w, b = (torch.randn(shape, generator=gen) for shape in ((1, 3, 5, 5), (4, 3, 3, 3), (4,)))
            ones = [1, 1]  # padding, stride and dilation
            packed = torch.ops.mkldnn._reorder_convolution_weight(w, ones, ones, ones, 1, [1, 3, 5, 5])
            y = torch.ops.mkldnn._convolution_pointwise(x, packed, b, ones, ones, ones, 1, "relu", [], "")
            return torch.allclose(y, F.relu(F.conv2d(x, w, b, padding=1)), rtol=1e-4, atol=1e-5)
    except (AttributeError, RuntimeError, TypeError):
        return False


class ConvBNReLU(BasicConv2d):
    """torchvision's BasicConv2d (conv without bias -> BatchNorm, eps 1e-3 -> ReLU), same submodules and
    state_dict keys, with the BatchNorm folded into the conv where it is a fixed affine map.

    In eval mode BN(y) = (y - mean) * s + beta with s = gamma / sqrt(var + eps) per output channel, so
    BN(conv(x, W)) = conv(x, W * s[:, None, None, None]) + (beta - mean * s): one conv with a bias and
    the ReLU, instead of a conv, a BN pass and a ReLU pass over every activation. The folded weight and
    bias are computed in float64, cast to the weights' dtype, and cached; the cache is keyed on the
    storage and version counter of the five tensors, so load_state_dict, in-place edits and .to() refold
    on the next call (a module built under torch.inference_mode has no version counters: there only a
    new storage refolds). The result differs from the unfolded one by float32 rounding (~1e-6 relative).

    On CPU in float32 the folded conv and the ReLU run as one oneDNN kernel with the weight reordered
    once into oneDNN's blocked layout for the input's shape (cached; a new input shape repacks), where
    F.conv2d reorders it on every call and, single-threaded, sends small-batch 1x1 convs to ATen's
    GEMM-based slow_conv2d instead of oneDNN.
    Training mode, or autograd through the weights (grad mode on and a weight that requires grad), runs
    the three unfolded steps; with grad mode on and an input that requires grad the folded conv runs as
    F.conv2d, so gradients with respect to the input flow.
    """

    _folded: tuple[torch.Tensor, torch.Tensor] | None = None
    _fold_key: tuple[object, ...] = ()
    _packed: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None  # (shape, weight, packed)

    def _fold_sources(self) -> tuple[torch.Tensor, ...]:
        bn = self.bn
        assert bn.weight is not None and bn.bias is not None
        assert bn.running_mean is not None and bn.running_var is not None
        return self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (C_out, C_in, kh, kw), bias (C_out,)) of the conv with the eval-mode BN folded in."""
        sources = self._fold_sources()
        # Inference tensors (a module built under torch.inference_mode) have no version counter.
        key = (self.bn.eps, *((t.data_ptr(), None if t.is_inference() else t._version) for t in sources))
        if self._folded is None or key != self._fold_key:
            dtype = self.conv.weight.dtype
            # Plain tensors (not inference tensors), so that the cache serves outside inference mode too.
            with torch.inference_mode(False), torch.no_grad():
                w, gamma, beta, mean, var = (t.double() for t in sources)
                scale = gamma / torch.sqrt(var + self.bn.eps)
                self._folded = ((w * scale[:, None, None, None]).to(dtype), (beta - mean * scale).to(dtype))
            self._fold_key = key
        return self._folded

    def _onednn_conv_relu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        shape = tuple(x.shape)
        if self._packed is None or self._packed[0] != shape or self._packed[1] is not weight:
            packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *geometry, list(shape))
            self._packed = (shape, weight, packed)
        return torch.ops.mkldnn._convolution_pointwise(x, self._packed[2], bias, *geometry, "relu", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        if self.training or (grad and any(t.requires_grad for t in self._fold_sources())):
            return super().forward(x)
        weight, bias = self.folded()
        if (
            x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32
            and not (grad and x.requires_grad)
            and torch.backends.mkldnn.enabled
            and _onednn_fused_conv()
        ):
            return self._onednn_conv_relu(x, weight, bias)
        return F.relu_(self.conv._conv_forward(x, weight, bias))

    def __getstate__(self) -> dict[str, object]:
        """Pickling and deepcopy drop the caches (a packed oneDNN weight has no storage to copy)."""
        state = self.__dict__.copy()
        for cache in ("_folded", "_fold_key", "_packed"):
            state.pop(cache, None)
        return state
