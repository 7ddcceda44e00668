// W8A8 GEMM for Hopper (sm_90a), INT8 or FP8 (e4m3), built from CUTLASS 3.x collectives, exported as plain C
// functions. One source, two libraries: compiled with -DSDXL_GEMM8_FP8 it is the FP8 one.
//
//     out[M, N] = (A_q[M, K] @ W_q[N, K]^T) * (a_scale * w_scale[N]) + bias[N]
//
// A_q row-major [M, K] (row stride lda); W_q row-major [N, K], so B = W_q^T is column-major (both K-major, the
// "TN" layout 8-bit wgmma takes from shared memory); int32 accumulation for INT8, float32 for FP8; a_scale a
// float32 scalar read on the device (no host sync, so a CUDA graph may capture the launch); w_scale float32 [N];
// bias [N] in the output dtype, or null; out fp16 or bf16 row-major [M, N].
//
// FP8 uses CUTLASS's "fast accumulation" schedules: each K=32 warp-group MMA adds into the float32 accumulator
// with Hopper's reduced-precision adder (about 13 mantissa bits kept per add), as cuBLAS's and TensorRT's fast
// FP8 GEMMs do; the caller checks each config against float64 before choosing it (gemm_dispatch).
//
// Mainloop: TMA loads into a multi-stage shared-memory pipeline, one producer warp group and warp-specialized
// consumers (cooperative: two warp groups share one tile; ping-pong: each warp group owns a tile and the two
// alternate between MMA and epilogue). Epilogue: an epilogue visitor tree computing, in float32,
//     fma(float(acc), a_scale * w_scale[n], bias[n])  rounded to nearest into fp16/bf16,
// stored with TMA. Without bias (INT8) this is bit for bit the torch reference (acc.float() * (a_scale *
// w_scale)); with bias the fused multiply-add rounds once where the reference rounds twice (at most one ulp).
//
// A handful of tile/cluster/schedule configurations are compiled; `config` picks one per call (which one is
// fastest is measured per shape by the caller). Alignment rules (TMA): K % 16 == 0, N % 8 == 0, lda % 16 == 0,
// and 16-byte aligned A, W and out; M is free (partial tiles are clipped by TMA).
//
// CUDA-graph safety: a launch allocates nothing and never synchronizes. It reads the device's SM count and
// compute capability (cached after the first call on each device), encodes the TMA descriptors on the host,
// zeroes the stream-K workspace with cudaMemsetAsync on the given stream (stream-K config only) and launches
// with cudaLaunchKernelExC: all legal during stream capture. The one-time setup, raising each kernel's
// dynamic shared memory limit with cudaFuncSetAttribute, happens on the first call of that kernel on each
// device; make that first call outside capture (a warm-up run, as every CUDA-graph user does anyway).

//
// Parts: on a machine with CPUs to spare, cuda_build compiles this file as P translation units side by side
// (-DSDXL_PARTS=P -DSDXL_PART=p, P up to the `sdxl-parts` count below) and links them into one library: part p
// instantiates the configs i with i % P == p, part 0 also the exported functions. Without SDXL_PART it is one
// translation unit holding everything.
// sdxl-parts: 6

#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED 1  // wgmma N=160 (the 128x160 tile)

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <tuple>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

#if !defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
#error "needs CUDA 12+ with CUTLASS's sm90 support"
#endif

