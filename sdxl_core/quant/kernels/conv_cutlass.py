"""8-bit 2-D convolutions on Hopper (sm_90a) through CUTLASS's implicit-GEMM fprop (`csrc/conv_sm90.cu`).

    out[n, k, p, q] = sum_{r,s,c} x_q[n, c, p*sh + r - ph, q*sw + s - pw] * w_q[k, r, s, c] * (a_scale * w_scale[k])
                      + bias[k]

Layouts: `x_q` is an NCHW-shaped tensor in `torch.channels_last` memory format (physically NHWC), int8 or
float8_e4m3fn; `w_krsc` is the filter as [K, R, S, C] contiguous, same dtype (an engine stores [K, C, R, S]:
convert once at load with `weight_krsc`). `a_scale` is a float32 scalar on the device (read by the kernel, so
there is no host sync and the call can be captured in a CUDA graph), `w_scale` float32 [K] (a per-tensor
scale is expanded), `bias` [K] in the output dtype or None. The output is [N, K, P, Q] fp16 or bf16 in
channels_last. Accumulation is int32 (INT8) or float32 (FP8: Hopper's FP8 MMA adds into its accumulator with
reduced precision; only the `f32acc` config promotes partial sums to full float32, see `fp8_error_bound`); the
scales and bias are applied in a float32 epilogue with one rounding to the output dtype.

Zero padding, stride 1 to 8, dilation 1, groups 1. C and K must be multiples of 16 (16-byte TMA rows); shapes the
kernel refuses raise `ConvUnsupported`, so callers can keep their fp16 path for them (`unsupported_reason`
says why before any launch).

The first call of each tile config on a device sets the kernel's shared-memory limit; make it outside CUDA-graph
capture (a warm-up call, or `prepare`). `conv2d_reference` is the CPU/any-device reference: exact sums in
float64 for both formats, then the scales and bias in float64, one rounding to the output dtype.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from sdxl_core import hardware, settings
from sdxl_core.quant.kernels.cuda_build import KernelUnavailable

LIBRARY = "conv_sm90"
BUILD = (LIBRARY, ())  # one library for both formats, as `cuda_build.build_all` takes it
UNSUPPORTED = 2  # the library's status for a problem its kernels cannot run (any other nonzero: an error)
FORMATS = {"int8": 0, "fp8": 1}
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# The tile configs per format, in index order, as `csrc/conv_sm90.cu` names them (the last one is FP8 only): what a
# layer plan may name ("cutlass:<config>"), known without loading the library.
_CONFIGS = (
    "128x128x128_1x1",
    "128x128x64_1x1",
    "128x128x128_2x1",
    "128x128x128_1x2",
    "64x128x128_1x1_s4",
    "128x160x128_1x1",
    "128x160x64_1x1",
    "128x160x128_2x1",
)
CONFIG_NAMES = {"int8": _CONFIGS, "fp8": (*_CONFIGS, "64x128x128_1x1_f32acc")}
OUT_DTYPES = (torch.float16, torch.bfloat16)
FP8_MMA_K = 32  # K depth of one Hopper FP8 warp-group MMA: one reduced-precision accumulator add each
PROMOTED_TILE_K = 128  # the promoted FP8 config adds each 128-channel K tile into a full float32 accumulator

# The UNet's 3x3 convs at 1024x1024 with CFG (batch 2, latent 128x128), as (N, H, W, C, K, stride, layers):
# the input of each conv and how many convs share the shape. conv_in (C=4) and conv_out (K=4) stay fp16 and are
# left out. `unet_conv3x3_shapes(SDXL_UNET_CONFIG)` derives the same list from the diffusers model.
SDXL_CONV3X3 = (
    (2, 128, 128, 320, 320, 1, 7),
    (2, 128, 128, 320, 320, 2, 1),
    (2, 128, 128, 640, 320, 1, 2),
    (2, 128, 128, 640, 640, 1, 1),
    (2, 128, 128, 960, 320, 1, 1),
    (2, 64, 64, 320, 640, 1, 1),
    (2, 64, 64, 640, 640, 1, 6),
    (2, 64, 64, 640, 640, 2, 1),
    (2, 64, 64, 960, 640, 1, 1),
    (2, 64, 64, 1280, 640, 1, 1),
    (2, 64, 64, 1280, 1280, 1, 1),
    (2, 64, 64, 1920, 640, 1, 1),
    (2, 32, 32, 640, 1280, 1, 1),
    (2, 32, 32, 1280, 1280, 1, 10),
    (2, 32, 32, 1920, 1280, 1, 1),
    (2, 32, 32, 2560, 1280, 1, 2),
)


class ConvUnsupported(ValueError):
    """The 8-bit conv kernel cannot run this shape or these tensors; run the fp16 conv instead."""


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernel library (built on first use, cached), with its C signatures declared."""
    from sdxl_core.quant.kernels import cuda_build

    lib = cuda_build.library(BUILD[0], extra_flags=BUILD[1])
    size_t, ptr, c_int = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
    lib.sdxl_conv8_fprop.restype = c_int
    lib.sdxl_conv8_fprop.argtypes = [c_int, ptr, ptr, ptr, ptr, ptr, ptr, *[c_int] * 11, c_int, c_int, ptr, size_t, ptr]
    lib.sdxl_conv8_prepare.restype = c_int
    lib.sdxl_conv8_prepare.argtypes = [c_int, c_int, c_int]
    lib.sdxl_conv8_check.restype = c_int
    lib.sdxl_conv8_check.argtypes = [c_int] * 14
    lib.sdxl_conv8_workspace.restype = size_t
    lib.sdxl_conv8_workspace.argtypes = [c_int] * 14
    lib.sdxl_conv8_num_configs.restype = c_int
    lib.sdxl_conv8_num_configs.argtypes = [c_int]
    lib.sdxl_conv8_config_name.restype = ctypes.c_char_p
    lib.sdxl_conv8_config_name.argtypes = [c_int, c_int]
    lib.sdxl_conv8_last_error.restype = ctypes.c_char_p
    lib.sdxl_conv8_last_error.argtypes = []
    lib.sdxl_conv8_set_pdl.restype = c_int
    lib.sdxl_conv8_set_pdl.argtypes = [c_int]
    lib.sdxl_conv8_set_pdl(int(settings.pdl()))
    return lib


