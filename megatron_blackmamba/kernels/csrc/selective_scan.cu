// Mamba-1 selective scan, forward and backward, for d_state = 16: each channel's states walked
// sequentially in time.
//
// Why, next to mamba-ssm's kernel: its backward runs one block per channel and scans each state
// along time with a block-wide parallel scan, then adds every channel's dB/dC contribution with
// its own global atomic; at BlackMamba's shapes it runs far below its FLOP and byte floors
// (bench/PERF_NOTES.md). Here the forward runs one thread per (batch, channel) over its 16
// states, or, where the grid is small enough, splits them over kFwdSplit lanes (launch_fwd);
// the backward splits a channel's states over kBwdSplit lanes, and a block's channels sum
// their dB/dC contributions on chip (a warp reduce-scatter) before one atomic per (block, state,
// step). Measured on an H100 at the 340M layer: forward+backward 1.47x mamba-ssm's.
//
// Long sequences at a fixed token budget are few sequences, whose channels alone leave most SMs
// idle, so the time axis is split too: the grid's z dimension walks time segments of
// segment_chunks chunks. Both recurrences are linear with the step's decay exp(delta A), so a
// first pass (scan_segment_kernel) walks each segment from zero to its end state (forward) or its
// entry adjoint (backward), scan_combine_kernel chains those into each segment's true start, and
// the main kernels then walk every segment at once from it. With one segment none of that runs.
//
// Memory plan: the forward stores the state every kSteps steps (fp32 checkpoints, [b, d, chunks,
// 16]); the backward walks the chunks last to first, stages each chunk's rows in shared memory
// (loaded while the previous chunk is reversed), recomputes each kSub-step sub-chunk's states
// from the chunk's checkpoint into shared memory and runs the adjoint recurrence back over them.
// Nothing else is saved: y (for dz) is recomputed from those states.
//
// Conventions are mamba-ssm's selective_scan_fn: u, delta, z, out [b, d, L]; B, C [b, 16, L];
// A [d, 16] (fp32, negative); D, delta_bias [d] (fp32, optional);
// delta <- softplus(delta + delta_bias); h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;
// out_t = (<C_t, h_t> + D u_t) * silu(z_t). Activations are fp32, fp16 or bf16 (all in one
// dtype), computed in fp32. The sequence dimension must be contiguous; other strides are free.
// Exported with a C ABI (no torch headers): the Python side passes pointers, strides and the
// current stream, so one build serves every torch version.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>


namespace {

constexpr int kStates = 16;  // d_state
constexpr int kSteps = 16;   // time steps per chunk = checkpoint interval
constexpr int kWarp = 32;
constexpr float kLog2e = 1.4426950408889634f;

}  // namespace

extern "C" {

// Mirrored field for field by ctypes in selective_scan_cuda.py. Element strides.
struct BlackMambaScanParams {
  int64_t batch, dim, seqlen;
  int32_t dtype;     // 0 float32, 1 float16, 2 bfloat16
  int32_t softplus;  // apply softplus to delta + delta_bias
  const void* u;     int64_t u_batch_stride, u_dim_stride;
  const void* delta; int64_t delta_batch_stride, delta_dim_stride;
  const void* z;     int64_t z_batch_stride, z_dim_stride;  // null: no gate
  const void* B;     int64_t B_batch_stride, B_state_stride;
  const void* C;     int64_t C_batch_stride, C_state_stride;
  const float* A;           // [dim, 16] contiguous
  const float* D;           // [dim] or null
  const float* delta_bias;  // [dim] or null
  float* checkpoints;       // [batch, dim, chunks, 16] contiguous
  void* out;                // [batch, dim, seqlen] contiguous (forward)
  const void* dout; int64_t dout_batch_stride, dout_dim_stride;  // backward inputs
  void* du; void* ddelta; void* dz;  // [batch, dim, seqlen] contiguous (dz only with z)
  float* dA;          // [dim, 16]; the float32 gradients are accumulated with atomics,
  float* dB;          // [batch, 16, seqlen]   so the caller zeroes them
  float* dC;          // [batch, 16, seqlen]
  float* dD;          // [dim] or null
  float* ddelta_bias; // [dim] or null
  int64_t segment_chunks;  // chunks per time segment (>= 1); segments = ceil(chunks / this)
  float* segment_states;   // [batch, dim, segments, 16]; null with one segment
  float* segment_delta;    // [batch, dim, segments]: the segment's summed delta; null likewise
};

}  // extern "C"

namespace {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The widest load of up to 16 bytes that a row segment of kN elements of T fills.
template <int kBytes> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<4> { using type = unsigned; };
template <typename T, int kN>
struct RowVec {
  static constexpr int kBytes = kN * sizeof(T) < 16 ? kN * int(sizeof(T)) : 16;
  static constexpr int kPer = kBytes / sizeof(T);
  using type = typename VecOf<kBytes>::type;
};

// kN consecutive elements of one row as loaded, still in T: what a thread holds in flight while
// it works on the previous chunk (half the registers of floats at 16 bits).
template <typename T, int kN>
struct PackedRow {
  using Vec = RowVec<T, kN>;
  typename Vec::type v[kN / Vec::kPer];
};

// Elements at index >= valid read as 0. Whole vectors when the row segment is complete and
// aligned, else element by element.
template <typename T, int kN>
__device__ __forceinline__ PackedRow<T, kN> load_packed(const T* ptr, int valid) {
  using Vec = RowVec<T, kN>;
  PackedRow<T, kN> row;
  if (valid == kN && (reinterpret_cast<uintptr_t>(ptr) % Vec::kBytes) == 0) {
#pragma unroll
    for (int v = 0; v < kN / Vec::kPer; ++v) row.v[v] = reinterpret_cast<const typename Vec::type*>(ptr)[v];
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i)
      reinterpret_cast<T*>(&row.v[i / Vec::kPer])[i % Vec::kPer] = i < valid ? ptr[i] : from_float<T>(0.f);
  }
  return row;
}