// A named namespace: nvcc's generated stub cannot tell an anonymous one from CuTe's own.
namespace sdxl_gemm8_sm90 {

using namespace cute;

#if defined(SDXL_GEMM8_FP8)
using ElementAB = cutlass::float_e4m3_t;
using ElementAcc = float;
constexpr const char* kFormat = "fp8";
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
using PingPong = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum;
#else
using ElementAB = int8_t;
using ElementAcc = int32_t;
constexpr const char* kFormat = "int8";
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using PingPong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
#endif

// Error codes returned by sdxl_gemm8; sdxl_last_error() has the one-line reason.
enum : int {
  kOk = 0,
  kBadArgument = 1,     // null pointer, bad config index, negative size
  kNotSupported = 2,    // shape or alignment the kernel cannot take (K % 16, N % 8, 16-byte pointers)
  kWrongDevice = 3,     // the current device is not compute capability 9.0
  kWorkspace = 4,       // workspace missing or too small
  kCudaError = 5,       // a CUDA runtime call failed
};

// inline: one definition shared by every part of a split build (the exported functions read what a config's
// part wrote)
inline thread_local std::string last_error;

inline int fail(int code, std::string message) {
  last_error = std::move(message);
  return code;
}

// ------------------------------------------------------------------------------------------ configurations

using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using PingPongEpi = cutlass::epilogue::TmaWarpSpecialized;
using Persistent = cutlass::gemm::PersistentScheduler;
using StreamK = cutlass::gemm::StreamKScheduler;

template <int TileM, int TileN, int TileK, int ClusterM, class Schedule, class EpiSchedule, class Scheduler>
struct Config {
  using TileShape = Shape<Int<TileM>, Int<TileN>, Int<TileK>>;
  using ClusterShape = Shape<Int<ClusterM>, _1, _1>;
  using KernelSchedule = Schedule;
  using EpilogueSchedule = EpiSchedule;
  using TileScheduler = Scheduler;
};

// The names are the configs' identity for callers (kept in engine layer plans): append, never reorder.
using Config0 = Config<128, 128, 128, 1, Coop, CoopEpi, Persistent>;
using Config1 = Config<128, 160, 128, 1, Coop, CoopEpi, Persistent>;  // N=1280/640 in whole tiles, one wave
using Config2 = Config<128, 256, 128, 1, Coop, CoopEpi, Persistent>;  // large N
using Config3 = Config<128, 128, 128, 1, Coop, CoopEpi, StreamK>;     // split K over idle SMs: small M, tails
using Config4 = Config<64, 128, 128, 1, PingPong, PingPongEpi, Persistent>;  // small M
using Config5 = Config<128, 128, 128, 2, PingPong, PingPongEpi, Persistent>;  // W tiles multicast to 2 CTAs

constexpr int kNumConfigs = 6;
const char* const kConfigNames[kNumConfigs] = {
    "coop_128x128x128",
    "coop_128x160x128",
    "coop_128x256x128",
    "coop_128x128x128_streamk",
    "pingpong_64x128x128",
    "pingpong_128x128x128_cluster2x1",
};

// ------------------------------------------------------------------------------------------ the GEMM

template <class Cfg, class ElementOut>
struct Gemm8 {
  using TileShape = typename Cfg::TileShape;
  using ClusterShape = typename Cfg::ClusterShape;
  using LayoutA = cutlass::layout::RowMajor;     // A_q [M, K], K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // W_q^T [K, N] stored as W_q [N, K], K contiguous
  using LayoutD = cutlass::layout::RowMajor;     // out [M, N]
  static constexpr int kAlignAB = 16;            // 16 bytes of 8-bit elements
  static constexpr int kAlignD = 16 / sizeof(ElementOut);
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // Per-column (N) vectors: w_scale (float32) and bias (output dtype); bias may be null (reads as 0).
  using ColVectorStride = Stride<_0, _1, int64_t>;
  template <class Element>
  using PerColumn = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element, float, ColVectorStride>;

  // scale[n] = a_scale * w_scale[n]; a_scale is read from its device pointer.
  using Scale = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>,
      cutlass::epilogue::fusion::Sm90ScalarBroadcast<float>,
      PerColumn<float>>;
  // out = acc * scale[n] + bias[n]
  using Epilogue = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementOut, float, kRound>,
      cutlass::epilogue::fusion::Sm90AccFetch,
      Scale,
      PerColumn<ElementOut>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      TileShape, ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto,
      ElementAcc, float,
      void, LayoutD, kAlignD,  // no source tensor C
      ElementOut, LayoutD, kAlignD,
      typename Cfg::EpilogueSchedule, Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementAB, LayoutA, kAlignAB,
      ElementAB, LayoutB, kAlignAB,
      ElementAcc,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Cfg::KernelSchedule>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<
      Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue, typename Cfg::TileScheduler>;
  using Arguments = typename GemmKernel::Arguments;
  using Params = typename GemmKernel::Params;

