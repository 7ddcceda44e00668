// 8-bit 3x3 (and strided) convolutions for Hopper (sm_90a): CUTLASS 3.x implicit-GEMM fprop.
//
//   out[n,p,q,k] = sum_{r,s,c} x[n, p*sh + r - ph, q*sw + s - pw, c] * w[k,r,s,c] * (a_scale * w_scale[k]) + bias[k]
//
// x is NHWC and w is KRSC, both int8 or float8_e4m3 (format 0 / 1); zero padding, dilation 1, groups 1.
// The mainloop is CUTLASS's sm90 implicit GEMM: TMA im2col loads of the activation, TMA tiled loads of the
// filter, warp-group MMA (wgmma) with int32 (INT8) or float32 (FP8) accumulators, one producer warp group and
// one consumer warp group per CTA (the only sm90 conv schedule CUTLASS has; it is not persistent).
// In GEMM terms M = N*P*Q output pixels, N = K output channels, K = C*R*S, so a per-output-channel vector is a
// per-column ("row broadcast") vector of the epilogue. The epilogue is an epilogue visitor tree:
//
//   out = fma(float(acc), a_scale * w_scale[k], float(bias[k]))   rounded once to fp16 / bf16
//
// a_scale is read from device memory by the kernel (no host sync: CUDA-graph safe), bias may be null.
//
// Host contract (C ABI, called through ctypes):
// - `sdxl_conv8_fprop` allocates nothing and never synchronizes; it launches one kernel on `stream`.
// - The first launch of each kernel on each device raises its dynamic shared-memory limit with
//   cudaFuncSetAttribute. Do that first call outside CUDA-graph capture (a warm-up call does it, or
//   `sdxl_conv8_prepare`). Every launch goes through CUTLASS's cluster launcher, which also sets the
//   non-portable-cluster attribute each time; that host call is allowed during capture.
// - Programmatic dependent launch (off unless `sdxl_conv8_set_pdl(1)`), as in gemm8_sm90.cu: a kernel may start
//   its prologue while the one before it finishes, and waits for it (griddepcontrol.wait, compiled in by
//   cuda_build's -DCUTLASS_ENABLE_GDC_FOR_SM90) before its first global-memory access.
// - Every failure returns nonzero and leaves a one-line reason in `sdxl_conv8_last_error()` (per thread).
// The CUDA runtime is linked statically; pointers and streams come from the caller's runtime (same driver
// context), so the library works next to any torch build.
//
// Parts: on a machine with CPUs to spare, cuda_build compiles this file as P translation units side by side
// (-DSDXL_PARTS=P -DSDXL_PART=p, P up to the `sdxl-parts` count below) and links them into one library: part p
// instantiates the configs i with i % P == p (both formats, both output types), part 0 also the exported
// functions. Without SDXL_PART it is one translation unit holding everything.
// sdxl-parts: 9

#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED 1  // wgmma N=160 for the 160-channel tiles (else 5 MMAs of N=32)

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>

// Include order matters: the conv collective builder needs the kernel and device headers first.
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"

// A named namespace: the parts of a split build link to each other's functions.
namespace sdxl_conv8_sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
using ProblemShape = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 2>;

// inline: one definition shared by every part of a split build (the exported functions read what a part wrote)
inline thread_local std::string g_last_error;
inline std::atomic<int> g_pdl{0};  // launch with programmatic dependent launch (`sdxl_conv8_set_pdl`)

constexpr int kFailed = 1;       // a CUDA or argument error
constexpr int kUnsupported = 2;  // the kernel cannot run this problem: run another conv instead

inline int fail(std::string message, int status = kFailed) {
  g_last_error = std::move(message);
  return status;
}