template <typename T, int kN>
__device__ __forceinline__ void unpack(const PackedRow<T, kN>& row, float (&out)[kN]) {
  using Vec = RowVec<T, kN>;
#pragma unroll
  for (int i = 0; i < kN; ++i) out[i] = to_float(reinterpret_cast<const T*>(&row.v[i / Vec::kPer])[i % Vec::kPer]);
}

template <typename T, int kN>
__device__ __forceinline__ void store_row(T* ptr, int valid, const float (&in)[kN]) {
  using Vec = RowVec<T, kN>;
  constexpr int kPerVec = Vec::kPer;
  if (valid == kN && (reinterpret_cast<uintptr_t>(ptr) % Vec::kBytes) == 0) {
#pragma unroll
    for (int v = 0; v < kN / kPerVec; ++v) {
      typename Vec::type raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerVec; ++i) e[i] = from_float<T>(in[v * kPerVec + i]);
      reinterpret_cast<typename Vec::type*>(ptr)[v] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i)
      if (i < valid) ptr[i] = from_float<T>(in[i]);
  }
}

// B and C of one chunk, loaded by a block of kThreads into registers (fetch_BC_tile; each thread
// holds its kBCPerThread values) and then put into shared memory as [step][state] (put_BC_tile;
// a step's 16 values are contiguous, so a thread reads them as four 16-byte broadcasts). Two
// halves so that a kernel can load the next chunk's tile while it works on this one.
template <int kThreads>
constexpr int kBCPerThread = 2 * kStates * kSteps / kThreads;

template <typename T, int kThreads>
__device__ __forceinline__ void fetch_BC_tile(const BlackMambaScanParams& p, int b, int64_t t0, int valid,
                                              float (&out)[kBCPerThread<kThreads>]) {
  static_assert(2 * kStates * kSteps % kThreads == 0, "whole tiles");
  const T* Bp = static_cast<const T*>(p.B) + b * p.B_batch_stride + t0;
  const T* Cp = static_cast<const T*>(p.C) + b * p.C_batch_stride + t0;
#pragma unroll
  for (int k = 0; k < kBCPerThread<kThreads>; ++k) {
    const int i = threadIdx.x + k * kThreads;
    const int which = i / (kStates * kSteps), n = (i / kSteps) % kStates, t = i % kSteps;
    const T* src = which ? Cp + n * p.C_state_stride : Bp + n * p.B_state_stride;
    out[k] = t < valid ? to_float(src[t]) : 0.f;  // steps past the end read as 0
  }
}

template <int kThreads>
__device__ __forceinline__ void put_BC_tile(const float (&in)[kBCPerThread<kThreads>], float (*sB)[kStates],
                                            float (*sC)[kStates]) {
#pragma unroll
  for (int k = 0; k < kBCPerThread<kThreads>; ++k) {
    const int i = threadIdx.x + k * kThreads;
    const int which = i / (kStates * kSteps), n = (i / kSteps) % kStates, t = i % kSteps;
    (which ? sC : sB)[t][n] = in[k];
  }
}

// Steps in chunk c: kSteps, fewer in a sequence's last chunk.
__device__ __forceinline__ int chunk_steps(const BlackMambaScanParams& p, int c) {
  const int64_t left = p.seqlen - int64_t(c) * kSteps;
  return int(left < kSteps ? left : kSteps);
}

// Chunks of kSteps steps in a sequence.
__device__ __forceinline__ int chunk_count(const BlackMambaScanParams& p) { return int((p.seqlen + kSteps - 1) / kSteps); }

// Time segments of a sequence (the grid's z dimension walks them).
__host__ __device__ __forceinline__ int segment_count(const BlackMambaScanParams& p) {
  const int64_t chunks = (p.seqlen + kSteps - 1) / kSteps;
  return int((chunks + p.segment_chunks - 1) / p.segment_chunks);
}

// The chunks [first, end) of the block's time segment.
struct ChunkRange {
  int first, end;
};

__device__ __forceinline__ ChunkRange segment_range(const BlackMambaScanParams& p) {
  const int first = int(blockIdx.z * p.segment_chunks), chunks = chunk_count(p);
  return {first, int(first + p.segment_chunks < chunks ? first + p.segment_chunks : chunks)};
}

// The (batch, channel) row's 16 values for time segment k in segment_states.
__device__ __forceinline__ float* segment_slot(const BlackMambaScanParams& p, int b, int64_t row, int k) {
  return p.segment_states + ((b * p.dim + row) * segment_count(p) + k) * kStates;
}

// One (batch, channel) row of each [b, d, L] tensor: the inputs as strided (z and dout null where
// absent), the row's element offset in the contiguous outputs (out, du, ddelta, dz) and its state
// checkpoints ([chunks, 16]).
template <typename T>
struct ChannelRows {
  const T *u, *delta, *z, *dout;
  int64_t out;
  float* ckpt;
};

template <typename T>
__device__ __forceinline__ ChannelRows<T> channel_rows(const BlackMambaScanParams& p, int b, int64_t row) {
  ChannelRows<T> io;
  io.u = static_cast<const T*>(p.u) + b * p.u_batch_stride + row * p.u_dim_stride;
  io.delta = static_cast<const T*>(p.delta) + b * p.delta_batch_stride + row * p.delta_dim_stride;
  io.z = p.z ? static_cast<const T*>(p.z) + b * p.z_batch_stride + row * p.z_dim_stride : nullptr;
  io.dout = p.dout ? static_cast<const T*>(p.dout) + b * p.dout_batch_stride + row * p.dout_dim_stride : nullptr;
  io.out = (b * p.dim + row) * p.seqlen;
  io.ckpt = p.checkpoints + (b * p.dim + row) * chunk_count(p) * kStates;
  return io;
}

