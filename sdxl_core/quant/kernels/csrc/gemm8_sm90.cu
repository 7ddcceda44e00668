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
// The library also holds the GEGLU projection of SDXL's feed-forward with the GEGLU and the next layer's input
// quantization in its epilogue (`sdxl_geglu8`, the section "the GEGLU GEMM" below).
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
// initializes the kernel's workspace on the given stream (none of the configs needs one) and launches
// with cudaLaunchKernelExC: all legal during stream capture. The one-time setup, raising each kernel's
// dynamic shared memory limit with cudaFuncSetAttribute, happens on the first call of that kernel on each
// device; make that first call outside capture (a warm-up run, as every CUDA-graph user does anyway).
//
// Programmatic dependent launch (PDL, off unless `sdxl_gemm8_set_pdl(1)`, i.e. SDXL_BENCH_PDL=1): each kernel is
// launched with programmatic stream serialization, so it may be scheduled, and run its prologue (barriers, TMA
// descriptor prefetch), while the kernel before it on the stream finishes. CUTLASS's kernels wait for that kernel
// to complete (griddepcontrol.wait, compiled in by cuda_build's -DCUTLASS_ENABLE_GDC_FOR_SM90; without PDL it
// returns at once) before their first global-memory access, and let the next kernel start early
// (griddepcontrol.launch_dependents) as their mainloop ends. A CUDA graph keeps the launch's programmatic
// dependency. Off by default: on Hopper the 8-bit steps took the same time either way (docs/perf.md).

//
// Parts: on a machine with CPUs to spare, cuda_build compiles this file as P translation units side by side
// (-DSDXL_PARTS=P -DSDXL_PART=p, P up to the `sdxl-parts` count below) and links them into one library: part p
// instantiates the configs i with i % P == p (the GEMM configs 0-5, then the GEGLU config as 6), part 0 also the
// exported functions. Without SDXL_PART it is one translation unit holding everything.
// sdxl-parts: 7

#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED 1  // wgmma N=160 (the 128x160 tile)

#include <cuda_runtime.h>

#include <atomic>
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

// Launch with programmatic dependent launch (`sdxl_gemm8_set_pdl`); inline: one flag for every part.
inline std::atomic<int> pdl{0};

inline int fail(int code, std::string message) {
  last_error = std::move(message);
  return code;
}

// ------------------------------------------------------------------------------------------ configurations

using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using PingPongEpi = cutlass::epilogue::TmaWarpSpecialized;
using Persistent = cutlass::gemm::PersistentScheduler;

template <int TileM, int TileN, int TileK, int ClusterM, class Schedule, class EpiSchedule, class Scheduler>
struct Config {
  using TileShape = Shape<Int<TileM>, Int<TileN>, Int<TileK>>;
  using ClusterShape = Shape<Int<ClusterM>, _1, _1>;
  using KernelSchedule = Schedule;
  using EpilogueSchedule = EpiSchedule;
  using TileScheduler = Scheduler;
};

// The names are the configs' identity for callers (kept in engine layer plans). A stream-K config (128x128
// cooperative, K split over idle SMs) was measured at every SDXL shape and chosen at none; it is gone because
// CUTLASS 4.2's stream-K scheduler does not compile with the dependent-launch code (a const `is_last_tile`).
using Config0 = Config<128, 128, 128, 1, Coop, CoopEpi, Persistent>;
using Config1 = Config<128, 160, 128, 1, Coop, CoopEpi, Persistent>;  // N=1280/640 in whole tiles, one wave
using Config2 = Config<128, 256, 128, 1, Coop, CoopEpi, Persistent>;  // large N
using Config3 = Config<64, 128, 128, 1, PingPong, PingPongEpi, Persistent>;  // small M
using Config4 = Config<128, 128, 128, 2, PingPong, PingPongEpi, Persistent>;  // W tiles multicast to 2 CTAs
// Config1's tile with its W tiles multicast to 2 CTAs: at 2048 x 1280 -> 1280 (192 SDXL layers) Config1 runs one
// wave and reads 36 KiB per CTA and K step from L2; multicast makes that 26 (cuBLAS's FP16 pick there is 128x160
// in a 2x1 cluster too).
using Config5 = Config<128, 160, 128, 2, Coop, CoopEpi, Persistent>;