  static Arguments arguments(const void* a, const void* w, void* out, const float* a_scale, const float* w_scale,
                             const void* bias, int m, int n, int k, int lda, int device, int sm_count) {
    using StrideA = typename GemmKernel::StrideA;
    using StrideB = typename GemmKernel::StrideB;
    using StrideD = typename GemmKernel::StrideD;
    auto stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1));
    get<0>(stride_a) = lda;  // rows of A may be further apart than K (a view into a wider tensor)
    auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1));
    auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1));

    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = device;
    hw_info.sm_count = sm_count;

    Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const ElementAB*>(a), stride_a, static_cast<const ElementAB*>(w), stride_b},
        {{}, nullptr, stride_d, static_cast<ElementOut*>(out), stride_d},
        hw_info};
    args.epilogue.thread = {
        {},                                             // acc
        {                                               // a_scale * w_scale[n]
         {{1.0f}, {a_scale}, {}},                       //   scalar from its device pointer
         {w_scale, 0.0f, {}},                           //   per-column vector
         {}},                                           //   multiplies
        {static_cast<const ElementOut*>(bias), ElementOut(0), {}},  // per-column bias, 0 when null
        {}};                                            // multiply_add
    if constexpr (std::is_same_v<typename Cfg::TileScheduler, StreamK> && std::is_same_v<ElementAcc, int32_t>) {
      // int32 partial sums add exactly in any order, so the faster reduction is also deterministic (FP8's
      // float32 partial sums keep the default, ordered reduction).
      args.scheduler.reduction_mode = cutlass::gemm::kernel::detail::ReductionMode::Nondeterministic;
    }
    return args;
  }

  static size_t workspace_bytes(int m, int n, int k, int device, int sm_count) {
    auto args = arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, k, device, sm_count);
    return GemmKernel::get_workspace_size(args);
  }

  // Raise the kernel's dynamic shared-memory limit once per device (outside any stream capture).
  static int prepare_device(int device) {
    static std::mutex lock;
    static uint64_t done = 0;  // one bit per device index < 64
    std::lock_guard<std::mutex> guard(lock);
    uint64_t bit = device < 64 ? (uint64_t(1) << device) : 0;
    if (bit && (done & bit)) return kOk;
    int smem = GemmKernel::SharedStorageSize;
    cudaError_t err = cudaFuncSetAttribute(cutlass::device_kernel<GemmKernel>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) {
      return fail(kCudaError, std::string("cudaFuncSetAttribute(") + std::to_string(smem) +
                                  " bytes of shared memory): " + cudaGetErrorString(err));
    }
    done |= bit;
    return kOk;
  }

  static int run(const void* a, const void* w, void* out, const float* a_scale, const float* w_scale,
                 const void* bias, int m, int n, int k, int lda, void* workspace, size_t workspace_size,
                 cudaStream_t stream, int device, int sm_count) {
    Arguments args = arguments(a, w, out, a_scale, w_scale, bias, m, n, k, lda, device, sm_count);
    if (!GemmKernel::can_implement(args)) {
      return fail(kNotSupported, "CUTLASS cannot implement M=" + std::to_string(m) + " N=" + std::to_string(n) +
                                     " K=" + std::to_string(k) + " with this config");
    }
    size_t needed = GemmKernel::get_workspace_size(args);
    if (needed > 0 && (workspace == nullptr || workspace_size < needed)) {
      return fail(kWorkspace, "workspace of " + std::to_string(workspace_size) + " bytes given, " +
                                  std::to_string(needed) + " needed (sdxl_gemm8_workspace)");
    }
    if (int code = prepare_device(device)) return code;
    if (GemmKernel::initialize_workspace(args, workspace, stream) != cutlass::Status::kSuccess) {
      return fail(kCudaError, "initializing the GEMM workspace failed (cudaMemsetAsync)");
    }
    Params params = GemmKernel::to_underlying_arguments(args, workspace);

    cudaLaunchAttribute cluster;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = size<0>(ClusterShape{});
    cluster.val.clusterDim.y = size<1>(ClusterShape{});
    cluster.val.clusterDim.z = size<2>(ClusterShape{});
    cudaLaunchConfig_t launch = {};
    launch.gridDim = GemmKernel::get_grid_shape(params);
    launch.blockDim = GemmKernel::get_block_shape();
    launch.dynamicSmemBytes = GemmKernel::SharedStorageSize;
    launch.stream = stream;
    launch.attrs = &cluster;
    launch.numAttrs = size(ClusterShape{}) > 1 ? 1 : 0;  // a 1x1x1 cluster is the plain launch
    void* kernel_args[] = {&params};
    cudaError_t err = cudaLaunchKernelExC(
        &launch, reinterpret_cast<const void*>(cutlass::device_kernel<GemmKernel>), kernel_args);
    if (err != cudaSuccess) {
      return fail(kCudaError, std::string("kernel launch: ") + cudaGetErrorString(err));
    }
    return kOk;
  }
};