// A lane's kN states at one checkpoint, 16-byte aligned (kN a multiple of 4 and s0 too): the
// forwards store them, the backward reloads its predecessor chunk's.
template <int kN>
__device__ __forceinline__ void store_states(float* dst, const float (&h)[kN]) {
  static_assert(kN % 4 == 0, "whole float4s");
#pragma unroll
  for (int n = 0; n < kN; n += 4) *reinterpret_cast<float4*>(dst + n) = make_float4(h[n], h[n + 1], h[n + 2], h[n + 3]);
}

template <int kN>
__device__ __forceinline__ void load_states(const float* src, float (&h)[kN]) {
  static_assert(kN % 4 == 0, "whole float4s");
#pragma unroll
  for (int n = 0; n < kN; n += 4) {
    const float4 q = *reinterpret_cast<const float4*>(src + n);
    h[n] = q.x, h[n + 1] = q.y, h[n + 2] = q.z, h[n + 3] = q.w;
  }
}

// Of a chunk's steps, the share [share0, share0 + kShare) that one of a channel's lanes loads and
// stores: how many of them are among the chunk's `valid` steps (none for an inactive channel).
template <int kShare>
__device__ __forceinline__ int share_steps(bool active, int valid, int share0) {
  const int n = active ? valid - share0 : 0;
  return n < 0 ? 0 : (n < kShare ? n : kShare);
}

// softplus with mamba-ssm's cut-off (identity above 20) and its derivative, sigmoid.
__device__ __forceinline__ void softplus_and_slope(float x, float& value, float& slope) {
  if (x <= 20.f) {
    const float e = __expf(x);
    value = log1pf(e);
    slope = e / (1.f + e);
  } else {
    value = x;
    slope = 1.f;
  }
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// Per-channel constants of one thread's channel and its kN states from `state0`.
template <int kN>
struct Channel {
  bool active;
  int64_t d;
  float A[kN];  // A * log2(e), so exp(delta A) = exp2(delta A')
  float D, bias;
};

template <int kN>
__device__ __forceinline__ Channel<kN> load_channel(const BlackMambaScanParams& p, int64_t d, int state0) {
  Channel<kN> ch;
  ch.d = d;
  ch.active = d < p.dim;
#pragma unroll
  for (int n = 0; n < kN; ++n) ch.A[n] = ch.active ? p.A[d * kStates + state0 + n] * kLog2e : 0.f;
  ch.D = ch.active && p.D ? p.D[d] : 0.f;
  ch.bias = ch.active && p.delta_bias ? p.delta_bias[d] : 0.f;
  return ch;
}

// delta for one row segment: softplus(delta + bias) (when asked) and its slope.
template <int kN, typename Ch>
__device__ __forceinline__ void discretize(const BlackMambaScanParams& p, const Ch& ch,
                                           float (&delta)[kN], float (&slope)[kN]) {
#pragma unroll
  for (int t = 0; t < kN; ++t) {
    if (p.softplus) {
      softplus_and_slope(delta[t] + ch.bias, delta[t], slope[t]);
    } else {
      delta[t] += ch.bias;
      slope[t] = 1.f;
    }
  }
}

constexpr int kFwdThreads = 128;

// What a forward lane loads of a chunk: its share of the rows (kShare steps from share0) and its
// part of the B/C tile, held in registers a chunk ahead so that the loads are in flight while the
// current chunk is scanned.
template <typename T, int kShare, int kThreads>
struct ForwardPrefetch {
  PackedRow<T, kShare> u, delta, z;
  float bc[kBCPerThread<kThreads>];

  __device__ __forceinline__ void fetch(const BlackMambaScanParams& p, const ChannelRows<T>& io, int b, int c,
                                        int share0, bool active) {
    const int64_t t0 = int64_t(c) * kSteps;
    const int valid = chunk_steps(p, c), n = share_steps<kShare>(active, valid, share0);
    u = load_packed<T, kShare>(io.u + t0 + share0, n);
    delta = load_packed<T, kShare>(io.delta + t0 + share0, n);
    if (io.z) z = load_packed<T, kShare>(io.z + t0 + share0, n);
    fetch_BC_tile<T, kThreads>(p, b, t0, valid, bc);
  }
};

// One thread per (batch, channel). The next chunk's rows and B/C tile are loaded while this one
// is scanned: with one thread per channel an SM holds few warps, too few to hide the loads. Where
// the grid is small enough, scan_fwd_split_kernel below runs instead (launch_fwd).
template <typename T>
__global__ void __launch_bounds__(kFwdThreads) scan_fwd_kernel(BlackMambaScanParams p) {
  __shared__ __align__(16) float sB[kSteps][kStates];
  __shared__ __align__(16) float sC[kSteps][kStates];
  const int b = blockIdx.y;
  const auto ch = load_channel<kStates>(p, int64_t(blockIdx.x) * blockDim.x + threadIdx.x, 0);
  const int64_t row = ch.active ? ch.d : 0;
  const auto io = channel_rows<T>(p, b, row);
  T* out_row = static_cast<T*>(p.out) + io.out;
  const auto range = segment_range(p);

  float h[kStates];
#pragma unroll
  for (int n = 0; n < kStates; ++n) h[n] = 0.f;
  if (p.segment_states && ch.active) load_states(segment_slot(p, b, row, blockIdx.z), h);

  ForwardPrefetch<T, kSteps, kFwdThreads> next;
  next.fetch(p, io, b, range.first, 0, ch.active);

  for (int c = range.first; c < range.end; ++c) {
    const int64_t t0 = int64_t(c) * kSteps;
    const int valid = chunk_steps(p, c);
    float u[kSteps], delta[kSteps], slope[kSteps], gate[kSteps], out[kSteps];
    __syncthreads();  // the previous chunk's reads of sB/sC are done
    put_BC_tile<kFwdThreads>(next.bc, sB, sC);
    unpack(next.u, u);
    unpack(next.delta, delta);
    if (io.z) unpack(next.z, gate);
    if (c + 1 < range.end) next.fetch(p, io, b, c + 1, 0, ch.active);
    __syncthreads();
    if (!ch.active) continue;
    discretize(p, ch, delta, slope);
    if (io.z) {
#pragma unroll
      for (int t = 0; t < kSteps; ++t) gate[t] *= sigmoid(gate[t]);
    }
#pragma unroll
    for (int t = 0; t < kSteps; ++t) {
      if (t < valid) {
        const float du = delta[t] * u[t];
        float y[2] = {ch.D * u[t], 0.f};  // two partial sums: half-length chains
#pragma unroll
        for (int n = 0; n < kStates; ++n) {
          h[n] = exp2f(delta[t] * ch.A[n]) * h[n] + du * sB[t][n];
          y[n & 1] += h[n] * sC[t][n];
        }
        out[t] = io.z ? (y[0] + y[1]) * gate[t] : y[0] + y[1];
      }
    }
    store_row(out_row + t0, valid, out);
    store_states(io.ckpt + c * kStates, h);
  }
}

// One round of the reduce-scatter below: lanes pair up across bit kOffset; each keeps the half
// of v[0, 2 kOffset) on its side of that bit, adds its partner's copy of it, and moves it to
// v[0, kOffset). The halves are picked with bit masks, not `upper ? v[i] : v[j]`, which nvcc
// may compile to a select of addresses and so move v to local memory.
template <int kOffset, int kN>
__device__ __forceinline__ void reduce_scatter_round(float (&v)[kN], int lane) {
  const unsigned upper = (lane & kOffset) ? 0xffffffffu : 0u;
#pragma unroll
  for (int i = 0; i < kOffset; ++i) {
    const unsigned lo = __float_as_uint(v[i]), hi = __float_as_uint(v[i + kOffset]);
    const float keep = __uint_as_float((hi & upper) | (lo & ~upper));
    const float send = __uint_as_float((lo & upper) | (hi & ~upper));
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOffset);
  }
}