constexpr int kNumConfigs = 6;
const char* const kConfigNames[kNumConfigs] = {
    "coop_128x128x128",
    "coop_128x160x128",
    "coop_128x256x128",
    "pingpong_64x128x128",
    "pingpong_128x128x128_cluster2x1",
    "coop_128x160x128_cluster2x1",
};

// The GEGLU GEMM's config (N counts both halves: the 256-wide tile yields 128 output columns). Measured on Hopper
// against 128x128 cooperative and 64x128 / 64x256 ping-pong tiles, it was the fastest at both SDXL shapes in both
// formats (docs/perf.md); the others were dropped.
using GegluConfig0 = Config<128, 256, 128, 1, Coop, CoopEpi, Persistent>;

constexpr int kNumGegluConfigs = 1;
[[maybe_unused]] const char* const kGegluConfigNames[kNumGegluConfigs] = {"coop_128x256x128"};

// ------------------------------------------------------------------------------------------ launching a kernel

// Raise a kernel's dynamic shared-memory limit once per device (outside any stream capture).
template <class GemmKernel>
int prepare_device(int device) {
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

// Check, prepare and launch one GEMM kernel on `stream` (`what` names it in errors).
template <class GemmKernel, class ClusterShape>
int launch(typename GemmKernel::Arguments const& args, void* workspace, size_t workspace_size, cudaStream_t stream,
           int device, const char* what, int m, int n, int k) {
  if (!GemmKernel::can_implement(args)) {
    return fail(kNotSupported, std::string("CUTLASS cannot implement ") + what + " M=" + std::to_string(m) +
                                   " N=" + std::to_string(n) + " K=" + std::to_string(k) + " with this config");
  }
  size_t needed = GemmKernel::get_workspace_size(args);
  if (needed > 0 && (workspace == nullptr || workspace_size < needed)) {
    return fail(kWorkspace, "workspace of " + std::to_string(workspace_size) + " bytes given, " +
                                std::to_string(needed) + " needed (the *_workspace function)");
  }
  if (int code = prepare_device<GemmKernel>(device)) return code;
  if (GemmKernel::initialize_workspace(args, workspace, stream) != cutlass::Status::kSuccess) {
    return fail(kCudaError, "initializing the GEMM workspace failed (cudaMemsetAsync)");
  }
  typename GemmKernel::Params params = GemmKernel::to_underlying_arguments(args, workspace);

  cudaLaunchAttribute attrs[2];
  unsigned int count = 0;
  if (size(ClusterShape{}) > 1) {  // a 1x1x1 cluster is the plain launch
    attrs[count].id = cudaLaunchAttributeClusterDimension;
    attrs[count].val.clusterDim.x = size<0>(ClusterShape{});
    attrs[count].val.clusterDim.y = size<1>(ClusterShape{});
    attrs[count].val.clusterDim.z = size<2>(ClusterShape{});
    ++count;
  }
  if (pdl.load(std::memory_order_relaxed)) {
    attrs[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[count].val.programmaticStreamSerializationAllowed = 1;
    ++count;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = GemmKernel::get_grid_shape(params);
  config.blockDim = GemmKernel::get_block_shape();
  config.dynamicSmemBytes = GemmKernel::SharedStorageSize;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = count;
  void* kernel_args[] = {&params};
  cudaError_t err =
      cudaLaunchKernelExC(&config, reinterpret_cast<const void*>(cutlass::device_kernel<GemmKernel>), kernel_args);
  if (err != cudaSuccess) {
    return fail(kCudaError, std::string("kernel launch: ") + cudaGetErrorString(err));
  }
  return kOk;
}

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
    return args;
  }

  static size_t workspace_bytes(int m, int n, int k, int device, int sm_count) {
    auto args = arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, k, device, sm_count);
    return GemmKernel::get_workspace_size(args);
  }

  static int run(const void* a, const void* w, void* out, const float* a_scale, const float* w_scale,
                 const void* bias, int m, int n, int k, int lda, void* workspace, size_t workspace_size,
                 cudaStream_t stream, int device, int sm_count) {
    return launch<GemmKernel, ClusterShape>(arguments(a, w, out, a_scale, w_scale, bias, m, n, k, lda, device, sm_count),
                                            workspace, workspace_size, stream, device, "the 8-bit GEMM", m, n, k);
  }
};