def is_hopper(device: torch.device | str | int | None = None) -> bool:
    """A Hopper GPU (compute capability 9.0: the sm_90a code runs there only)."""
    if not torch.cuda.is_available():
        return False
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda":
        return False
    return hardware.is_hopper(device)


def available(device: torch.device | str | int | None = None) -> bool:
    """True where `conv2d` can run: a Hopper GPU and a library that builds (or is cached) and loads."""
    if not is_hopper(device):
        return False
    try:
        library()
    except KernelUnavailable:
        return False
    return True


def unavailable_reason(device: torch.device | str | int | None = None) -> str | None:
    """Why `available(device)` is False, in one line; None when it is True."""
    if not is_hopper(device):
        if not torch.cuda.is_available():
            return "needs a CUDA Hopper GPU (sm_90); PyTorch sees no CUDA device"
        return f"needs a CUDA Hopper GPU (sm_90); this is {torch.cuda.get_device_name(device)}"
    try:
        library()
    except KernelUnavailable as err:
        return str(err).splitlines()[0]
    return None


def _fmt(fmt: str) -> int:
    if fmt not in FORMATS:
        raise ValueError(f"unknown 8-bit format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def configs(fmt: str) -> list[str]:
    """Names of the kernel's tile configs for 'int8' or 'fp8'; `conv2d(config=i)` runs the i-th."""
    lib, code = library(), _fmt(fmt)
    names = [lib.sdxl_conv8_config_name(code, i).decode() for i in range(lib.sdxl_conv8_num_configs(code))]
    if tuple(names) != CONFIG_NAMES[fmt]:  # a stale library: an index would run another config than the plan names
        raise KernelUnavailable(f"the conv library holds {fmt} configs {names}, not {CONFIG_NAMES[fmt]}")
    return names


def format_of(dtype: torch.dtype) -> str:
    for fmt, storage in STORAGE.items():
        if dtype == storage:
            return fmt
    raise ConvUnsupported(f"8-bit conv input must be int8 or float8_e4m3fn, not {dtype}")


def weight_krsc(weight: torch.Tensor) -> torch.Tensor:
    """[K, C, R, S] (how engines store conv weights) to the kernel's [K, R, S, C]; do it once, at load."""
    return weight.permute(0, 2, 3, 1).contiguous()


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def output_hw(h: int, w: int, r: int, s: int, stride, padding) -> tuple[int, int]:
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    return (h + 2 * ph - r) // sh + 1, (w + 2 * pw - s) // sw + 1


def unsupported_reason(x_shape, w_krsc_shape, stride=1, padding=1, groups: int = 1, dilation=1) -> str | None:
    """Why the kernel would refuse a conv of these shapes (x [N, C, H, W], weight [K, R, S, C]); None if it runs it.

    Shape rules only: the tensors must also be on a Hopper GPU, 8-bit and laid out as `conv2d` documents."""
    n, c, h, w = x_shape
    k, r, s, wc = w_krsc_shape
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    if groups != 1 or _pair(dilation) != (1, 1):
        return "only groups=1 and dilation=1 are supported"
    if wc != c:
        return f"weight has C={wc} but the input has C={c}"
    if c % 16 or k % 16:
        return f"C={c} and K={k} must be multiples of 16 (16-byte TMA rows of 8-bit data)"
    if min(sh, sw) < 1 or max(sh, sw) > 8 or min(ph, pw) < 0:
        return f"stride {stride} / padding {padding} out of range (1 <= stride <= 8, padding >= 0)"
    if h + 2 * ph < r or w + 2 * pw < s:
        return f"filter {r}x{s} larger than the padded input {h}x{w}"
    # TMA im2col corners -padding and padding - (filter - 1) must lie in [-128, 127]; filter offsets below 255
    if max(ph, pw) > 128 or max(r - 1 - ph, s - 1 - pw) > 128 or max(ph - r + 1, pw - s + 1) > 127 or max(r, s) > 255:
        return (
            f"filter {r}x{s} with padding {padding} is outside TMA im2col's range (padding <= 128, "
            f"-128 <= padding - (filter - 1) <= 127, filter <= 255)"
        )
    p, q = output_hw(h, w, r, s, stride, padding)
    if n * h * w >= 2**31 or n * p * q >= 2**31:
        return "more than 2**31 pixels: too large for the kernel's 32-bit pixel index"
    return None


def library_refusal(
    fmt: str, x_shape, w_krsc_shape, stride=1, padding=1, out_dtype=torch.float16, config: int = 0
) -> str | None:
    """The library's own verdict (its shape checks plus CUTLASS's can_implement) without launching anything:
    None when config `config` can run the conv, else the reason. Needs the library, not a GPU."""
    n, c, h, w = x_shape
    k, r, s, _ = w_krsc_shape
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    lib = library()
    status = lib.sdxl_conv8_check(
        _fmt(fmt), n, h, w, c, k, r, s, ph, pw, sh, sw, int(out_dtype == torch.bfloat16), int(config)
    )
    return None if status == 0 else lib.sdxl_conv8_last_error().decode(errors="replace")


def prepare(
    fmt: str, out_dtype: torch.dtype = torch.float16, config: int = 0, device: torch.device | str | int | None = None
) -> None:
    """The one-time setup of a config's kernel on a device (its shared-memory limit), which the first `conv2d`
    call would do: call it at load time when the first call may happen inside CUDA-graph capture."""
    lib = library()
    with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
        status = lib.sdxl_conv8_prepare(_fmt(fmt), int(out_dtype == torch.bfloat16), int(config))
    if status != 0:
        raise RuntimeError(
            f"8-bit CUTLASS conv setup ({fmt}, config {config}) failed: "
            f"{lib.sdxl_conv8_last_error().decode(errors='replace')}"
        )


def _check(x_q, w_krsc, a_scale, w_scale, bias, out_dtype):
    if x_q.dim() != 4 or w_krsc.dim() != 4:
        raise ConvUnsupported(
            f"expected x [N, C, H, W] and weight [K, R, S, C], got {tuple(x_q.shape)} and {tuple(w_krsc.shape)}"
        )
    fmt = format_of(x_q.dtype)
    if w_krsc.dtype != x_q.dtype:
        raise ConvUnsupported(f"weight dtype {w_krsc.dtype} differs from input dtype {x_q.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ConvUnsupported(f"output dtype must be float16 or bfloat16, not {out_dtype}")
    device = x_q.device
    for name, t in (("weight", w_krsc), ("a_scale", a_scale), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != device:
            raise ConvUnsupported(f"{name} is on {t.device}, the input on {device}")
    if not x_q.is_contiguous(memory_format=torch.channels_last):
        raise ConvUnsupported("input must be in torch.channels_last memory format (NHWC), packed")
    if not w_krsc.is_contiguous():
        raise ConvUnsupported("weight must be a contiguous [K, R, S, C] tensor (see weight_krsc)")
    if a_scale.dtype != torch.float32 or a_scale.numel() != 1:
        raise ConvUnsupported("a_scale must be a float32 scalar tensor")
    k = w_krsc.shape[0]
    if w_scale.dtype != torch.float32 or w_scale.numel() not in (1, k):
        raise ConvUnsupported(f"w_scale must be float32 with 1 or K={k} elements")
    if bias is not None and bias.numel() != k:
        raise ConvUnsupported(f"bias must have K={k} elements")
    if x_q.data_ptr() % 16 or w_krsc.data_ptr() % 16:
        raise ConvUnsupported("input and weight must start 16-byte aligned (TMA); this is a view with an offset")
    return fmt


def conv2d(
    x_q: torch.Tensor,
    w_krsc: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=1,
    out_dtype: torch.dtype = torch.float16,
    config: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The 8-bit conv on a Hopper GPU; see the module docstring for layouts. Returns [N, K, P, Q] channels_last.

    `config` indexes `configs(fmt)`. `out`, if given, must be a channels_last [N, K, P, Q] tensor of
    `out_dtype`; it is written and returned. A per-tensor `w_scale` is expanded to [K] and a bias of another
    dtype cast to `out_dtype` on every call: store them that way once to avoid the extra kernels."""
    fmt = _check(x_q, w_krsc, a_scale, w_scale, bias, out_dtype)
    reason = unsupported_reason(x_q.shape, w_krsc.shape, stride, padding)
    if reason:
        raise ConvUnsupported(f"8-bit conv cannot run {tuple(x_q.shape)} * {tuple(w_krsc.shape)}: {reason}")
    if x_q.device.type != "cuda" or not is_hopper(x_q.device):
        raise KernelUnavailable(
            f"the 8-bit CUTLASS conv needs its tensors on a CUDA Hopper GPU (sm_90), not on {x_q.device}"
        )
    lib = library()
    n, c, h, w = x_q.shape
    k, r, s, _ = w_krsc.shape
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    p, q = output_hw(h, w, r, s, stride, padding)
    if w_scale.numel() != k:
        w_scale = w_scale.reshape(1).expand(k).contiguous()
    if bias is not None and (bias.dtype != out_dtype or not bias.is_contiguous()):
        bias = bias.to(out_dtype).contiguous()
    if out is None:
        out = torch.empty((n, k, p, q), dtype=out_dtype, device=x_q.device, memory_format=torch.channels_last)
    elif (
        out.shape != (n, k, p, q)
        or out.dtype != out_dtype
        or out.device != x_q.device
        or not out.is_contiguous(memory_format=torch.channels_last)
        or out.data_ptr() % 16
    ):
        raise ConvUnsupported(
            f"out must be a 16-byte aligned channels_last {out_dtype} tensor of shape {(n, k, p, q)} on {x_q.device}"
        )
    bf16 = int(out_dtype == torch.bfloat16)
    code = FORMATS[fmt]
    dims = (n, h, w, c, k, r, s, ph, pw, sh, sw)
    with torch.cuda.device(x_q.device):
        workspace_bytes = lib.sdxl_conv8_workspace(code, *dims, bf16, int(config))
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=x_q.device) if workspace_bytes else None
        stream = torch.cuda.current_stream(x_q.device).cuda_stream
        status = lib.sdxl_conv8_fprop(
            code,
            x_q.data_ptr(),
            w_krsc.data_ptr(),
            out.data_ptr(),
            a_scale.data_ptr(),
            w_scale.data_ptr(),
            None if bias is None else bias.data_ptr(),
            *dims,
            bf16,
            int(config),
            None if workspace is None else workspace.data_ptr(),
            workspace_bytes,
            stream,
        )
    if status != 0:
        message = (lib.sdxl_conv8_last_error() or b"unknown error").decode(errors="replace")
        error = ConvUnsupported if status == UNSUPPORTED else RuntimeError
        raise error(f"8-bit CUTLASS conv ({fmt}, config {config}) failed: {message}")
    return out


def conv2d_reference(
    x_q: torch.Tensor,
    w_krsc: torch.Tensor,
    a_scale,
    w_scale,
    bias=None,
    stride=1,
    padding=1,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The same conv computed exactly in float64 on the tensors' device, rounded once to `out_dtype`.

    The sums are exact for both formats: an int8 sum of up to 9*2560 products stays far below 2**53, and every
    e4m3 product is a multiple of 2**-18 below 2**18, so 23040 of them fit float64's 53-bit significand.
    Layout-agnostic: x_q [N, C, H, W] in any memory format, weight [K, R, S, C]; returns contiguous NCHW."""
    k = w_krsc.shape[0]
    x = x_q.to(torch.float64)
    w = w_krsc.to(torch.float64).permute(0, 3, 1, 2)
    acc = F.conv2d(x, w, None, _pair(stride), _pair(padding))
    a = torch.as_tensor(a_scale, dtype=torch.float32, device=x.device).to(torch.float64).reshape(())
    ws = torch.as_tensor(w_scale, dtype=torch.float32, device=x.device).to(torch.float64).reshape(-1).expand(k)
    out = acc * (a * ws).reshape(1, k, 1, 1)
    if bias is not None:
        out = out + bias.to(torch.float64).reshape(1, k, 1, 1)
    return out.to(out_dtype).contiguous()


def unet_conv3x3_shapes(unet_config: dict, batch: int = 2, latent: int = 128) -> list[tuple[int, ...]]:
    """(N, H, W, C, K, stride, layers) of every 3x3 conv a diffusers UNet2DConditionModel with this config runs,
    found by a forward pass on the meta device (no memory, about a second), conv_in and conv_out left out."""
    from collections import Counter

    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config).eval()
    seen: Counter = Counter()
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]

    def record(module, args):
        n, c, h, w = args[0].shape
        if module.kernel_size == (3, 3) and module is not unet.conv_in and module is not unet.conv_out:
            seen[(n, h, w, c, module.out_channels, module.stride[0])] += 1

    hooks = [m.register_forward_pre_hook(record) for m in convs]
    try:
        with torch.device("meta"), torch.no_grad():
            cfg = unet.config
            sample = torch.empty(batch, cfg.in_channels, latent, latent)
            text = torch.empty(batch, 77, cfg.cross_attention_dim)
            added = {}
            if cfg.addition_embed_type == "text_time":
                pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
                added = {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}
            unet(sample, torch.ones(batch), encoder_hidden_states=text, added_cond_kwargs=added)
    finally:
        for hook in hooks:
            hook.remove()
    return sorted(((*shape, count) for shape, count in seen.items()), key=lambda t: (-t[1], t[3], t[4], t[5]))


def fp8_error_bound(c: int, r: int = 3, s: int = 3, promoted: bool = False) -> float:
    """A bound on the FP8 kernel's relative (Frobenius) error against the exact sum, from its accumulation.

    Hopper's FP8 MMA keeps about 13 mantissa bits when it adds each K=32 slice into the float32 accumulator
    (public measurements: DeepSeek-V3 report, SageAttention2), and this kernel does not promote partial sums to
    full float32 the way CUTLASS's FP8 GEMMs can. Each add may lose up to 2**-13 of the running sum, so over
    C*R*S/32 adds the error stays below (C*R*S/32) * 2**-13 of the running magnitudes (about 1 % at C=320,
    9 % at C=2560; expect a third of that), plus one rounding to the output dtype. With `promoted` (the
    `f32acc` config) only the adds inside one 128-channel K tile are reduced-precision."""
    depth = PROMOTED_TILE_K if promoted else c * r * s
    return (depth / FP8_MMA_K) * 2.0**-13 + 2.0**-8