// Sums over the kN lanes of an aligned lane group of each of kN values: the lane at position i
// of its group returns the sum of v[i]. Each round halves the values a lane holds (kN - 1
// shuffles in all, instead of kN log2(kN) for kN all-reduces).
template <int kN>
__device__ __forceinline__ float reduce_scatter(float (&v)[kN], int lane) {
  static_assert(kN == 32 || kN == 16 || kN == 8, "a power-of-two group within a warp");
  if constexpr (kN >= 32) reduce_scatter_round<16>(v, lane);
  if constexpr (kN >= 16) reduce_scatter_round<8>(v, lane);
  reduce_scatter_round<4>(v, lane);
  reduce_scatter_round<2>(v, lane);
  reduce_scatter_round<1>(v, lane);
  return v[0];
}

// Sum of x over the kSplit lanes (kWarp / kSplit apart) that share one channel's states.
template <int kSplit>
__device__ __forceinline__ float sum_over_split(float x) {
#pragma unroll
  for (int offset = kWarp / kSplit; offset < kWarp; offset *= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Floats between consecutive steps of a row that a block stages in shared memory (one value per
// channel and step): one per channel of the block, plus a pad of kWarp / kSteps. A channel's
// kSplit lanes stage steps kSteps / kSplit apart, so with the pad lane p's store lands
// kWarp / kSplit banks past lane p - 1's, beyond the warp's other channels (for kChannels a
// multiple of 32); unpadded, a channel's lanes hit one bank (in the backward, 4-way conflicts on
// every staged and unstaged row: 1.42x -> 1.47x mamba-ssm's forward+backward when removed).
template <int kChannels>
constexpr int kRowStride = kChannels + kWarp / kSteps;

// The forward with a channel's states split over kSplit lanes, as in the backward: kSplit times the
// warps of scan_fwd_kernel, for grids where one thread per channel leaves the SMs latency-bound
// (ncu at 36,864 channels: 14% occupancy, 0.46 eligible warps per scheduler), at the price of
// more instructions per state-step (y summed by shuffles, rows staged in shared memory). Each lane
// loads and discretizes its share of a chunk's steps into shared memory, scans its states over all
// of them, and writes its share of the output; the next chunk's share and B/C tile are loaded
// while this one is scanned.
template <typename T, int kThreads, int kMinBlocks, int kSplit>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_fwd_split_kernel(BlackMambaScanParams p) {
  static_assert(kThreads % kWarp == 0 && kSteps % kSplit == 0, "whole warps, equal shares");
  constexpr int kN = kStates / kSplit;          // states per lane
  constexpr int kLanes = kWarp / kSplit;        // channels per warp
  constexpr int kChannels = kThreads / kSplit;  // channels per block
  constexpr int kShare = kSteps / kSplit;       // steps of a chunk each lane loads and stores
  __shared__ __align__(16) float sB[kSteps][kStates];
  __shared__ __align__(16) float sC[kSteps][kStates];
  __shared__ float sDelta[kSteps][kRowStride<kChannels>];  // softplus(delta + bias)
  __shared__ float sDu[kSteps][kRowStride<kChannels>];     // that times u
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int part = lane / kLanes, local = warp * kLanes + lane % kLanes;
  const int b = blockIdx.y, s0 = part * kN, share0 = part * kShare;
  const auto ch = load_channel<kN>(p, int64_t(blockIdx.x) * kChannels + local, s0);
  const int64_t row = ch.active ? ch.d : 0;
  const auto io = channel_rows<T>(p, b, row);
  T* out_row = static_cast<T*>(p.out) + io.out;
  const auto range = segment_range(p);
  float* ckpt = io.ckpt + s0;

  float h[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) h[n] = 0.f;
  if (p.segment_states && ch.active) load_states(segment_slot(p, b, row, blockIdx.z) + s0, h);

  ForwardPrefetch<T, kShare, kThreads> next;
  next.fetch(p, io, b, range.first, share0, ch.active);

  for (int c = range.first; c < range.end; ++c) {
    const int64_t t0 = int64_t(c) * kSteps;
    const int valid = chunk_steps(p, c);
    float u[kShare], delta[kShare], slope[kShare], gate[kShare], out[kShare];
    __syncthreads();  // the previous chunk's reads of the shared rows and tile are done
    put_BC_tile<kThreads>(next.bc, sB, sC);
    unpack(next.u, u);
    unpack(next.delta, delta);
    if (io.z) unpack(next.z, gate);
    if (c + 1 < range.end) next.fetch(p, io, b, c + 1, share0, ch.active);
    discretize(p, ch, delta, slope);
#pragma unroll
    for (int i = 0; i < kShare; ++i) {
      sDelta[share0 + i][local] = delta[i];
      sDu[share0 + i][local] = delta[i] * u[i];
      if (io.z) gate[i] *= sigmoid(gate[i]);
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kSteps; ++t) {
      if (t < valid) {
        const float dt = sDelta[t][local], du = sDu[t][local];
        float y[2] = {0.f, 0.f};  // two partial sums: half-length chains
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          h[n] = exp2f(dt * ch.A[n]) * h[n] + du * sB[t][s0 + n];
          y[n & 1] += h[n] * sC[t][s0 + n];
        }
        const float yt = sum_over_split<kSplit>(y[0] + y[1]);
        if (t / kShare == part) out[t % kShare] = yt;  // t is a constant here: no local memory
      }
    }
    if (!ch.active) continue;
#pragma unroll
    for (int i = 0; i < kShare; ++i) {
      out[i] += ch.D * u[i];
      if (io.z) out[i] *= gate[i];
    }
    store_row(out_row + t0 + share0, share_steps<kShare>(true, valid, share0), out);
    store_states(ckpt + c * kStates, h);
  }
}

// A channel's rows of one chunk in shared memory, [row][step][channel]: the time loops below
// index them with a run-time step, which keeps those loops rolled (a fully unrolled backward
// overflows the instruction cache) without moving register arrays to local memory. Lane 0 of
// the channel's lanes overwrites slope with d delta, z with dz and dy with the gated dy, rows
// that only it reads at that step; du gets a row of its own because every lane reads u, so the
// time loops need no __syncwarp.
enum ChunkRow { kU, kDelta, kSlope, kDy, kZ, kDu, kChunkRows };

// One channel's 16 states are split over kSplit lanes of a warp, kWarp / kSplit apart (more
// threads in flight at BlackMamba's shapes, where one thread per channel leaves most of each SM's
// warp slots empty); each lane runs its kStates / kSplit states.
template <typename T, int kThreads, int kMinBlocks, int kSplit, int kSub>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_bwd_kernel(BlackMambaScanParams p) {
  static_assert(kThreads % kWarp == 0, "whole warps");
  static_assert(kSteps % kSub == 0, "whole sub-chunks");
  static_assert(kSteps % kSplit == 0, "a channel's lanes stage equal shares of a chunk");
  constexpr int kWarps = kThreads / kWarp;
  constexpr int kN = kStates / kSplit;          // states per lane
  constexpr int kLanes = kWarp / kSplit;        // channels per warp
  constexpr int kChannels = kThreads / kSplit;  // channels per block
  constexpr int kShare = kSteps / kSplit;       // steps of a chunk each lane loads and stores
  static_assert(2 * kN == kLanes, "one reduced value per lane");
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int part = lane / kLanes;                      // which state slice of the channel
  const int local = warp * kLanes + lane % kLanes;     // channel within the block
  // hs: states of the sub-chunk being reversed, per lane; slot s holds h after its step s-1
  // (slot 0: the state before it). rows: the channel's rows of the whole chunk, shared by its
  // kSplit lanes. Both are [..][thread or channel], so a warp's accesses hit distinct banks or
  // broadcast.
  extern __shared__ float smem[];
  float* hs = smem;
  float* rows = smem + (kSub + 1) * kN * kThreads;
  __shared__ __align__(16) float sB[kSteps][kStates];
  __shared__ __align__(16) float sC[kSteps][kStates];
  // Per warp and step: lane i's reduced value (padded: the atomics below read along steps).
  __shared__ float reduced[kWarps][kSteps][kWarp + 1];
  auto H = [&](int slot, int n) -> float& { return hs[(slot * kN + n) * kThreads + threadIdx.x]; };
  auto R = [&](int r, int t) -> float& { return rows[(r * kSteps + t) * kRowStride<kChannels> + local]; };

  const int b = blockIdx.y;
  const int s0 = part * kN;
  const auto ch = load_channel<kN>(p, int64_t(blockIdx.x) * kChannels + local, s0);
  const int64_t row = ch.active ? ch.d : 0;
  const auto io = channel_rows<T>(p, b, row);
  const auto range = segment_range(p);
  const float* ckpt = io.ckpt + s0;

  // Each of a channel's kSplit lanes loads and stores kShare of a chunk's steps (one lane doing
  // all of them left the others idle through its loads and softplus). The next chunk's share,
  // B/C tile and checkpoint are loaded while this chunk is reversed; rows of inactive channels
  // read as zeros. (ForwardPrefetch with a dout row instead of this fetch measured 1-2% slower.)
  const int share0 = part * kShare;  // this lane's first step within a chunk
  auto share_of = [&](int count) { return share_steps<kShare>(ch.active, count, share0); };
  PackedRow<T, kShare> next_u, next_delta, next_dy, next_z;
  float next_bc[kBCPerThread<kThreads>];
  float next_h0[kN];  // the state before the chunk: its predecessor's checkpoint
  auto fetch = [&](int c) {
    const int64_t t = int64_t(c) * kSteps + share0;
    const int valid = chunk_steps(p, c), n = share_of(valid);
    next_u = load_packed<T, kShare>(io.u + t, n);
    next_delta = load_packed<T, kShare>(io.delta + t, n);
    next_dy = load_packed<T, kShare>(io.dout + t, n);
    if (io.z) next_z = load_packed<T, kShare>(io.z + t, n);
    fetch_BC_tile<T, kThreads>(p, b, t - share0, valid, next_bc);
    if (c > 0 && ch.active) {
      load_states(ckpt + (c - 1) * kStates, next_h0);
    } else {
#pragma unroll
      for (int n = 0; n < kN; ++n) next_h0[n] = 0.f;
    }
  };
  auto stage = [&]() {  // the fetched chunk into shared memory
    float a[kShare], slope[kShare];
    unpack(next_u, a);
#pragma unroll
    for (int i = 0; i < kShare; ++i) R(kU, share0 + i) = a[i];
    unpack(next_delta, a);
    discretize(p, ch, a, slope);
#pragma unroll
    for (int i = 0; i < kShare; ++i) R(kDelta, share0 + i) = a[i], R(kSlope, share0 + i) = slope[i];
    unpack(next_dy, a);
#pragma unroll
    for (int i = 0; i < kShare; ++i) R(kDy, share0 + i) = a[i];
    if (io.z) {
      unpack(next_z, a);
#pragma unroll
      for (int i = 0; i < kShare; ++i) R(kZ, share0 + i) = a[i];
    }
    put_BC_tile<kThreads>(next_bc, sB, sC);
  };
  auto unstage = [&](int r, T* dst, int count) {
    float a[kShare];
#pragma unroll
    for (int i = 0; i < kShare; ++i) a[i] = R(r, share0 + i);
    store_row(dst + share0, share_of(count), a);
  };

  float g[kN];       // adjoint of h carried to the previous step (already times exp(delta A))
  float dA_acc[kN];  // d loss / d A summed over this channel's steps
  float dD_acc = 0.f, dbias_acc = 0.f;
#pragma unroll
  for (int n = 0; n < kN; ++n) g[n] = dA_acc[n] = 0.f;
  if (p.segment_states && ch.active) load_states(segment_slot(p, b, row, blockIdx.z) + s0, g);

  fetch(range.end - 1);
  for (int c = range.end - 1; c >= range.first; --c) {
    const int64_t t0 = int64_t(c) * kSteps;
    const int valid = chunk_steps(p, c);
    float h0[kN];
#pragma unroll
    for (int n = 0; n < kN; ++n) h0[n] = next_h0[n];
    __syncthreads();  // the previous chunk's reads of the rows, sB/sC and reduced are done
    stage();
    if (c > range.first) fetch(c - 1);
    __syncthreads();

    // Sub-chunks last to first: recompute the sub-chunk's states from the chunk's checkpoint
    // into shared memory, then run the adjoint recurrence back over them.
#pragma unroll 1
    for (int first = (valid - 1) / kSub * kSub; first >= 0; first -= kSub) {
      const int steps = valid - first < kSub ? valid - first : kSub;
      float h[kN];
#pragma unroll
      for (int n = 0; n < kN; ++n) h[n] = h0[n];
#pragma unroll 1
      for (int t = 0; t < first; ++t) {  // the chunk's earlier sub-chunks: advance h only
        const float dt = R(kDelta, t), du = dt * R(kU, t);
#pragma unroll
        for (int n = 0; n < kN; ++n) h[n] = exp2f(dt * ch.A[n]) * h[n] + du * sB[t][s0 + n];
      }

      // Recompute the states; with them y, hence dz, and the gradient reaching y + D u
      // (dy <- dout * silu(z)).
#pragma unroll
      for (int n = 0; n < kN; ++n) H(0, n) = h[n];
#pragma unroll 1
      for (int t = first; t < first + steps; ++t) {
        const float dt = R(kDelta, t), u = R(kU, t), du = dt * u;
        float y[2] = {0.f, 0.f};  // two partial sums: half-length chains
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          h[n] = exp2f(dt * ch.A[n]) * h[n] + du * sB[t][s0 + n];
          y[n & 1] += h[n] * sC[t][s0 + n];
          H(t - first + 1, n) = h[n];
        }
        const float yt = sum_over_split<kSplit>(y[0] + y[1]);
        if (io.z && part == 0) {
          const float z = R(kZ, t), dy = R(kDy, t), sig = sigmoid(z);
          R(kZ, t) = dy * (yt + ch.D * u) * sig * (1.f + z * (1.f - sig));
          R(kDy, t) = dy * z * sig;
        }
      }
      __syncwarp();  // lane 0's gated dy reaches the channel's other lanes
      // The adjoint recurrence, last step first. With w_n = g_n exp(delta A_n) h_{t-1,n}:
      // d delta = sum_n w_n A_n + u <g, B>;  du = delta <g, B> + D dy;  dA_n += w_n delta;
      // dB_n = g_n delta u and dC_n = dy h_n, summed over the block's channels. h holds h_t
      // (first the sub-chunk's last state, from the recomputation), so only h_{t-1} is read back.
#pragma unroll 1
      for (int t = first + steps - 1; t >= first; --t) {
        const float dt = R(kDelta, t), u = R(kU, t), dy = R(kDy, t), du = dt * u;
        float v[2 * kN];
        float gB[2] = {0.f, 0.f}, wA[2] = {0.f, 0.f};  // two partial sums: half-length chains
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          const float gn = g[n] + dy * sC[t][s0 + n];
          const float decay = exp2f(dt * ch.A[n]);
          const float previous = H(t - first, n);
          const float w = gn * decay * previous;
          wA[n & 1] += w * ch.A[n];
          dA_acc[n] += w * dt;
          gB[n & 1] += gn * sB[t][s0 + n];
          v[n] = gn * du;
          v[kN + n] = dy * h[n];
          h[n] = previous;
          g[n] = gn * decay;
        }
        reduced[warp][t][lane] = reduce_scatter(v, lane);
        const float gBt = sum_over_split<kSplit>(gB[0] + gB[1]);
        // wA used A' = A log2(e): convert back to d/d delta.
        const float ddelta_softplus = sum_over_split<kSplit>(wA[0] + wA[1]) / kLog2e + u * gBt;
        if (part == 0) {
          const float ddelta = ddelta_softplus * R(kSlope, t);
          R(kDu, t) = dt * gBt + ch.D * dy;
          R(kSlope, t) = ddelta;
          dbias_acc += ddelta;
          dD_acc += dy * u;
        }
      }
    }
    __syncwarp();  // lane 0's rows of du, d delta and dz reach the lanes that store them
    unstage(kDu, static_cast<T*>(p.du) + io.out + t0, valid);
    unstage(kSlope, static_cast<T*>(p.ddelta) + io.out + t0, valid);
    if (io.z) unstage(kZ, static_cast<T*>(p.dz) + io.out + t0, valid);
    __syncthreads();
    // Lane i of a warp holds, for its state slice i / kLanes, value i % kLanes of v: dB of the
    // slice's state j for j < kN, dC of state j - kN above. Consecutive threads take consecutive
    // steps of one slot, so a warp's atomics land on two contiguous runs of dB/dC.
    for (int i = threadIdx.x; i < kSteps * kWarp; i += kThreads) {
      const int t = i % kSteps, slot = i / kSteps;
      if (t >= valid) continue;
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += reduced[w][t][slot];
      const int j = slot % kLanes, state = slot / kLanes * kN + j % kN;
      float* dst = (j < kN ? p.dB : p.dC) + (b * kStates + state) * p.seqlen;
      atomicAdd(dst + t0 + t, s);
    }
  }
  if (!ch.active) return;
#pragma unroll
  for (int n = 0; n < kN; ++n) atomicAdd(p.dA + ch.d * kStates + s0 + n, dA_acc[n]);
  if (part != 0) return;
  if (p.dD) atomicAdd(p.dD + ch.d, dD_acc);
  if (p.ddelta_bias) atomicAdd(p.ddelta_bias + ch.d, dbias_acc);
}