// ------------------------------------------------------------------------------------------ the GEGLU GEMM
//
// SDXL's feed-forward starts with  h = GEGLU(x @ W1^T + b1) = value * gelu(gate)  over W1's two halves [value;
// gate] of F rows each, and the next layer quantizes h (times its SmoothQuant scale) to 8 bits. Here one GEMM
// computes both halves and its epilogue writes that 8-bit input of the next GEMM directly:
//
//     value, gate = fma(float(acc), a_scale * w_scale[n], bias[n])   rounded to fp16/bf16, as the plain GEMM's output
//     y           = value * 0.5 * gate * (1 + erf(gate / sqrt(2))) * smooth[f]            in float32
//     out_q[m, f] = INT8: clamp(rint(y * (1 / out_scale)), -128, 127);  FP8: e4m3(clamp(y * (1 / out_scale), +-448))
//
// The weight comes interleaved (`gemm8_cutlass.interleave`): rows 16b..16b+7 are value rows 8b..8b+7 and rows
// 16b+8..16b+15 the gate rows of the same output columns, so in the warp-group MMA's accumulator layout, whose
// value mode is (2 adjacent columns, 2 rows 8 apart, N/8 blocks of 8 columns), a thread holds an output column's
// value in block 2j and its gate in block 2j+1: the epilogue pairs them in registers. It stores straight from
// registers (two output bytes per store: no shared memory, no TMA store), which leaves the mainloop more stages.
// w_scale and bias are interleaved like the weight; w_scale is per channel ([2F]) or one per-tensor value.

template <class ElementAcc_, class ElementQ_>
class GegluEpilogue {
 public:
  using ElementAccumulator = ElementAcc_;
  using ElementCompute = float;
  using ElementC = void;
  using ElementD = ElementQ_;
  using ElementOutput = ElementQ_;
  using StrideC = Stride<int64_t, _1, int64_t>;
  using StrideD = StrideC;
  struct SharedStorage {};

  struct Arguments {
    const float* a_scale = nullptr;    // [1]
    const float* w_scale = nullptr;    // [2F] interleaved, or [1]
    int64_t w_scale_stride = 1;        // 0: one per-tensor scale
    const uint16_t* bias = nullptr;    // [2F] interleaved, fp16 or bf16 bits, or null
    const uint16_t* smooth = nullptr;  // [F], fp16 or bf16 bits like bias, or null
    const float* out_scale = nullptr;  // [1]
    ElementQ_* out = nullptr;          // [M, F], row stride ldo
    int64_t ldo = 0;
    int act_bf16 = 0;                  // the activation dtype the plain GEMM's output would have
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    return get<1>(problem_shape) % 16 == 0 && args.out != nullptr;
  }

