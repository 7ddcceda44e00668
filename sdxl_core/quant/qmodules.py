"""Real 8-bit modules for a ModelOpt-calibrated UNet.

`convert_to_real` turns a `quantize.quantize_unet` result (ModelOpt fake quant) into plain torch modules:
- Linear layers run true W8A8 GEMMs (`kernels.int8_gemm` / `kernels.fp8_gemm`): the SmoothQuant scale
  multiplies the input, the input is quantized per tensor, weights are stored 8-bit with per-channel
  (INT8) or per-tensor (FP8) scales. 1x1 convs with stride 1 run the same GEMM on channels-last pixels.
- Other convs (3x3): PyTorch has no int8/fp8 convolution, so they are "8-bit numerics, 16-bit compute":
  the weight is stored 8-bit (the engine stays small) and dequantized once after loading, the input is
  quantized and dequantized with the calibrated scale, and the conv runs in the activation dtype. The
  result equals the ModelOpt fake-quant conv up to float rounding.
- FP8 level-4 attention quantizers (Q, K, V, softmax) are dropped: attention runs in the activation dtype.
  Only TensorRT runs FP8 attention; the report counts what was dropped.
- Per layer, `gemm_path` says how it runs: "8bit" (the 8-bit kernel named by `kernel`) or "16bit": a plain
  16-bit GEMM or conv on the dequantized weight and the (smoothed) input quantized and dequantized with the
  calibrated scale, i.e. the FP16 model's GEMM cost with the 8-bit numerics. An 8-bit kernel is not faster than
  cuBLAS/cuDNN fp16 at every shape, so `gemm_dispatch` times the candidates on the engine's GPU per distinct
  shape and records the choice in the layer plan: a reloaded engine runs what was measured. The choice is one of
  speed only: both paths compute the same quantized values and differ by float rounding, so a build that picks
  another path for a shape whose timings are close renders the same images (an input left unquantized on the
  16-bit path moved the INT8 UNet's output by 2x its baseline tolerance on Hopper when 60 cross-attention K/V
  projections changed path between two builds of the same code).

The UNet-level plumbing (`convert_to_real`, the layer plan that rebuilds these modules without ModelOpt, `save`,
`load`) is `unet_plan`, which imports this module; its public names are re-exported here, imported on first
use so that neither module needs the other loaded first: callers use `qmodules.X`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdxl_core.errors import UserError
from sdxl_core.quant import plan as plan_schema
from sdxl_core.quant.kernels import gemm8_cutlass, ops
from sdxl_core.quant.kernels.fp8_gemm import quantize_fp8
from sdxl_core.quant.kernels.int8_gemm import quantize_per_tensor

GEMM_PATHS = plan_schema.GEMM_PATHS
# The 8-bit kernel a layer runs until the dispatch picks another: the Triton INT8 GEMM, cuBLAS FP8 (through
# torch._scaled_mm), and for 3x3 convs the emulation (8-bit numerics, 16-bit compute; what runs on the CPU).
# The dispatch may pick "cutlass:<config>" for all three (the Hopper CUTLASS GEMM and conv kernels), and
# "scaled_mm_fast" (cuBLAS FP8 with fast accumulation) for FP8.
DEFAULT_KERNELS = {"int8": "pointer", "fp8": "scaled_mm", "conv": "emulated"}
CUTLASS = "cutlass:"
QMAX = {"int8": 127.0, "fp8": 448.0}
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_MIN_AMAX = 2.0**-24  # ModelOpt quantizes to zero below this amax; a floor keeps the scales finite


def quantize(x: torch.Tensor, scale: torch.Tensor, fmt: str, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """x * (1 / scale) rounded to int8 or fp8 e4m3 (scale broadcasts: per tensor or per channel); `inverse` is
    1 / scale computed beforehand (the layers' `a_inv_scale`), else it is computed here."""
    if fmt == "int8":
        return quantize_per_tensor(x, scale, inverse)
    return quantize_fp8(x, scale, inverse)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, fmt: str, inverse: torch.Tensor | None = None) -> torch.Tensor:
    return (quantize(x, scale, fmt, inverse).float() * scale).to(x.dtype)