// The first pass of a scan split in time: each block walks its segment from zero and leaves, per
// (channel, state), the forward's end state or (kAdjoint) the backward's adjoint of the state before
// the segment, in the segment's slot, and the segment's summed delta. One thread per channel over
// its 16 states, the next chunk loaded while this one is walked; the forward's recurrence without
// y, or the adjoint's g <- (g + dy C) exp(delta A) without the rest of the backward.
template <typename T, bool kAdjoint>
__global__ void __launch_bounds__(kFwdThreads) scan_segment_kernel(BlackMambaScanParams p) {
  __shared__ __align__(16) float sB[kSteps][kStates];
  __shared__ __align__(16) float sC[kSteps][kStates];
  if (blockIdx.z == (kAdjoint ? 0 : gridDim.z - 1)) return;  // a start nothing needs
  const int b = blockIdx.y;
  const auto ch = load_channel<kStates>(p, int64_t(blockIdx.x) * blockDim.x + threadIdx.x, 0);
  const int64_t row = ch.active ? ch.d : 0;
  auto io = channel_rows<T>(p, b, row);
  if (kAdjoint) io.u = io.dout;  // the prefetch's first row: u walking forward, dout backward
  const auto range = segment_range(p);
  const int count = range.end - range.first;
  auto chunk_at = [&](int i) { return kAdjoint ? range.end - 1 - i : range.first + i; };

  float h[kStates];  // the state, or its adjoint
#pragma unroll
  for (int n = 0; n < kStates; ++n) h[n] = 0.f;
  float delta_sum = 0.f;

  ForwardPrefetch<T, kSteps, kFwdThreads> next;
  next.fetch(p, io, b, chunk_at(0), 0, ch.active);
  for (int i = 0; i < count; ++i) {
    const int valid = chunk_steps(p, chunk_at(i));
    float x[kSteps], delta[kSteps], slope[kSteps], z[kSteps];  // x: u, or dout
    __syncthreads();  // the previous chunk's reads of sB/sC are done
    put_BC_tile<kFwdThreads>(next.bc, sB, sC);
    unpack(next.u, x);
    unpack(next.delta, delta);
    if (io.z) unpack(next.z, z);
    if (i + 1 < count) next.fetch(p, io, b, chunk_at(i + 1), 0, ch.active);
    __syncthreads();
    if (!ch.active) continue;
    discretize(p, ch, delta, slope);
    if constexpr (kAdjoint) {
#pragma unroll
      for (int t = kSteps - 1; t >= 0; --t) {
        if (t < valid) {
          const float dy = io.z ? x[t] * z[t] * sigmoid(z[t]) : x[t];  // the gradient reaching y
          delta_sum += delta[t];
#pragma unroll
          for (int n = 0; n < kStates; ++n) h[n] = (h[n] + dy * sC[t][n]) * exp2f(delta[t] * ch.A[n]);
        }
      }
    } else {
#pragma unroll
      for (int t = 0; t < kSteps; ++t) {
        if (t < valid) {
          const float du = delta[t] * x[t];
          delta_sum += delta[t];
#pragma unroll
          for (int n = 0; n < kStates; ++n) h[n] = exp2f(delta[t] * ch.A[n]) * h[n] + du * sB[t][n];
        }
      }
    }
  }
  if (!ch.active) return;
  store_states(segment_slot(p, b, row, blockIdx.z), h);
  p.segment_delta[(b * p.dim + row) * segment_count(p) + blockIdx.z] = delta_sum;
}