// ------------------------------------------------------------------------------------------ per-config entry points

// What the exported functions call for one config (instantiated below, in the config's part).
template <class Cfg>
int run_config(const void* a, const void* w, void* out, const float* a_scale, const float* w_scale,
               const void* bias, int m, int n, int k, int lda, int out_bf16, void* workspace, size_t workspace_size,
               cudaStream_t stream, int device, int sm_count) {
  if (out_bf16) {
    return Gemm8<Cfg, cutlass::bfloat16_t>::run(a, w, out, a_scale, w_scale, bias, m, n, k, lda, workspace,
                                                   workspace_size, stream, device, sm_count);
  }
  return Gemm8<Cfg, cutlass::half_t>::run(a, w, out, a_scale, w_scale, bias, m, n, k, lda, workspace,
                                             workspace_size, stream, device, sm_count);
}

template <class Cfg>
size_t workspace_config(int m, int n, int k, int device, int sm_count) {
  size_t half = Gemm8<Cfg, cutlass::half_t>::workspace_bytes(m, n, k, device, sm_count);
  size_t bf16 = Gemm8<Cfg, cutlass::bfloat16_t>::workspace_bytes(m, n, k, device, sm_count);
  return half > bf16 ? half : bf16;
}

// The configs this translation unit compiles (all of them, or its part's); the others are only declared here
// (`extern template`: no implicit instantiation), and the linker finds them in their own parts.
#if defined(SDXL_PART)
#define SDXL_IN_PART(i) ((i) % SDXL_PARTS == SDXL_PART)
#else
#define SDXL_IN_PART(i) 1
#endif
#define SDXL_GEMM8_INSTANTIATE(prefix, Cfg)                                                                         \
  prefix template int run_config<Cfg>(const void*, const void*, void*, const float*, const float*, const void*, int, \
                                      int, int, int, int, void*, size_t, cudaStream_t, int, int);                   \
  prefix template size_t workspace_config<Cfg>(int, int, int, int, int);
#if SDXL_IN_PART(0)
SDXL_GEMM8_INSTANTIATE(, Config0)
#else
SDXL_GEMM8_INSTANTIATE(extern, Config0)
#endif
#if SDXL_IN_PART(1)
SDXL_GEMM8_INSTANTIATE(, Config1)
#else
SDXL_GEMM8_INSTANTIATE(extern, Config1)
#endif
#if SDXL_IN_PART(2)
SDXL_GEMM8_INSTANTIATE(, Config2)
#else
SDXL_GEMM8_INSTANTIATE(extern, Config2)
#endif
#if SDXL_IN_PART(3)
SDXL_GEMM8_INSTANTIATE(, Config3)
#else
SDXL_GEMM8_INSTANTIATE(extern, Config3)
#endif
#if SDXL_IN_PART(4)
SDXL_GEMM8_INSTANTIATE(, Config4)
#else
SDXL_GEMM8_INSTANTIATE(extern, Config4)
#endif
#if SDXL_IN_PART(5)
SDXL_GEMM8_INSTANTIATE(, Config5)
#else
SDXL_GEMM8_INSTANTIATE(extern, Config5)
#endif
#undef SDXL_GEMM8_INSTANTIATE

#if !defined(SDXL_PART) || SDXL_PART == 0  // the exported functions and what only they use

// Calls F::template apply<Config_i>() for the runtime index i.
template <class F>
auto with_config(int config, F&& f) {
  switch (config) {
    case 0: return f(Config0{});
    case 1: return f(Config1{});
    case 2: return f(Config2{});
    case 3: return f(Config3{});
    case 4: return f(Config4{});
    default: return f(Config5{});
  }
}
static_assert(kNumConfigs == 6, "with_config lists every config");

// The current device, its SM count and whether it is compute capability 9.0 (cached per device).
struct DeviceInfo {
  int device = -1;
  int sm_count = 0;
  bool hopper = false;
};