// FP8 mainloop with full-precision accumulation. Hopper's FP8 warp-group MMA adds each K=32 slice into its
// float32 accumulator with only about 13 mantissa bits kept, so long reductions (C*R*S up to 23040 here) drift.
// This variant of CUTLASS's conv mainloop runs the MMAs of one K tile into a zeroed partial accumulator, waits
// for them, and adds the partial into the main accumulator with ordinary float32 adds (the way CUTLASS's FP8
// GEMMs promote). It releases each smem stage as soon as its MMAs are done, so `mma_tail` has nothing left to do.
// Costs: a second accumulator in registers (so 64-row tiles only) and no MMA overlap across K tiles.
template <class Base>
struct PromotedAccumulationMainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::Params;
  using typename Base::TiledMma;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;

  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState read_state, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, TensorStorage& shared_tensors, Params const&) {
    static_assert(is_rmem<FrgTensorC>::value, "accumulators must be in registers");
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)
    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_thread_slice(thread_idx);
    Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA,MMA_M,MMA_K,PIPE)
    Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA,MMA_N,MMA_K,PIPE)
    Tensor partial = make_fragment_like(accum);
    clear(accum);
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.consumer_wait(read_state);
      int stage = read_state.index();
      tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
      warpgroup_fence_operand(partial);
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
        cute::gemm(tiled_mma, tCrA(_, _, k_block, stage), tCrB(_, _, k_block, stage), partial);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(partial);
      pipeline.consumer_release(read_state);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(accum); ++i) {
        accum(i) += partial(i);
      }
      ++read_state;
    }
    warpgroup_fence_operand(accum);
  }

  CUTLASS_DEVICE void mma_tail(MainloopPipeline, PipelineState, int) {}  // every stage was released in mma
};

// One CUTLASS conv kernel: 8-bit operand type, output type, CTA tile (M pixels, N output channels, K input
// channels per filter tap), cluster shape (M x N CTAs sharing filter / activation loads by TMA multicast),
// smem pipeline depth (0: as many stages as fit) and, for FP8, promoted float32 accumulation.
template <class Element8, class ElementOut, int TileM, int TileN, int TileK, int ClusterM, int ClusterN, int Stages,
          bool Promote>
struct Conv8 {
  using Acc = cute::conditional_t<cute::is_same_v<Element8, int8_t>, int32_t, float>;
  using Tile = Shape<Int<TileM>, Int<TileN>, Shape<Int<TileK>>>;
  using Cluster = Shape<Int<ClusterM>, Int<ClusterN>, _1>;

  // Epilogue visitor tree: fma(acc, a_scale * w_scale[k], bias[k]).
  using AScale = fusion::Sm90ScalarBroadcast<float>;
  using WScale = fusion::Sm90RowBroadcast<0, Tile, float, float>;
  using Scale = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, AScale, WScale>;
  using Bias = fusion::Sm90RowBroadcast<0, Tile, ElementOut, float>;
  using Evt = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementOut, float, kRound>,
                              fusion::Sm90AccFetch, Scale, Bias>;

  static constexpr int kAlignOut = 16 / sizeof(ElementOut);
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, float,
      void, cutlass::layout::TensorNHWC, kAlignOut,
      ElementOut, cutlass::layout::TensorNHWC, kAlignOut,
      cutlass::epilogue::TmaWarpSpecialized, Evt>::CollectiveOp;