  CUTLASS_HOST_DEVICE GegluEpilogue(Params const& params, SharedStorage const& = SharedStorage()) : params(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    const int M = int(get<0>(problem_shape_mnkl));
    const int N = int(get<1>(problem_shape_mnkl));  // 2F
    Tensor coords = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_MNK),
                               make_coord(m_coord, n_coord));  // (BLK_M, BLK_N) -> (m, n) in the whole problem
    Tensor thread_coords = tiled_mma.get_thread_slice(thread_idx).partition_C(coords);
    // One branch here, not one per value: each activation dtype gets its own copy of the loop.
    if (params.act_bf16) {
      store<__nv_bfloat16>(accumulators, thread_coords, M, N);
    } else {
      store<__half>(accumulators, thread_coords, M, N);
    }
  }

 private:
  template <class Act>
  CUTLASS_DEVICE static float load_act(const uint16_t* vector, int i, float absent) {  // bias or smooth
    if (vector == nullptr) return absent;
    uint16_t bits = __ldg(vector + i);
    if constexpr (std::is_same_v<Act, __half>) {
      return __half2float(__ushort_as_half(bits));
    } else {
      return __bfloat162float(__ushort_as_bfloat16(bits));
    }
  }

  template <class Act>
  CUTLASS_DEVICE static float2 round_act(float value, float gate) {  // both rounded to the activation dtype
    if constexpr (std::is_same_v<Act, __half>) {
      return __half22float2(__floats2half2_rn(value, gate));
    } else {
      return __bfloat1622float2(__floats2bfloat162_rn(value, gate));
    }
  }

  // y quantized with the next layer's scale: the stored byte, in the low 8 bits.
  CUTLASS_DEVICE static uint32_t quantize(float y, float inv_out_scale) {
    if constexpr (std::is_same_v<ElementQ_, int8_t>) {
      // clamp(rint(y * (1 / s))): clamping first to the integer bounds gives the same value, and adding 1.5 * 2^23
      // rounds to an integer half to even (float32's step there is 1) and leaves it two's complement in the low byte.
      float v = fminf(fmaxf(__fmul_rn(y, inv_out_scale), -128.0f), 127.0f);
      return __float_as_uint(__fadd_rn(v, 12582912.0f)) & 0xFFu;
    } else {
      // y * (1 / s) differs from y / s by at most one float32 ulp before the e4m3 rounding (3 mantissa bits).
      float v = fminf(fmaxf(__fmul_rn(y, inv_out_scale), -448.0f), 448.0f);
      return ElementQ_(v).storage;  // cvt.rn.satfinite to e4m3
    }
  }

  template <class Act, class Accumulators, class ThreadCoords>
  CUTLASS_DEVICE void store(Accumulators const& accumulators, ThreadCoords const& thread_coords, int M, int N) const {
    // The accumulator fragment is ((2 columns, 2 rows, NB blocks of 8 columns), MMA_M, MMA_N): wgmma's layout.
    using FrgLayout = typename Accumulators::layout_type;
    static_assert(decltype(rank<0>(FrgLayout{}))::value == 3, "expects wgmma's accumulator layout");
    static_assert(decltype(size<0, 0>(FrgLayout{}))::value == 2 && decltype(size<0, 1>(FrgLayout{}))::value == 2,
                  "expects wgmma's accumulator layout");
    constexpr int NB = decltype(size<0, 2>(FrgLayout{}))::value;
    constexpr int MM = decltype(size<1>(FrgLayout{}))::value;
    constexpr int MN = decltype(size<2>(FrgLayout{}))::value;
    static_assert(NB % 2 == 0, "the tile's N must hold whole value/gate pairs of 8-column blocks");

    const float a_scale = *params.a_scale;
    const float inv_out_scale = __frcp_rn(*params.out_scale);
    const int w_scale_step = int(params.w_scale_stride);
    // The rows this thread holds (they do not change with the column block).
    uint8_t* row_out[MM][2];
    bool row_inside[MM][2];
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < MM; ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int m = get<0>(thread_coords(make_coord(make_coord(0, r, 0), mm, 0)));
        row_inside[mm][r] = m < M;
        row_out[mm][r] = reinterpret_cast<uint8_t*>(params.out) + int64_t(m) * params.ldo;
      }
    }
    CUTLASS_PRAGMA_UNROLL
    for (int mn = 0; mn < MN; ++mn) {
      CUTLASS_PRAGMA_UNROLL
      for (int nb = 0; nb < NB; nb += 2) {
        const int n = get<1>(thread_coords(make_coord(make_coord(0, 0, nb), 0, mn)));  // a value column, n % 16 < 8
        if (n >= N) continue;
        const int f = (n >> 4) * 8 + (n & 7);  // its output column (and f + 1 for the next accumulator column)
        float scale_v[2], scale_g[2], bias_v[2], bias_g[2], smooth[2];
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < 2; ++c) {
          scale_v[c] = a_scale * __ldg(params.w_scale + w_scale_step * (n + c));
          scale_g[c] = a_scale * __ldg(params.w_scale + w_scale_step * (n + 8 + c));
          bias_v[c] = load_act<Act>(params.bias, n + c, 0.0f);
          bias_g[c] = load_act<Act>(params.bias, n + 8 + c, 0.0f);
          smooth[c] = load_act<Act>(params.smooth, f + c, 1.0f);
        }
        CUTLASS_PRAGMA_UNROLL
        for (int mm = 0; mm < MM; ++mm) {
          CUTLASS_PRAGMA_UNROLL
          for (int r = 0; r < 2; ++r) {
            if (!row_inside[mm][r]) continue;
            uint32_t packed = 0;
            CUTLASS_PRAGMA_UNROLL
            for (int c = 0; c < 2; ++c) {
              float2 h = round_act<Act>(
                  fmaf(float(accumulators(make_coord(make_coord(c, r, nb), mm, mn))), scale_v[c], bias_v[c]),
                  fmaf(float(accumulators(make_coord(make_coord(c, r, nb + 1), mm, mn))), scale_g[c], bias_g[c]));
              const float gate = h.y;
              const float y = h.x * (0.5f * gate * (1.0f + erff(gate * 0.70710678118654752f))) * smooth[c];
              packed |= quantize(y, inv_out_scale) << (8 * c);
            }
            *reinterpret_cast<uint16_t*>(row_out[mm][r] + f) = uint16_t(packed);
          }
        }
      }
    }
  }

  Params params;
};