// Each segment's true start from the first pass, in place: the state entering segment k is the
// previous segment's start decayed through it (exp2(A' * its summed delta)) plus its own end
// state from zero; the backward's adjoint likewise from the last segment back. One thread per
// (batch, channel, state), segments walked in order.
template <bool kAdjoint>
__global__ void scan_combine_kernel(BlackMambaScanParams p, int segments) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.dim * kStates) return;
  const int n = int(i % kStates);
  const int64_t row = i / kStates;  // b * dim + d
  const float a = p.A[(row % p.dim) * kStates + n] * kLog2e;
  float* slot = p.segment_states + row * segments * kStates + n;
  const float* delta_sum = p.segment_delta + row * segments;
  float carry = 0.f;
  for (int j = 0; j < segments; ++j) {
    const int k = kAdjoint ? segments - 1 - j : j;
    const float local = slot[k * kStates];  // unwritten (and unused) for the last one walked
    slot[k * kStates] = carry;
    if (j + 1 < segments) carry = exp2f(delta_sum[k] * a) * carry + local;
  }
}

constexpr int kCombineThreads = 256;

// The first pass and the combine, where the sequence is split in time; nothing with one segment.
template <typename T, bool kAdjoint>
cudaError_t launch_segment_starts(const BlackMambaScanParams& p, cudaStream_t stream) {
  if (p.segment_chunks < 1) return cudaErrorInvalidValue;
  const int segments = segment_count(p);
  if (segments == 1) return cudaSuccess;
  if (!p.segment_states || !p.segment_delta || segments > 65535) return cudaErrorInvalidValue;
  const dim3 grid(unsigned((p.dim + kFwdThreads - 1) / kFwdThreads), unsigned(p.batch), unsigned(segments));
  scan_segment_kernel<T, kAdjoint><<<grid, kFwdThreads, 0, stream>>>(p);
  const int64_t threads = p.batch * p.dim * kStates;
  scan_combine_kernel<kAdjoint>
      <<<unsigned((threads + kCombineThreads - 1) / kCombineThreads), kCombineThreads, 0, stream>>>(p, segments);
  return cudaGetLastError();
}