inline int current_device(DeviceInfo& info) {
  static std::mutex lock;
  static DeviceInfo cache[64];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return fail(kCudaError, std::string("cudaGetDevice: ") + cudaGetErrorString(err));
  std::lock_guard<std::mutex> guard(lock);
  if (device < 64 && cache[device].device == device) {
    info = cache[device];
    return kOk;
  }
  int major = 0, minor = 0, sms = 0;
  if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) {
    return fail(kCudaError, std::string("cudaDeviceGetAttribute: ") + cudaGetErrorString(err));
  }
  info.device = device;
  info.sm_count = sms;
  info.hopper = major == 9 && minor == 0;
  if (device < 64) cache[device] = info;
  return kOk;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

#endif  // what only the exported functions use

}  // namespace sdxl_gemm8_sm90

#if !defined(SDXL_PART) || SDXL_PART == 0
using namespace sdxl_gemm8_sm90;

// The library is built with hidden visibility (cuda_build's flags for it): only these functions are exported.
#define SDXL_EXPORT __attribute__((visibility("default")))

extern "C" {

SDXL_EXPORT const char* sdxl_gemm8_format() { return kFormat; }

SDXL_EXPORT int sdxl_gemm8_num_configs() { return kNumConfigs; }

SDXL_EXPORT const char* sdxl_gemm8_config_name(int config) {
  return config >= 0 && config < kNumConfigs ? kConfigNames[config] : nullptr;
}

SDXL_EXPORT const char* sdxl_last_error() { return last_error.c_str(); }

// Bytes of device workspace `config` needs for this shape on the current device (0 for most configs).
// Returns (size_t)-1 on error (see sdxl_last_error).
SDXL_EXPORT size_t sdxl_gemm8_workspace(int m, int n, int k, int config) {
  if (config < 0 || config >= kNumConfigs || m < 0 || n < 0 || k < 0) {
    fail(kBadArgument, "bad config index or negative size");
    return static_cast<size_t>(-1);
  }
  DeviceInfo dev;
  if (current_device(dev) != kOk) return static_cast<size_t>(-1);
  return with_config(config, [&](auto cfg) {
    return workspace_config<decltype(cfg)>(m, n, k, dev.device, dev.sm_count);
  });
}

// out = (a @ w^T) * (*a_scale * w_scale) + bias, on `stream` (a cudaStream_t; null is the legacy stream).
// a: 8-bit [m, k] with row stride lda (elements); w: 8-bit [n, k] and out [m, n] packed.
// Returns 0, or an error code with the reason in sdxl_last_error(). Launches asynchronously.
SDXL_EXPORT int sdxl_gemm8(const void* a, const void* w, void* out, const float* a_scale, const float* w_scale,
                   const void* bias, int m, int n, int k, int lda, int out_bf16, int config, void* workspace,
                   size_t workspace_bytes, void* stream) {
  if (config < 0 || config >= kNumConfigs) {
    return fail(kBadArgument, "config " + std::to_string(config) + " out of range 0.." +
                                  std::to_string(kNumConfigs - 1));
  }
  if (m < 0 || n <= 0 || k <= 0) {
    return fail(kBadArgument, "bad sizes M=" + std::to_string(m) + " N=" + std::to_string(n) +
                                  " K=" + std::to_string(k));
  }
  if (m == 0) return kOk;
  if (!a || !w || !out || !a_scale || !w_scale) return fail(kBadArgument, "a, w, out, a_scale and w_scale must not be null");
  if (k % 16 || n % 8 || lda % 16 || lda < k) {
    return fail(kNotSupported, "needs K % 16 == 0, N % 8 == 0 and lda % 16 == 0, lda >= K (TMA's 16-byte rows), "
                                   "got N=" + std::to_string(n) + " K=" + std::to_string(k) +
                                   " lda=" + std::to_string(lda));
  }
  if (!aligned16(a) || !aligned16(w) || !aligned16(out)) {
    return fail(kNotSupported, "a, w and out must be 16-byte aligned (TMA)");
  }
  DeviceInfo dev;
  if (int code = current_device(dev)) return code;
  if (!dev.hopper) {
    return fail(kWrongDevice, "device " + std::to_string(dev.device) +
                                  " is not compute capability 9.0 (the kernels are built for sm_90a)");
  }
  auto s = static_cast<cudaStream_t>(stream);
  return with_config(config, [&](auto cfg) {
    return run_config<decltype(cfg)>(a, w, out, a_scale, w_scale, bias, m, n, k, lda, out_bf16, workspace,
                                     workspace_bytes, s, dev.device, dev.sm_count);
  });
}

}  // extern "C"

#endif  // the exported functions