def gemm(x: torch.Tensor, w: torch.Tensor, a_scale, w_scale, bias, fmt: str, kernel: str, a_inv_scale=None):
    """Quantize x with plain torch ops (Inductor fuses them into the producer), then the 8-bit GEMM op."""
    x_q = quantize(x.reshape(-1, x.shape[-1]), a_scale, fmt, a_inv_scale)
    return mm(x_q, w, a_scale, w_scale, bias, fmt, kernel, x.dtype).reshape(*x.shape[:-1], w.shape[0])


def mm(x_q: torch.Tensor, w, a_scale, w_scale, bias, fmt: str, kernel: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The 8-bit GEMM op on an already quantized 2-D input; the result in `out_dtype`."""
    if fmt == "int8":
        return ops.int8_mm(x_q, w, a_scale, w_scale, bias, out_dtype, kernel)
    return ops.fp8_mm(x_q, w, a_scale, w_scale, bias, out_dtype, kernel)


class QuantizedModule(torch.nn.Module):
    """Buffers shared by the 8-bit modules. `weight` (8-bit) and the float32 scales keep their dtype
    through `.to(dtype)` / `.half()`: only bias, smooth and cached weights follow the activation dtype."""

    FMT = ""
    _FIXED = ("weight", "w_scale", "a_scale", "a_inv_scale", "w_scale_n", "geglu_weight", "geglu_w_scale")
    _KEEP_LAYOUT = ()
    gemm_path = "8bit"  # or "16bit": chosen per shape by `gemm_dispatch`
    kernel = ""  # which 8-bit kernel the "8bit" path runs (DEFAULT_KERNELS until the dispatch picks one)

    def _init_buffers(self, weight_shape, out_features, *, bias, per_channel, dtype, device):
        self.per_channel = per_channel
        self.act_dtype = dtype  # the activation dtype: what the layer returns; follows `.to(dtype)` (`_apply`)
        self.register_buffer("weight", torch.empty(weight_shape, dtype=STORAGE[self.FMT], device=device))
        w_scale_shape = (out_features,) if per_channel else ()
        self.register_buffer("w_scale", torch.empty(w_scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("a_scale", torch.empty((), dtype=torch.float32, device=device))
        # 1 / a_scale, made once from a_scale (`sync_inverse_scale`), not stored in the engine: the input quantization
        # multiplies by it. Taken from a_scale inside the compiled producers, the reciprocal was computed for every
        # element (the INT8 LayerNorm, GEGLU and attention-output kernels on Hopper were named `reciprocal`); made once,
        # the INT8 step took 0.34 ms less (docs/perf.md).
        self.register_buffer("a_inv_scale", None, persistent=False)
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("w_dq", None, persistent=False)  # the dequantized weight of the 16-bit path
        # A per-tensor FP8 weight scale expanded to one per output channel, once, for the CUTLASS GEMM (which takes
        # a vector): expanding it inside every call cost a copy kernel per layer and step.
        self.register_buffer("w_scale_n", None, persistent=False)
        # A GEGLU projection on the CUTLASS GEGLU GEMM takes its weight, scale and bias interleaved
        # (`gemm8_cutlass.interleave`): made once after loading, beside the stored ones (the engine files keep W1).
        for name in ("geglu_weight", "geglu_w_scale", "geglu_bias"):
            self.register_buffer(name, None, persistent=False)
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def runs_8bit_gemm(self) -> bool:
        return self.gemm_path == "8bit"

    @property
    def needs_float_weight(self) -> bool:
        return not self.runs_8bit_gemm

    def set_gemm_path(self, path: str, dtype: torch.dtype | None = None, kernel: str | None = None):
        if path not in GEMM_PATHS:
            raise UserError(f"unknown GEMM path {path!r}: choose one of {', '.join(GEMM_PATHS)}")
        self.gemm_path = path
        if kernel is not None:
            self.kernel = kernel
        self.dequantize_weight(dtype)

    def dequantize_weight(self, dtype: torch.dtype | None = None):
        """Cache the float weight the 16-bit path (and the conv emulation) computes with, once after loading. It is
        the weight the 8-bit kernels see (divided by any SmoothQuant scale): the 16-bit path multiplies it with the
        same smoothed and quantized input."""
        self.sync_inverse_scale()
        self._interleave_for_geglu()
        expand = (
            self.runs_8bit_gemm
            and not self.per_channel
            and self.kernel.startswith(CUTLASS)
            and self.kernel not in gemm8_cutlass.GEGLU_KERNELS  # which takes the scalar
        )
        self.w_scale_n = (
            self.w_scale.reshape(-1).expand(self.weight.shape[0]).contiguous()
            if expand and not self.weight.is_meta
            else None
        )
        if not self.needs_float_weight or self.weight.is_meta:
            self.w_dq = None
            return
        self.w_dq = self.float_weight(dtype or (self.bias.dtype if self.bias is not None else torch.float32))

    def sync_inverse_scale(self):
        """Make `a_inv_scale` 1 / a_scale again: after loading, and after anything changed a_scale in place (it is
        updated in place too, so a CUDA graph that captured it reads the new value)."""
        if self.a_scale.is_meta:
            self.a_inv_scale = None
            return
        inverse = 1.0 / self.a_scale.float()
        if self.a_inv_scale is not None and self.a_inv_scale.shape == inverse.shape:
            self.a_inv_scale.copy_(inverse)
        else:
            self.a_inv_scale = inverse

    def set_activation_scale(self, value) -> None:
        """a_scale <- value in place (a CUDA graph that captured it reads the new value), and its reciprocal with it:
        the one way to change a loaded layer's activation scale."""
        self.a_scale.copy_(value)
        self.sync_inverse_scale()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x (already smoothed) quantized with the layer's activation scale."""
        return quantize(x, self.a_scale, self.FMT, self.a_inv_scale)

    def fake_quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x (already smoothed) quantized and dequantized in x's dtype: the 16-bit path's 8-bit numerics."""
        return fake_quantize(x, self.a_scale, self.FMT, self.a_inv_scale)

    def _interleave_for_geglu(self):
        if self.kernel not in gemm8_cutlass.GEGLU_KERNELS or self.weight.is_meta:
            self.geglu_weight = self.geglu_w_scale = self.geglu_bias = None
            return
        self.geglu_weight = gemm8_cutlass.interleave(self.weight)
        per_row = self.w_scale.numel() > 1
        self.geglu_w_scale = gemm8_cutlass.interleave(self.w_scale.reshape(-1)) if per_row else self.w_scale.reshape(1)
        self.geglu_bias = None if self.bias is None else gemm8_cutlass.interleave(self.bias)

    @property
    def gemm_w_scale(self) -> torch.Tensor:
        """The weight scale the 8-bit GEMM op takes (per tensor, or already expanded for the CUTLASS kernels)."""
        return self.w_scale if self.w_scale_n is None else self.w_scale_n

    def float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in `dtype` as the 8-bit kernels see it: a SmoothQuant layer's weight stays divided
        by its scale, since every path multiplies the input by it."""
        scale = self.w_scale.reshape(-1, *[1] * (self.weight.dim() - 1)) if self.per_channel else self.w_scale
        return (self.weight.float() * scale).to(dtype)

    def _float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.w_dq is None:  # buffers were assigned directly rather than through load_state_dict
            self.dequantize_weight(dtype)
        return self.w_dq if self.w_dq.dtype == dtype else self.w_dq.to(dtype)

    def _apply(self, fn, recurse=True):
        before = {name: self._buffers[name] for name in self._FIXED if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        self.act_dtype = fn(torch.empty(0, dtype=self.act_dtype)).dtype
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype or (name in self._KEEP_LAYOUT and new.stride() != old.stride()):
                # a dtype cast (or a layout a kernel relies on changed): keep the old tensor, take the new device
                self._buffers[name] = old.to(new.device)
        return self

    def _fill(self, weight, w_amax, a_amax, bias):
        """Quantize a float weight with amax-derived scales: scale = amax / 127 (int8) or amax / 448 (fp8)."""
        qmax = QMAX[self.FMT]
        w_scale = w_amax.float().clamp(min=_MIN_AMAX).reshape(self.w_scale.shape) / qmax
        w_scale_b = w_scale.reshape(-1, *[1] * (weight.dim() - 1)) if self.per_channel else w_scale
        self.weight = quantize(weight.detach(), w_scale_b, self.FMT)
        self.w_scale = w_scale
        self.a_scale = a_amax.float().clamp(min=_MIN_AMAX).reshape(()) / qmax
        self.sync_inverse_scale()
        self.bias = None if bias is None else bias.detach().clone()


class QLinear(QuantizedModule):
    def __init__(
        self, in_features, out_features, *, bias=True, smooth=False, per_channel=True, dtype=torch.float32, device=None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers(
            (out_features, in_features), out_features, bias=bias, per_channel=per_channel, dtype=dtype, device=device
        )
        self.register_buffer("smooth", torch.empty(in_features, dtype=dtype, device=device) if smooth else None)
        self.kernel = DEFAULT_KERNELS[self.FMT]

    @classmethod
    def empty_like(cls, linear: torch.nn.Linear, *, smooth: bool, per_channel: bool):
        w = linear.weight
        return cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            smooth=smooth,
            per_channel=per_channel,
            dtype=w.dtype,
            device=w.device,
        )

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, *, w_amax, a_amax, smooth=None, weight=None):
        """From a float layer and amaxes. With `smooth`, the weight must already be divided by it per input
        channel (SmoothQuant computes (x * smooth) @ (W / smooth)^T)."""
        module = cls.empty_like(linear, smooth=smooth is not None, per_channel=w_amax.numel() > 1)
        module._fill(linear.weight if weight is None else weight, w_amax, a_amax, linear.bias)
        if smooth is not None:
            module.smooth = smooth.detach().clone().to(linear.weight.dtype)
        return module

    def forward(self, x):
        if x.dtype == STORAGE[self.FMT]:
            return self._forward_prequantized(x)
        if self.smooth is not None:
            x = x * self.smooth
        if not self.runs_8bit_gemm:
            return F.linear(self.fake_quantize_input(x), self._float_weight(x.dtype), self.bias)
        return gemm(x, self.weight, self.a_scale, self.gemm_w_scale, self.bias, self.FMT, self.kernel, self.a_inv_scale)

    def _forward_prequantized(self, x_q: torch.Tensor) -> torch.Tensor:
        """An input in the layer's 8-bit format is one the kernel before it has already smoothed and quantized with
        this layer's scales (a LayerNorm on `kernels.layernorm8`, `quant.layernorm`): the GEMM runs on it as it is,
        and the output is in the activation dtype."""
        flat = x_q.reshape(-1, self.in_features)
        if self.runs_8bit_gemm:
            y = self.forward_quantized(flat, self.act_dtype)
        else:
            x_dq = (flat.float() * self.a_scale).to(self.act_dtype)
            y = F.linear(x_dq, self._float_weight(self.act_dtype), self.bias)
        return y.reshape(*x_q.shape[:-1], self.out_features)

    def forward_quantized(self, x_q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """This layer on an input [M, K] that another kernel has already multiplied by `smooth` and quantized with
        `a_scale` (the fused GEGLU projection does, for the feed-forward's second layer; the attention and LayerNorm
        kernels do, for the layer after them)."""
        return mm(x_q, self.weight, self.a_scale, self.gemm_w_scale, self.bias, self.FMT, self.kernel, out_dtype)

    def extra_repr(self):
        return (
            f"in={self.in_features}, out={self.out_features}, smooth={self.smooth is not None}, "
            f"gemm={self.gemm_path}, kernel={self.kernel}"
        )


class Int8Linear(QLinear):
    FMT = "int8"


class Fp8Linear(QLinear):
    FMT = "fp8"


class QConv2d(QuantizedModule):
    _FIXED = (*QuantizedModule._FIXED, "w_krsc", "w_scale_k")
    _KEEP_LAYOUT = ("w_krsc",)  # the CUTLASS conv reads [K, R, S, C] packed, whatever `.to(channels_last)` says

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        *,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        groups=1,
        bias=True,
        per_channel=True,
        dtype=torch.float32,
        device=None,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self._init_buffers(
            (out_channels, in_channels // groups, *kernel_size),
            out_channels,
            bias=bias,
            per_channel=per_channel,
            dtype=dtype,
            device=device,
        )
        self.kernel = DEFAULT_KERNELS[self.FMT if self.as_gemm else "conv"]
        self.register_buffer("w_krsc", None, persistent=False)  # the CUTLASS conv's weight layout
        self.register_buffer("w_scale_k", None, persistent=False)  # w_scale expanded to one per output channel
        self.conv_config = -1  # the CUTLASS conv config index of `kernel` (an int, so compiled code sees a constant)

    @property
    def runs_cutlass_conv(self) -> bool:
        return not self.as_gemm and self.gemm_path == "8bit" and self.kernel.startswith(CUTLASS)

    def dequantize_weight(self, dtype: torch.dtype | None = None):
        """Besides the float weight, a layer on the CUTLASS conv keeps its weight as [K, R, S, C] once."""
        super().dequantize_weight(dtype)
        if not self.runs_cutlass_conv or self.weight.is_meta:
            self.w_krsc = self.w_scale_k = None
            return
        from sdxl_core.quant.kernels import conv_cutlass

        # The index from the names this build knows: loading the library is left to the GPU that runs it.
        self.conv_config = conv_cutlass.CONFIG_NAMES[self.FMT].index(self.kernel.removeprefix(CUTLASS))
        self.w_krsc = conv_cutlass.weight_krsc(self.weight)
        self.w_scale_k = self.w_scale.reshape(-1).expand(self.out_channels).contiguous()

    @property
    def as_gemm(self) -> bool:
        return (
            tuple(self.kernel_size) == (1, 1)
            and tuple(self.stride) == (1, 1)
            and self.padding in ((0, 0), 0, "valid")
            and self.groups == 1
        )

    @property
    def runs_8bit_gemm(self) -> bool:
        return self.as_gemm and self.gemm_path == "8bit"

    @property
    def needs_float_weight(self) -> bool:  # the emulated 8-bit conv computes with the float weight too
        return not self.runs_8bit_gemm and not self.runs_cutlass_conv

    @classmethod
    def empty_like(cls, conv: torch.nn.Conv2d, *, smooth: bool = False, per_channel: bool = True):
        if smooth or conv.padding_mode != "zeros":
            raise UserError(f"cannot run {conv} as an 8-bit conv (smoothing or padding_mode={conv.padding_mode!r})")
        w = conv.weight
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            per_channel=per_channel,
            dtype=w.dtype,
            device=w.device,
        )

    @classmethod
    def from_float(cls, conv: torch.nn.Conv2d, *, w_amax, a_amax, smooth=None, weight=None):
        module = cls.empty_like(conv, smooth=smooth is not None, per_channel=w_amax.numel() > 1)
        module._fill(conv.weight if weight is None else weight, w_amax, a_amax, conv.bias)
        module.dequantize_weight(conv.weight.dtype)
        return module

    def forward(self, x):
        if self.runs_8bit_gemm:
            n, _, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(n * h * w, self.in_channels)
            out = gemm(
                rows,
                self.weight.view(self.out_channels, -1),
                self.a_scale,
                self.gemm_w_scale,
                self.bias,
                self.FMT,
                self.kernel,
                self.a_inv_scale,
            )
            return out.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)
        if self.runs_cutlass_conv:
            x_q = self.quantize_input(x).contiguous(memory_format=torch.channels_last)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return ops.conv8(
                x_q,
                self.w_krsc,
                self.a_scale,
                self.w_scale_k,
                bias,
                list(self.stride),
                list(self.padding),
                x.dtype,
                self.conv_config,
            )
        # A 3x3 conv without an 8-bit kernel ("emulated"), or any conv on the 16-bit path: 8-bit numerics computed
        # in the activation dtype.
        x = self.fake_quantize_input(x)
        return F.conv2d(
            x, self._float_weight(x.dtype), self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
            f"stride={tuple(self.stride)}, gemm={self.gemm_path if self.as_gemm else 'conv'}"
        )


class Int8Conv2d(QConv2d):
    FMT = "int8"


class Fp8Conv2d(QConv2d):
    FMT = "fp8"


MODULE_TYPES = {cls.__name__: cls for cls in (Int8Linear, Fp8Linear, Int8Conv2d, Fp8Conv2d)}


def _after_load(module, _incompatible_keys):
    module.dequantize_weight()


# The public names of `unet_plan`, reachable as `qmodules.X` (`unet_plan` imports this module, so they are
# imported when first asked for, not at the top).
_UNET_PLAN_NAMES = frozenset(
    "PLAN_FORMAT UNET_FILES ConversionReport apply_layer_plan convert_to_real dequantize_weights fuse_qkv"
    " has_fused_qkv layer_plan load load_real module_counts real_state_dict save".split()
)


def __getattr__(name: str):
    if name in _UNET_PLAN_NAMES:
        from sdxl_core.quant import unet_plan

        return getattr(unet_plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
