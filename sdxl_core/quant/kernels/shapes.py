"""The GEMM shapes of the SDXL UNet's 8-bit layers at 1024x1024 with classifier-free guidance (batch 2), as
(M tokens, K, N): what the INT8 kernels must win at. Latents are 128x128; the transformer blocks run at 64x64
(8192 tokens, 640 channels) and 32x32 (2048 tokens, 1280 channels); the text context is 2 x 77 tokens of 2048.
"""

SDXL_LINEAR_SHAPES = [
    (154, 2048, 640),  # cross-attention K, V projections of the text (640-channel blocks)
    (154, 2048, 1280),  # the same at 1280 channels (or K and V fused at 640)
    (154, 2048, 2560),  # K and V fused at 1280 channels
    (2048, 1280, 1280),  # attention Q/K/V/out and proj_in/out at 32x32: 372 layers, the most frequent shape
    (2048, 1280, 3840),  # fused QKV at 32x32
    (2048, 1280, 10240),  # GEGLU projection at 32x32
    (2048, 5120, 1280),  # feed-forward output at 32x32
    (8192, 640, 640),  # attention and proj_in/out at 64x64
    (8192, 640, 1920),  # fused QKV at 64x64
    (8192, 640, 5120),  # GEGLU projection at 64x64
    (8192, 2560, 640),  # feed-forward output at 64x64
    (32768, 320, 320),  # 1x1 convs at 128x128 with 320 channels, as GEMMs
]