template <class Cfg>
struct Geglu8 {
  using TileShape = typename Cfg::TileShape;
  using ClusterShape = typename Cfg::ClusterShape;
  using CollectiveEpilogue =
      cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<GegluEpilogue<ElementAcc, ElementAB>>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementAB, cutlass::layout::RowMajor, 16,
      ElementAB, cutlass::layout::ColumnMajor, 16,
      ElementAcc,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<0>,
      typename Cfg::KernelSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<
      Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue, typename Cfg::TileScheduler>;
  using Arguments = typename GemmKernel::Arguments;
  using EpilogueArguments = typename GegluEpilogue<ElementAcc, ElementAB>::Arguments;

  static Arguments arguments(const void* a, const void* w, const EpilogueArguments& epilogue, int m, int n2, int k,
                             int lda, int device, int sm_count) {
    auto stride_a = cutlass::make_cute_packed_stride(typename GemmKernel::StrideA{}, make_shape(m, k, 1));
    get<0>(stride_a) = lda;
    auto stride_b = cutlass::make_cute_packed_stride(typename GemmKernel::StrideB{}, make_shape(n2, k, 1));
    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = device;
    hw_info.sm_count = sm_count;
    return Arguments{cutlass::gemm::GemmUniversalMode::kGemm,
                     {m, n2, k, 1},
                     {static_cast<const ElementAB*>(a), stride_a, static_cast<const ElementAB*>(w), stride_b},
                     epilogue,
                     hw_info};
  }

  static size_t workspace_bytes(int m, int n2, int k, int device, int sm_count) {
    return GemmKernel::get_workspace_size(arguments(nullptr, nullptr, {}, m, n2, k, k, device, sm_count));
  }