// Launch shapes, chosen by sweeps on an H100 at the 340M and 630M layers (bench/scan_kernels.py):
// split forward 128 threads, 4 blocks per SM (126 registers, no spills), a channel's states over 2
// lanes; backward 128 threads, 5 blocks per SM, each channel's states split over 4 lanes, 8-step
// sub-chunks held in shared memory.
constexpr int kFwdSplit = 2;
constexpr int kFwdSplitMinBlocks = 4;
constexpr int kBwdThreads = 128;
constexpr int kBwdMinBlocks = 5;
constexpr int kBwdSplit = 4;
constexpr int kBwdSub = 8;

// The split forward where all of its blocks are resident at once, else one thread per channel:
// each block walks its channels' whole sequence, so blocks beyond one round on the SMs run after
// the others instead of beside them (measured on an H100: split at [8, 2944, 2048], 0.73 vs 1.11 ms;
// not at [16, 2304, 2048], whose 576 split blocks exceed the 528 resident).
template <typename T>
cudaError_t launch_fwd(const BlackMambaScanParams& p, cudaStream_t stream) {
  cudaError_t err = launch_segment_starts<T, false>(p, stream);
  if (err != cudaSuccess) return err;
  auto split = scan_fwd_split_kernel<T, kFwdThreads, kFwdSplitMinBlocks, kFwdSplit>;
  constexpr int kSplitChannels = kFwdThreads / kFwdSplit;
  const unsigned segments = unsigned(segment_count(p));
  const dim3 split_grid(unsigned((p.dim + kSplitChannels - 1) / kSplitChannels), unsigned(p.batch), segments);
  int device = 0, sms = 0, per_sm = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, split, kFwdThreads, 0);
  if (err != cudaSuccess) return err;
  if (int64_t(split_grid.x) * split_grid.y * split_grid.z <= int64_t(per_sm) * sms) {
    split<<<split_grid, kFwdThreads, 0, stream>>>(p);
  } else {
    const dim3 grid(unsigned((p.dim + kFwdThreads - 1) / kFwdThreads), unsigned(p.batch), segments);
    scan_fwd_kernel<T><<<grid, kFwdThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const BlackMambaScanParams& p, cudaStream_t stream) {
  auto kernel = scan_bwd_kernel<T, kBwdThreads, kBwdMinBlocks, kBwdSplit, kBwdSub>;
  constexpr int kChannels = kBwdThreads / kBwdSplit;
  const size_t smem =
      (size_t(kBwdSub + 1) * (kStates / kBwdSplit) * kBwdThreads + kChunkRows * kSteps * kRowStride<kChannels>) * sizeof(float);
  cudaError_t err = launch_segment_starts<T, true>(p, stream);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned((p.dim + kChannels - 1) / kChannels), unsigned(p.batch), unsigned(segment_count(p)));
  kernel<<<grid, kBwdThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// f(value of the activation type that BlackMambaScanParams::dtype names), or an error for a bad code.
template <typename F>
cudaError_t with_activation_type(int32_t dtype, F f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__half{});
    case 2: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" {

// Both return a cudaError_t (0 on success); blackmamba_scan_error_string names it.
int blackmamba_scan_fwd(const BlackMambaScanParams* p, void* stream) {
  return with_activation_type(p->dtype, [&](auto t) { return launch_fwd<decltype(t)>(*p, static_cast<cudaStream_t>(stream)); });
}

int blackmamba_scan_bwd(const BlackMambaScanParams* p, void* stream) {
  return with_activation_type(p->dtype, [&](auto t) { return launch_bwd<decltype(t)>(*p, static_cast<cudaStream_t>(stream)); });
}

const char* blackmamba_scan_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// Compile-time constants and the parameter block's size, which the Python side checks against
// its own (a mismatched ctypes mirror would pass garbage pointers).
int blackmamba_scan_states() { return kStates; }
int blackmamba_scan_chunk() { return kSteps; }
int blackmamba_scan_params_size() { return int(sizeof(BlackMambaScanParams)); }

}  // extern "C"