  using StageCount = cute::conditional_t<
      Stages == 0,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::StageCount<(Stages > 0 ? Stages : 2)>>;
  using BuiltMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,
      Element8, cutlass::layout::TensorNHWC, 16,
      Element8, cutlass::layout::TensorNHWC, 16,
      Acc, Tile, Cluster, StageCount,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using Mainloop = cute::conditional_t<Promote, PromotedAccumulationMainloop<BuiltMainloop>, BuiltMainloop>;

  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>;
  using Op = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

struct Problem {
  const void* x;
  const void* w;
  void* out;
  const float* a_scale;
  const float* w_scale;
  const void* bias;
  int n, h, w_, c, k, r, s, pad_h, pad_w, stride_h, stride_w;
};

inline ProblemShape make_shape_of(Problem const& p) {
  return ProblemShape(cutlass::conv::Mode::kCrossCorrelation,
                      {p.n, p.h, p.w_, p.c},             // activation NHWC
                      {p.k, p.r, p.s, p.c},              // filter KRSC
                      {p.pad_h, p.pad_w},                // lower padding
                      {p.pad_h, p.pad_w},                // upper padding
                      {p.stride_h, p.stride_w},          // traversal stride
                      {1, 1},                            // dilation
                      1);                                // groups
}

template <class Cfg>
typename Cfg::Op::Arguments make_arguments(Problem const& p) {
  using Op = typename Cfg::Op;
  using ElementOut = typename Op::ElementD;
  using StrideC = typename Op::ConvKernel::StrideC;
  using StrideD = typename Op::ConvKernel::StrideD;
  ProblemShape shape = make_shape_of(p);
  // The epilogue sees the output as ((Q, P, N), K): stride_C holds the packed NPQK strides.
  StrideC stride_c{};
  StrideD stride_d{};
  cute::for_each(cute::make_seq<cute::rank<0>(StrideD{})>{}, [&](auto i) {
    cute::get<0, i>(stride_c) = shape.stride_C[ProblemShape::RankT - 2 - i];
    cute::get<0, i>(stride_d) = shape.stride_C[ProblemShape::RankT - 2 - i];
  });
  typename Cfg::Evt::Arguments evt{
      {},                                                                    // accumulator
      {{{1.0f}, {p.a_scale}, {}},                                            // a_scale (device scalar)
       {p.w_scale, 0.0f, {}},                                                // w_scale[k]
       {}},                                                                  // multiply
      {static_cast<ElementOut const*>(p.bias), ElementOut(0), {}},           // bias[k], 0 when null
      {}};                                                                   // fma
  return typename Op::Arguments{
      shape,
      {static_cast<typename Op::ElementA const*>(p.x), static_cast<typename Op::ElementB const*>(p.w)},
      {evt, nullptr, stride_c, static_cast<ElementOut*>(p.out), stride_d}};
}

inline std::string describe(Problem const& p) {
  char text[200];
  std::snprintf(text, sizeof(text), "N=%d H=%d W=%d C=%d K=%d R=%d S=%d pad=(%d,%d) stride=(%d,%d)", p.n, p.h,
                p.w_, p.c, p.k, p.r, p.s, p.pad_h, p.pad_w, p.stride_h, p.stride_w);
  return text;
}

// cudaFuncSetAttribute once per (kernel, device): it is a host-side setting, done on the first call.
template <class Cfg>
cudaError_t prepare_once() {
  using Kernel = typename Cfg::Op::ConvKernel;
  static std::mutex lock;
  static uint64_t done = 0;  // one bit per device ordinal below 64
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
  std::lock_guard<std::mutex> guard(lock);
  if (bit && (done & bit)) return cudaSuccess;
  int smem = Kernel::SharedStorageSize;
  if (smem >= (48 << 10)) {
    err = cudaFuncSetAttribute(cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  done |= bit;
  return cudaSuccess;
}

template <class Cfg>
size_t workspace_of(Problem const& p) {
  return Cfg::Op::get_workspace_size(make_arguments<Cfg>(p));
}

template <class Cfg>
int check(Problem const& p) {
  if (Cfg::Op::can_implement(make_arguments<Cfg>(p)) != cutlass::Status::kSuccess) {
    return fail("CUTLASS cannot implement this conv (" + describe(p) +
                    "): needs C % 16 == 0, K % 16 == 0, padding <= 128 and -128 <= padding - (filter - 1) <= 127 "
                    "(TMA im2col corners), filter <= 255, fewer than 2**31 output pixels",
                kUnsupported);
  }
  return 0;
}

// `workspace` may be null when `check_only`: then nothing but the host-side checks runs (no CUDA call).
template <class Cfg>
int run(Problem const& p, void* workspace, size_t workspace_bytes, cudaStream_t stream, bool check_only) {
  using Op = typename Cfg::Op;
  if (int status = check<Cfg>(p)) return status;
  if (check_only) return 0;
  auto args = make_arguments<Cfg>(p);
  size_t needed = Op::get_workspace_size(args);
  if (needed > workspace_bytes || (needed > 0 && workspace == nullptr)) {
    return fail("workspace too small: needs " + std::to_string(needed) + " bytes");
  }
  cudaError_t err = prepare_once<Cfg>();
  if (err != cudaSuccess) {
    return fail(std::string("cudaFuncSetAttribute failed: ") + cudaGetErrorString(err));
  }
  using Kernel = typename Op::ConvKernel;
  using Cluster = typename Kernel::DispatchPolicy::ClusterShape;
  auto params = Kernel::to_underlying_arguments(args, workspace);
  void* kernel_params[] = {&params};
  cutlass::Status status = cutlass::ClusterLauncher::launch(
      Op::get_grid_shape(params), dim3(size<0>(Cluster{}), size<1>(Cluster{}), size<2>(Cluster{})),
      Kernel::get_block_shape(), Kernel::SharedStorageSize, stream,
      reinterpret_cast<void const*>(cutlass::device_kernel<Kernel>), kernel_params,
      g_pdl.load(std::memory_order_relaxed) != 0);
  if (status != cutlass::Status::kSuccess) {
    err = cudaGetLastError();
    return fail(std::string("kernel launch failed: ") + cutlass::cutlassGetStatusString(status) + " / " +
                cudaGetErrorString(err));
  }
  return 0;
}

// The tile configurations, in the order `config` indexes them; names say M x N x K tile, cluster, and stages
// where fixed. One consumer warp group holds the whole accumulator (154 registers at 128 x 128, of the 255 a
// thread of this 256-thread kernel may have); 64 x 128 tiles with 4 stages leave room for two CTAs per SM, so one
// CTA's epilogue overlaps the other's MMAs. The 160-channel tiles divide SDXL's 320, 640 and 1280 output channels
// exactly, and at 1280 channels and 32x32 make one wave of 128 CTAs on 132 SMs where 128 x 128 tiles need two
// (160 CTAs); their accumulator takes 160 registers. The K tile of 64 divides 320 input channels (128 leaves a
// half-empty K tile per filter tap). The last config is FP8 only (promoted accumulation).
#define SDXL_CONV8_CONFIGS(X)                                      \
  X(0, "128x128x128_1x1", 128, 128, 128, 1, 1, 0, false)           \
  X(1, "128x128x64_1x1", 128, 128, 64, 1, 1, 0, false)             \
  X(2, "128x128x128_2x1", 128, 128, 128, 2, 1, 0, false)           \
  X(3, "128x128x128_1x2", 128, 128, 128, 1, 2, 0, false)           \
  X(4, "64x128x128_1x1_s4", 64, 128, 128, 1, 1, 4, false)          \
  X(5, "128x160x128_1x1", 128, 160, 128, 1, 1, 0, false)           \
  X(6, "128x160x64_1x1", 128, 160, 64, 1, 1, 0, false)             \
  X(7, "128x160x128_2x1", 128, 160, 128, 2, 1, 0, false)           \
  X(8, "64x128x128_1x1_f32acc", 64, 128, 128, 1, 1, 0, true)

constexpr int kNumConfigs = 9;
constexpr int kNumInt8Configs = kNumConfigs - 1;  // the promoted-accumulation config is FP8 only

const char* const kConfigNames[kNumConfigs] = {
#define SDXL_CONV8_NAME(i, name, m, n, kk, cm, cn, st, pr) name,
    SDXL_CONV8_CONFIGS(SDXL_CONV8_NAME)
#undef SDXL_CONV8_NAME
};

inline int num_configs(int fmt) { return fmt == 0 ? kNumInt8Configs : kNumConfigs; }

// Config `I` of SDXL_CONV8_CONFIGS as a type.
template <int I>
struct ConvConfig;
#define SDXL_CONV8_TRAITS(i, name, m, n, kk, cm, cn, st, pr)               \
  template <>                                                           \
  struct ConvConfig<i> {                                                \
    template <class Element8, class ElementOut>                         \
    using Conv = Conv8<Element8, ElementOut, m, n, kk, cm, cn, st, pr>; \
    static constexpr bool kPromote = pr;                                \
  };
SDXL_CONV8_CONFIGS(SDXL_CONV8_TRAITS)
#undef SDXL_CONV8_TRAITS

// What the exported functions call for one config (instantiated below, in the config's part).
// INT8 accumulates exactly in int32: its promoted variant is never instantiated.
template <class Element8, class ElementOut, int I>
int run_config(Problem const& p, void* workspace, size_t workspace_bytes, cudaStream_t stream, bool check_only) {
  if constexpr (ConvConfig<I>::kPromote && cute::is_same_v<Element8, int8_t>) {
    return fail("this config is FP8 only");
  } else {
    using Conv = typename ConvConfig<I>::template Conv<Element8, ElementOut>;
    return run<Conv>(p, workspace, workspace_bytes, stream, check_only);
  }
}

template <class Element8, class ElementOut, int I>
size_t workspace_config(Problem const& p) {
  if constexpr (ConvConfig<I>::kPromote && cute::is_same_v<Element8, int8_t>) {
    return 0;
  } else {
    return workspace_of<typename ConvConfig<I>::template Conv<Element8, ElementOut>>(p);
  }
}

template <class Element8, class ElementOut, int I>
int prepare_config() {
  if constexpr (ConvConfig<I>::kPromote && cute::is_same_v<Element8, int8_t>) {
    return fail("this config is FP8 only");
  } else {
    cudaError_t err = prepare_once<typename ConvConfig<I>::template Conv<Element8, ElementOut>>();
    return err == cudaSuccess ? 0 : fail(std::string("cudaFuncSetAttribute failed: ") + cudaGetErrorString(err));
  }
}

// The configs this translation unit compiles (all of them, or its part's); the others are only declared here
// (`extern template`: no implicit instantiation), and the linker finds them in their own parts.
#if defined(SDXL_PART)
#define SDXL_IN_PART(i) ((i) % SDXL_PARTS == SDXL_PART)
#else
#define SDXL_IN_PART(i) 1
#endif
#define SDXL_CONV8_INSTANTIATE(prefix, i, Element8, ElementOut)                                                  \
  prefix template int run_config<Element8, ElementOut, i>(Problem const&, void*, size_t, cudaStream_t, bool); \
  prefix template size_t workspace_config<Element8, ElementOut, i>(Problem const&);                           \
  prefix template int prepare_config<Element8, ElementOut, i>();
#define SDXL_CONV8_CONFIG(prefix, i)                                      \
  SDXL_CONV8_INSTANTIATE(prefix, i, int8_t, cutlass::half_t)               \
  SDXL_CONV8_INSTANTIATE(prefix, i, int8_t, cutlass::bfloat16_t)           \
  SDXL_CONV8_INSTANTIATE(prefix, i, cutlass::float_e4m3_t, cutlass::half_t) \
  SDXL_CONV8_INSTANTIATE(prefix, i, cutlass::float_e4m3_t, cutlass::bfloat16_t)
#if SDXL_IN_PART(0)
SDXL_CONV8_CONFIG(, 0)
#else
SDXL_CONV8_CONFIG(extern, 0)
#endif
#if SDXL_IN_PART(1)
SDXL_CONV8_CONFIG(, 1)
#else
SDXL_CONV8_CONFIG(extern, 1)
#endif
#if SDXL_IN_PART(2)
SDXL_CONV8_CONFIG(, 2)
#else
SDXL_CONV8_CONFIG(extern, 2)
#endif
#if SDXL_IN_PART(3)
SDXL_CONV8_CONFIG(, 3)
#else
SDXL_CONV8_CONFIG(extern, 3)
#endif
#if SDXL_IN_PART(4)
SDXL_CONV8_CONFIG(, 4)
#else
SDXL_CONV8_CONFIG(extern, 4)
#endif
#if SDXL_IN_PART(5)
SDXL_CONV8_CONFIG(, 5)
#else
SDXL_CONV8_CONFIG(extern, 5)
#endif
#if SDXL_IN_PART(6)
SDXL_CONV8_CONFIG(, 6)
#else
SDXL_CONV8_CONFIG(extern, 6)
#endif
#if SDXL_IN_PART(7)
SDXL_CONV8_CONFIG(, 7)
#else
SDXL_CONV8_CONFIG(extern, 7)
#endif
#if SDXL_IN_PART(8)
SDXL_CONV8_CONFIG(, 8)
#else
SDXL_CONV8_CONFIG(extern, 8)
#endif
static_assert(kNumConfigs == 9, "every config is instantiated above");
#undef SDXL_CONV8_CONFIG
#undef SDXL_CONV8_INSTANTIATE

#if !defined(SDXL_PART) || SDXL_PART == 0  // the exported functions and what only they use

template <class Element8, class ElementOut>
int dispatch_run(int config, Problem const& p, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                 bool check_only) {
  constexpr int fmt = cute::is_same_v<Element8, int8_t> ? 0 : 1;
  if (config < 0 || config >= num_configs(fmt)) {
    return fail("unknown config " + std::to_string(config) + " (have " + std::to_string(num_configs(fmt)) + ")");
  }
  switch (config) {
#define SDXL_CONV8_RUN(i, name, m, n, kk, cm, cn, st, pr) \
  case i:                                                 \
    return run_config<Element8, ElementOut, i>(p, workspace, workspace_bytes, stream, check_only);
    SDXL_CONV8_CONFIGS(SDXL_CONV8_RUN)
#undef SDXL_CONV8_RUN
    default:
      return fail("unknown config " + std::to_string(config));
  }
}

template <class Element8, class ElementOut>
int dispatch_prepare(int config) {
  constexpr int fmt = cute::is_same_v<Element8, int8_t> ? 0 : 1;
  if (config < 0 || config >= num_configs(fmt)) return fail("unknown config " + std::to_string(config));
  switch (config) {
#define SDXL_CONV8_PREP(i, name, m, n, kk, cm, cn, st, pr) \
  case i:                                                  \
    return prepare_config<Element8, ElementOut, i>();
    SDXL_CONV8_CONFIGS(SDXL_CONV8_PREP)
#undef SDXL_CONV8_PREP
    default:
      return fail("unknown config " + std::to_string(config));
  }
}

template <class Element8, class ElementOut>
size_t dispatch_workspace(int config, Problem const& p) {
  switch (config) {
#define SDXL_CONV8_WS(i, name, m, n, kk, cm, cn, st, pr) \
  case i:                                                \
    return workspace_config<Element8, ElementOut, i>(p);
    SDXL_CONV8_CONFIGS(SDXL_CONV8_WS)
#undef SDXL_CONV8_WS
    default:
      return 0;
  }
}

inline bool valid_format(int fmt) { return fmt == 0 || fmt == 1; }

static int fprop(int fmt, Problem const& p, int out_bf16, int config, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream, bool check_only) {
  g_last_error.clear();
  if (!valid_format(fmt)) return fail("unknown format " + std::to_string(fmt) + " (0 int8, 1 fp8 e4m3)");
  if (p.n <= 0 || p.h <= 0 || p.w_ <= 0 || p.c <= 0 || p.k <= 0 || p.r <= 0 || p.s <= 0 || p.stride_h <= 0 ||
      p.stride_w <= 0 || p.pad_h < 0 || p.pad_w < 0 || p.h + 2 * p.pad_h < p.r || p.w_ + 2 * p.pad_w < p.s) {
    return fail("invalid conv shape (" + describe(p) + "): sizes and strides must be positive, padding >= 0, "
                "the filter within the padded input", kUnsupported);
  }
  if (p.stride_h > 8 || p.stride_w > 8) {  // TMA im2col element strides; CUTLASS does not check them
    return fail("stride must be at most 8 (TMA im2col): " + describe(p), kUnsupported);
  }
  if (p.c % 16 || p.k % 16) return fail("C and K must be multiples of 16 (" + describe(p) + ")", kUnsupported);
  if (fmt == 0) {
    return out_bf16
        ? dispatch_run<int8_t, cutlass::bfloat16_t>(config, p, workspace, workspace_bytes, stream, check_only)
        : dispatch_run<int8_t, cutlass::half_t>(config, p, workspace, workspace_bytes, stream, check_only);
  }
  return out_bf16 ? dispatch_run<cutlass::float_e4m3_t, cutlass::bfloat16_t>(config, p, workspace,
                                                                             workspace_bytes, stream, check_only)
                  : dispatch_run<cutlass::float_e4m3_t, cutlass::half_t>(config, p, workspace, workspace_bytes,
                                                                         stream, check_only);
}

#endif  // what only the exported functions use

}  // namespace sdxl_conv8_sm90

#if !defined(SDXL_PART) || SDXL_PART == 0
using namespace sdxl_conv8_sm90;

// Exported even where the build hides symbols by default (-fvisibility=hidden).
#define SDXL_EXPORT __attribute__((visibility("default")))

extern "C" {

// Launch one conv. fmt: 0 int8, 1 float8_e4m3. out_bf16: 0 fp16 output (and bias), 1 bf16.
// Returns 0; 2 when the kernel cannot run this problem (shape, alignment, config); 1 on any other failure.
// The reason is in sdxl_conv8_last_error().
SDXL_EXPORT int sdxl_conv8_fprop(int fmt, const void* x, const void* w, void* out, const float* a_scale,
                                 const float* w_scale, const void* bias, int n, int h, int w_, int c, int k, int r,
                                 int s, int pad_h, int pad_w, int stride_h, int stride_w, int out_bf16, int config,
                                 void* workspace, size_t workspace_bytes, void* stream) {
  if (!x || !w || !out || !a_scale || !w_scale) {
    g_last_error = "null tensor pointer (x, w, out, a_scale, w_scale)";
    return kFailed;
  }
  // TMA descriptors need 16-byte aligned base addresses; CUTLASS does not check them (a bad one would fault).
  auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 != 0; };
  if (misaligned(x) || misaligned(w) || misaligned(out)) {
    g_last_error = "x, w and out must be 16-byte aligned (a tensor view with an odd storage offset?)";
    return kUnsupported;
  }
  Problem p{x, w, out, a_scale, w_scale, bias, n, h, w_, c, k, r, s, pad_h, pad_w, stride_h, stride_w};
  return fprop(fmt, p, out_bf16, config, workspace, workspace_bytes, static_cast<cudaStream_t>(stream), false);
}

// The same checks as sdxl_conv8_fprop (CUTLASS's can_implement included) without launching: no CUDA call.
SDXL_EXPORT int sdxl_conv8_check(int fmt, int n, int h, int w_, int c, int k, int r, int s, int pad_h, int pad_w,
                                 int stride_h, int stride_w, int out_bf16, int config) {
  Problem p{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, n, h, w_, c, k, r, s,
            pad_h, pad_w, stride_h, stride_w};
  return fprop(fmt, p, out_bf16, config, nullptr, 0, nullptr, true);
}

// The one-time setup of a config's kernel on the current device (what the first sdxl_conv8_fprop call does):
// call it before capturing a CUDA graph if no launch has happened yet. Returns 0, or nonzero with the reason.
SDXL_EXPORT int sdxl_conv8_prepare(int fmt, int out_bf16, int config) {
  g_last_error.clear();
  if (!valid_format(fmt)) return fail("unknown format " + std::to_string(fmt) + " (0 int8, 1 fp8 e4m3)");
  if (fmt == 0) {
    return out_bf16 ? dispatch_prepare<int8_t, cutlass::bfloat16_t>(config)
                    : dispatch_prepare<int8_t, cutlass::half_t>(config);
  }
  return out_bf16 ? dispatch_prepare<cutlass::float_e4m3_t, cutlass::bfloat16_t>(config)
                  : dispatch_prepare<cutlass::float_e4m3_t, cutlass::half_t>(config);
}

// Workspace bytes the launch needs (0 for these kernels; kept so callers never have to assume it).
SDXL_EXPORT size_t sdxl_conv8_workspace(int fmt, int n, int h, int w_, int c, int k, int r, int s, int pad_h,
                                        int pad_w, int stride_h, int stride_w, int out_bf16, int config) {
  if (!valid_format(fmt)) return 0;
  Problem p{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, n, h, w_, c, k, r, s,
            pad_h, pad_w, stride_h, stride_w};
  if (fmt == 0) {
    return out_bf16 ? dispatch_workspace<int8_t, cutlass::bfloat16_t>(config, p)
                    : dispatch_workspace<int8_t, cutlass::half_t>(config, p);
  }
  return out_bf16 ? dispatch_workspace<cutlass::float_e4m3_t, cutlass::bfloat16_t>(config, p)
                  : dispatch_workspace<cutlass::float_e4m3_t, cutlass::half_t>(config, p);
}

SDXL_EXPORT int sdxl_conv8_num_configs(int fmt) { return valid_format(fmt) ? num_configs(fmt) : 0; }

SDXL_EXPORT const char* sdxl_conv8_config_name(int fmt, int i) {
  return valid_format(fmt) && i >= 0 && i < num_configs(fmt) ? kConfigNames[i] : nullptr;
}

SDXL_EXPORT const char* sdxl_conv8_last_error() { return g_last_error.c_str(); }

// Programmatic dependent launch on (1) or off (0, the default) for every later launch; returns the setting.
SDXL_EXPORT int sdxl_conv8_set_pdl(int on) {
  g_pdl.store(on ? 1 : 0);
  return g_pdl.load();
}

}  // extern "C"

#endif  // the exported functions