  static int run(const void* a, const void* w, const EpilogueArguments& epilogue, int m, int n2, int k, int lda,
                 void* workspace, size_t workspace_size, cudaStream_t stream, int device, int sm_count) {
    return launch<GemmKernel, ClusterShape>(arguments(a, w, epilogue, m, n2, k, lda, device, sm_count), workspace,
                                            workspace_size, stream, device, "GEGLU GEMM", m, n2, k);
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

template <class Cfg>
int run_geglu_config(const void* a, const void* w, const typename Geglu8<Cfg>::EpilogueArguments& epilogue, int m,
                     int n2, int k, int lda, void* workspace, size_t workspace_size, cudaStream_t stream, int device,
                     int sm_count) {
  return Geglu8<Cfg>::run(a, w, epilogue, m, n2, k, lda, workspace, workspace_size, stream, device, sm_count);
}

template <class Cfg>
size_t workspace_geglu_config(int m, int n2, int k, int device, int sm_count) {
  return Geglu8<Cfg>::workspace_bytes(m, n2, k, device, sm_count);
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
// The GEGLU config follows the GEMM configs in the parts' round robin (the preprocessor needs literal indices).
using GegluArguments = GegluEpilogue<ElementAcc, ElementAB>::Arguments;
#define SDXL_GEGLU8_INSTANTIATE(prefix, Cfg)                                                                      \
  prefix template int run_geglu_config<Cfg>(const void*, const void*, const GegluArguments&, int, int, int, int,   \
                                            void*, size_t, cudaStream_t, int, int);                               \
  prefix template size_t workspace_geglu_config<Cfg>(int, int, int, int, int);
#if SDXL_IN_PART(6)
SDXL_GEGLU8_INSTANTIATE(, GegluConfig0)
#else
SDXL_GEGLU8_INSTANTIATE(extern, GegluConfig0)
#endif
#undef SDXL_GEGLU8_INSTANTIATE

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

template <class F>
auto with_geglu_config(int, F&& f) {
  return f(GegluConfig0{});
}
static_assert(kNumGegluConfigs == 1, "with_geglu_config lists every config");

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

// Programmatic dependent launch on (1) or off (0, the default) for every later launch; returns the setting.
SDXL_EXPORT int sdxl_gemm8_set_pdl(int on) {
  pdl.store(on ? 1 : 0);
  return pdl.load();
}

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

SDXL_EXPORT int sdxl_geglu8_num_configs() { return kNumGegluConfigs; }

SDXL_EXPORT const char* sdxl_geglu8_config_name(int config) {
  return config >= 0 && config < kNumGegluConfigs ? kGegluConfigNames[config] : nullptr;
}

// Bytes of device workspace GEGLU `config` needs for M x K -> 2F on the current device; (size_t)-1 on error.
SDXL_EXPORT size_t sdxl_geglu8_workspace(int m, int f, int k, int config) {
  if (config < 0 || config >= kNumGegluConfigs || m < 0 || f < 0 || k < 0) {
    fail(kBadArgument, "bad config index or negative size");
    return static_cast<size_t>(-1);
  }
  DeviceInfo dev;
  if (current_device(dev) != kOk) return static_cast<size_t>(-1);
  return with_geglu_config(config, [&](auto cfg) {
    return workspace_geglu_config<decltype(cfg)>(m, 2 * f, k, dev.device, dev.sm_count);
  });
}

// out[m, f] = quantize(GEGLU(a @ w^T * (*a_scale * w_scale) + bias) * smooth, *out_scale), as the GEGLU section
// above says, on `stream`. a: 8-bit [m, k] with row stride lda; w: 8-bit [2f, k] interleaved; w_scale: float32
// [2f] interleaved (w_scale_per_channel = 1) or [1]; bias: [2f] interleaved and smooth: [f], both in the
// activation dtype (bf16 when act_bf16, else fp16) or null; out: 8-bit [m, f] packed.
SDXL_EXPORT int sdxl_geglu8(const void* a, const void* w, void* out, const float* a_scale, const float* w_scale,
                    int w_scale_per_channel, const void* bias, const void* smooth, const float* out_scale, int m,
                    int f, int k, int lda, int act_bf16, int config, void* workspace, size_t workspace_bytes,
                    void* stream) {
  if (config < 0 || config >= kNumGegluConfigs) {
    return fail(kBadArgument, "GEGLU config " + std::to_string(config) + " out of range 0.." +
                                  std::to_string(kNumGegluConfigs - 1));
  }
  if (m < 0 || f <= 0 || k <= 0) {
    return fail(kBadArgument, "bad sizes M=" + std::to_string(m) + " F=" + std::to_string(f) +
                                  " K=" + std::to_string(k));
  }
  if (m == 0) return kOk;
  if (!a || !w || !out || !a_scale || !w_scale || !out_scale) {
    return fail(kBadArgument, "a, w, out, a_scale, w_scale and out_scale must not be null");
  }
  if (k % 16 || f % 8 || lda % 16 || lda < k) {
    return fail(kNotSupported, "needs K % 16 == 0, F % 8 == 0 and lda % 16 == 0, lda >= K, got F=" +
                                   std::to_string(f) + " K=" + std::to_string(k) + " lda=" + std::to_string(lda));
  }
  if (!aligned16(a) || !aligned16(w)) return fail(kNotSupported, "a and w must be 16-byte aligned (TMA)");
  if (reinterpret_cast<uintptr_t>(out) & 1) return fail(kNotSupported, "out must be 2-byte aligned");
  DeviceInfo dev;
  if (int code = current_device(dev)) return code;
  if (!dev.hopper) {
    return fail(kWrongDevice, "device " + std::to_string(dev.device) +
                                  " is not compute capability 9.0 (the kernels are built for sm_90a)");
  }
  GegluArguments epilogue;
  epilogue.a_scale = a_scale;
  epilogue.w_scale = w_scale;
  epilogue.w_scale_stride = w_scale_per_channel ? 1 : 0;
  epilogue.bias = static_cast<const uint16_t*>(bias);
  epilogue.smooth = static_cast<const uint16_t*>(smooth);
  epilogue.out_scale = out_scale;
  epilogue.out = static_cast<ElementAB*>(out);
  epilogue.ldo = f;
  epilogue.act_bf16 = act_bf16;
  auto s = static_cast<cudaStream_t>(stream);
  return with_geglu_config(config, [&](auto cfg) {
    return run_geglu_config<decltype(cfg)>(a, w, epilogue, m, 2 * f, k, lda, workspace, workspace_bytes, s,
                                           dev.device, dev.sm_count);
  });
}

}  // extern "C"

#endif  // the exported functions
