// The device steps of the Lovász weight kernel, as `src/kernel/segmented/` lays them out.
//
// Each kernel computes, per element, the expressions of `src/kernel/segmented/element.rs`
// in the same order (the host emulation of these steps, `segmented/host.rs`, is what the
// tests run on a machine without a GPU); the sort and the prefix sum are CUB's. Every entry
// point takes raw device pointers and candle's stream, launches on that stream only, never
// synchronises, and returns a cudaError_t (0 on success).
//
// The maths: Berman, Rannen Triki, Blaschko, "The Lovász-Softmax loss", CVPR 2018, Alg. 1
// (the Jaccard gradient, here in closed form from exact prefix counts).

#include <cstdint>
#include <cuda_runtime.h>
#include <cub/block/block_reduce.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

namespace {

constexpr uint32_t VOID_LABEL = 0xFFFFFFFFu;
// Must equal `segmented::WALK_BLOCK`: the walk sums its offsets and losses per block of
// this many slots.
constexpr int WALK_BLOCK = 1024;
constexpr int THREADS = 256;

// `segmented::JobRecord`.
struct JobRecord {
  uint32_t first_image;
  uint32_t cls;
  uint32_t channel;
  uint32_t group;
  uint64_t valid;
  uint64_t gts;
  double scale;
};
static_assert(sizeof(JobRecord) == 40, "JobRecord must match the Rust struct");

// `kernel::cuda::ffi::Dims`.
struct Dims {
  uint64_t batch;
  uint64_t channels;
  uint64_t spatial;
  uint64_t seg_len;
  uint32_t channels_last;
  uint32_t kind;    // 0: |fg - x|, 1: hinge 1 - x t
  uint32_t output;  // 0: linear coefficients, 1: weights
  uint32_t wide;    // f64
};
static_assert(sizeof(Dims) == 48, "Dims must match the Rust struct");

__device__ __forceinline__ uint64_t index_of(const Dims& d, uint64_t image, uint64_t channel,
                                             uint64_t pixel) {
  return d.channels_last ? (image * d.spatial + pixel) * d.channels + channel
                         : (image * d.channels + channel) * d.spatial + pixel;
}

// `Real::error_key`: the float's bits in ascending total order, reversed.
__device__ __forceinline__ uint64_t error_key(float e) {
  uint32_t b = __float_as_uint(e);
  uint32_t ascending = (b >> 31) ? ~b : (b | 0x80000000u);
  return static_cast<uint64_t>(~ascending);
}
__device__ __forceinline__ uint64_t error_key(double e) {
  uint64_t b = static_cast<uint64_t>(__double_as_longlong(e));
  uint64_t ascending = (b >> 63) ? ~b : (b | 0x8000000000000000ull);
  return ~ascending;
}

// `ErrorKind::error`: the error of input `x` and its slope bit.
template <typename T>
__device__ __forceinline__ T error_of(uint32_t kind, T x, bool fg, bool* slope) {
  if (kind == 0) {
    T d = (fg ? T(1) : T(0)) - x;
    *slope = d >= T(0);
    return fabs(d);
  }
  T e = T(1) + (fg ? -x : x);
  *slope = e > T(0);
  return e;
}

// `JaccardWalk::resume(gts, f, b).step(fg)`: the Jaccard weight of a slot with `f`
// foreground and `b` background slots before it, the same operations in the same order.
__device__ __forceinline__ double jaccard_weight(uint64_t gts, uint64_t f, uint64_t b, bool fg) {
  uint64_t before = gts + b;
  double inv_before = before == 0 ? 0.0 : 1.0 / static_cast<double>(static_cast<int64_t>(before));
  if (fg) return inv_before;
  uint64_t onion = before + 1;
  double inv = 1.0 / static_cast<double>(static_cast<int64_t>(onion));
  if (onion == 1) return 1.0;
  return static_cast<double>(static_cast<int64_t>(gts - f)) * inv_before * inv;
}

// `ErrorKind::linear::<false>`: (value, share of K, share of the loss) for weight `w`.
__device__ __forceinline__ void linear(uint32_t kind, double w, double err, bool slope, bool fg,
                                       double* a, double* k, double* l) {
  double target = fg ? 1.0 : 0.0;
  if (kind == 0) {
    if (slope) {
      *a = -w;
      *k = w * target;
    } else {
      *a = w;
      *k = -w * target;
    }
    *l = w * err;
  } else if (slope) {
    *a = fg ? -w : w;
    *k = w;
    *l = w * err;
  } else {
    *a = 0.0;
    *k = 0.0;
    *l = 0.0;
  }
}

// CUDA's exponentials (within 2 ulp in f32, 1 ulp in f64 of the correctly rounded value):
// the probabilities from logits may differ from the CPU's by as much, so errors tied to
// within that may rank in another order than on the CPU. A portable exponential shared with
// the CPU would remove that, at ~40 % more time for the CPU's fused softmax (measured).
__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }

template <typename T>
__device__ __forceinline__ bool is_nan(T v) { return v != v; }

// One thread per pixel: softmax over the class axis, NaN propagating (`channel_softmax`).
template <typename T>
__global__ void softmax_kernel(const T* z, T* p, Dims d) {
  uint64_t pixels = d.batch * d.spatial;
  for (uint64_t q = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; q < pixels;
       q += uint64_t(gridDim.x) * blockDim.x) {
    uint64_t image = q / d.spatial, pixel = q % d.spatial;
    T m = z[index_of(d, image, 0, pixel)];
    for (uint64_t c = 1; c < d.channels; ++c) {
      T v = z[index_of(d, image, c, pixel)];
      if (v > m || is_nan(v)) m = v;
    }
    T s = T(0);
    for (uint64_t c = 0; c < d.channels; ++c) {
      uint64_t at = index_of(d, image, c, pixel);
      T e = exp_of(z[at] - m);
      p[at] = e;
      s += e;
    }
    for (uint64_t c = 0; c < d.channels; ++c) {
      uint64_t at = index_of(d, image, c, pixel);
      p[at] /= s;
    }
  }
}

// One thread per pixel: a <- p (a - <p, a>), the softmax Jacobian applied to a gradient.
template <typename T>
__global__ void softmax_backward_kernel(const T* p, T* a, Dims d) {
  uint64_t pixels = d.batch * d.spatial;
  for (uint64_t q = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; q < pixels;
       q += uint64_t(gridDim.x) * blockDim.x) {
    uint64_t image = q / d.spatial, pixel = q % d.spatial;
    T dot = T(0);
    for (uint64_t c = 0; c < d.channels; ++c) {
      uint64_t at = index_of(d, image, c, pixel);
      dot += a[at] * p[at];
    }
    for (uint64_t c = 0; c < d.channels; ++c) {
      uint64_t at = index_of(d, image, c, pixel);
      a[at] = p[at] * (a[at] - dot);
    }
  }
}

template <typename T>
__global__ void scan_nan_kernel(const T* x, uint64_t n, uint32_t* flag) {
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += uint64_t(gridDim.x) * blockDim.x) {
    if (is_nan(x[i])) atomicExch(flag, 1u);
  }
}

// `element::key_of` for every element of a chunk.
template <typename T, typename V>
__global__ void build_keys_kernel(const T* x, const uint32_t* labels, const JobRecord* jobs,
                                  uint64_t elems, Dims d, uint64_t* keys, V* values) {
  for (uint64_t e = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; e < elems;
       e += uint64_t(gridDim.x) * blockDim.x) {
    uint64_t in_chunk = e / d.seg_len, i = e % d.seg_len;
    const JobRecord& job = jobs[in_chunk];
    uint64_t image = job.first_image + i / d.spatial, pixel = i % d.spatial;
    uint32_t label = labels[image * d.spatial + pixel];
    uint64_t position = d.wide ? e : i;
    uint64_t high = d.wide ? 0 : (in_chunk << 32);
    if (label == VOID_LABEL) {
      keys[e] = high | (d.wide ? ~0ull : 0xFFFFFFFFull);
      values[e] = static_cast<V>(position << 2);
      continue;
    }
    bool fg = label == job.cls, slope;
    T err = error_of(d.kind, x[index_of(d, image, job.channel, pixel)], fg, &slope);
    keys[e] = high | error_key(err);
    values[e] = static_cast<V>(position << 2 | uint64_t(slope) << 1 | uint64_t(fg));
  }
}

// The job of each f64 value, as the key of the second sort.
__global__ void job_keys_kernel(const uint64_t* values, uint64_t elems, uint64_t seg_len,
                                uint32_t* job_keys) {
  for (uint64_t p = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; p < elems;
       p += uint64_t(gridDim.x) * blockDim.x) {
    job_keys[p] = static_cast<uint32_t>((values[p] >> 2) / seg_len);
  }
}

template <typename V>
__global__ void foreground_bits_kernel(const V* values, uint64_t elems, uint32_t* counts) {
  for (uint64_t p = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; p < elems;
       p += uint64_t(gridDim.x) * blockDim.x) {
    counts[p] = static_cast<uint32_t>(values[p] & 1);
  }
}

// `element::walk_slot` for every ranked slot; grid (blocks per job, jobs in the chunk),
// each block WALK_BLOCK slots of one job, its offsets and losses summed into `partials`.
template <typename T, typename V>
__global__ void walk_kernel(const T* x, const JobRecord* jobs, Dims d, const V* values,
                            const uint32_t* counts, T* out, double* partials) {
  using Reduce = cub::BlockReduce<double, THREADS>;
  __shared__ typename Reduce::TempStorage scratch;
  uint64_t in_chunk = blockIdx.y;
  const JobRecord job = jobs[in_chunk];
  uint64_t first = in_chunk * d.seg_len;
  uint64_t start = uint64_t(blockIdx.x) * WALK_BLOCK;
  double offset = 0.0, loss = 0.0;
  for (uint64_t k = start + threadIdx.x; k < start + WALK_BLOCK && k < job.valid; k += THREADS) {
    uint64_t slot = first + k;
    uint64_t f = static_cast<uint64_t>(counts[slot] - counts[first]);
    uint64_t value = static_cast<uint64_t>(values[slot]);
    bool slope = (value & 2) != 0, fg = (value & 1) != 0;
    uint64_t i = (value >> 2) % d.seg_len;
    uint64_t image = job.first_image + i / d.spatial, pixel = i % d.spatial;
    uint64_t at = index_of(d, image, job.channel, pixel);
    double w = jaccard_weight(job.gts, f, k - f, fg) * job.scale;
    double a = w, kk = 0.0, l = 0.0;
    if (d.output == 0) {
      bool unused;
      double err = static_cast<double>(error_of(d.kind, x[at], fg, &unused));
      linear(d.kind, w, err, slope, fg, &a, &kk, &l);
    }
    out[at] = static_cast<T>(a);
    offset += kk;
    loss += l;
  }
  double block_offset = Reduce(scratch).Sum(offset);
  __syncthreads();
  double block_loss = Reduce(scratch).Sum(loss);
  if (threadIdx.x == 0) {
    uint64_t at = (in_chunk * gridDim.x + blockIdx.x) * 2;
    partials[at] = block_offset;
    partials[at + 1] = block_loss;
  }
}

// One block: each job's partials in block order, then the jobs in order into their groups.
__global__ void finish_chunk_kernel(const double* partials, const JobRecord* jobs,
                                    uint64_t n_jobs, uint64_t blocks_per_job, double* sums) {
  extern __shared__ double job_sums[];
  for (uint64_t j = threadIdx.x; j < n_jobs; j += blockDim.x) {
    double offset = 0.0, loss = 0.0;
    for (uint64_t b = 0; b < blocks_per_job; ++b) {
      offset += partials[(j * blocks_per_job + b) * 2];
      loss += partials[(j * blocks_per_job + b) * 2 + 1];
    }
    job_sums[2 * j] = offset;
    job_sums[2 * j + 1] = loss;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (uint64_t j = 0; j < n_jobs; ++j) {
      sums[2 * jobs[j].group] += job_sums[2 * j];
      sums[2 * jobs[j].group + 1] += job_sums[2 * j + 1];
    }
  }
}

template <typename T>
__global__ void losses_kernel(const double* sums, const uint32_t* nan, uint64_t groups,
                              T* losses) {
  for (uint64_t g = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; g < groups;
       g += uint64_t(gridDim.x) * blockDim.x) {
    losses[g] = *nan ? static_cast<T>(NAN) : static_cast<T>(sums[2 * g + 1]);
  }
}

unsigned grid_for(uint64_t n) {
  uint64_t blocks = (n + THREADS - 1) / THREADS;
  if (blocks < 1) blocks = 1;
  if (blocks > 65535ull * 16) blocks = 65535ull * 16;
  return static_cast<unsigned>(blocks);
}

int last_error() { return static_cast<int>(cudaGetLastError()); }

template <typename V>
cudaError_t sort_bytes(uint64_t elems, size_t* bytes) {
  cub::DoubleBuffer<uint64_t> keys(nullptr, nullptr);
  cub::DoubleBuffer<V> values(nullptr, nullptr);
  return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, keys, values, static_cast<int>(elems));
}

}  // namespace

extern "C" {

const char* lc_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

// The temporary bytes CUB needs for the sorts and the scan of a chunk of `elems` elements.
int lc_temp_bytes(uint64_t elems, uint32_t wide, size_t* bytes) {
  size_t sort = 0, second = 0, scan = 0;
  cudaError_t e = wide ? sort_bytes<uint64_t>(elems, &sort) : sort_bytes<uint32_t>(elems, &sort);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (wide) {
    cub::DoubleBuffer<uint32_t> keys(nullptr, nullptr);
    cub::DoubleBuffer<uint64_t> values(nullptr, nullptr);
    e = cub::DeviceRadixSort::SortPairs(nullptr, second, keys, values, static_cast<int>(elems));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  e = cub::DeviceScan::ExclusiveSum(nullptr, scan, static_cast<uint32_t*>(nullptr),
                                    static_cast<uint32_t*>(nullptr), static_cast<int>(elems));
  if (e != cudaSuccess) return static_cast<int>(e);
  size_t most = sort > second ? sort : second;
  *bytes = most > scan ? most : scan;
  return 0;
}

int lc_softmax(const void* z, void* p, Dims d, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  unsigned grid = grid_for(d.batch * d.spatial);
  if (d.wide)
    softmax_kernel<double><<<grid, THREADS, 0, s>>>(static_cast<const double*>(z),
                                                     static_cast<double*>(p), d);
  else
    softmax_kernel<float><<<grid, THREADS, 0, s>>>(static_cast<const float*>(z),
                                                    static_cast<float*>(p), d);
  return last_error();
}

int lc_softmax_backward(const void* p, void* a, Dims d, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  unsigned grid = grid_for(d.batch * d.spatial);
  if (d.wide)
    softmax_backward_kernel<double><<<grid, THREADS, 0, s>>>(static_cast<const double*>(p),
                                                              static_cast<double*>(a), d);
  else
    softmax_backward_kernel<float><<<grid, THREADS, 0, s>>>(static_cast<const float*>(p),
                                                             static_cast<float*>(a), d);
  return last_error();
}

int lc_scan_nan(const void* x, uint64_t n, uint32_t wide, uint32_t* flag, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (wide)
    scan_nan_kernel<double><<<grid_for(n), THREADS, 0, s>>>(static_cast<const double*>(x), n, flag);
  else
    scan_nan_kernel<float><<<grid_for(n), THREADS, 0, s>>>(static_cast<const float*>(x), n, flag);
  return last_error();
}

// `jobs` points at the chunk's first job record.
int lc_build_keys(const void* x, const uint32_t* labels, const void* jobs, uint64_t elems, Dims d,
                  uint64_t* keys, void* values, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  auto j = static_cast<const JobRecord*>(jobs);
  if (d.wide)
    build_keys_kernel<double, uint64_t><<<grid_for(elems), THREADS, 0, s>>>(
        static_cast<const double*>(x), labels, j, elems, d, keys, static_cast<uint64_t*>(values));
  else
    build_keys_kernel<float, uint32_t><<<grid_for(elems), THREADS, 0, s>>>(
        static_cast<const float*>(x), labels, j, elems, d, keys, static_cast<uint32_t*>(values));
  return last_error();
}

// Sorts the chunk's (key, value) pairs stably, keys and values in `keys[0]` / `values[0]`
// with `keys[1]` / `values[1]` as the second buffers; `*current` is set to the buffer
// (0 or 1) the sorted values end in (CUB decides it on the host, without a sync).
// f32: the low `32 + job_bits` key bits. f64: the 64-bit error keys, then (when the chunk
// has several jobs) the job of each value, with the key buffers reused as 32-bit keys.
int lc_sort(void* temp, size_t temp_bytes, uint64_t* keys0, uint64_t* keys1, void* values0,
            void* values1, uint64_t elems, uint32_t job_bits, Dims d, int* current, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  int n = static_cast<int>(elems);
  cub::DoubleBuffer<uint64_t> keys(keys0, keys1);
  cudaError_t e;
  if (!d.wide) {
    cub::DoubleBuffer<uint32_t> values(static_cast<uint32_t*>(values0),
                                       static_cast<uint32_t*>(values1));
    e = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, values, n, 0,
                                        static_cast<int>(32 + job_bits), s);
    *current = values.selector;
    return e != cudaSuccess ? static_cast<int>(e) : last_error();
  }
  cub::DoubleBuffer<uint64_t> values(static_cast<uint64_t*>(values0),
                                     static_cast<uint64_t*>(values1));
  e = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, values, n, 0, 64, s);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (job_bits > 0) {
    auto k0 = reinterpret_cast<uint32_t*>(keys0), k1 = reinterpret_cast<uint32_t*>(keys1);
    job_keys_kernel<<<grid_for(elems), THREADS, 0, s>>>(values.Current(), elems, d.seg_len, k0);
    int launched = last_error();
    if (launched != 0) return launched;
    cub::DoubleBuffer<uint32_t> jobs(k0, k1);
    e = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, jobs, values, n, 0,
                                        static_cast<int>(job_bits), s);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  *current = values.selector;
  return last_error();
}

// counts[p] = the foreground bits of values[0, p), over the whole chunk.
int lc_count_foreground(void* temp, size_t temp_bytes, const void* values, uint64_t elems,
                        uint32_t wide, uint32_t* counts, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (wide)
    foreground_bits_kernel<uint64_t><<<grid_for(elems), THREADS, 0, s>>>(
        static_cast<const uint64_t*>(values), elems, counts);
  else
    foreground_bits_kernel<uint32_t><<<grid_for(elems), THREADS, 0, s>>>(
        static_cast<const uint32_t*>(values), elems, counts);
  int launched = last_error();
  if (launched != 0) return launched;
  cudaError_t e =
      cub::DeviceScan::ExclusiveSum(temp, temp_bytes, counts, counts, static_cast<int>(elems), s);
  return e != cudaSuccess ? static_cast<int>(e) : last_error();
}

// The walk of a chunk of `n_jobs` jobs (`jobs` at its first record), then its sums added
// into `sums` (two f64 per group: offset, loss). `partials` holds 2 f64 per block.
int lc_walk(const void* x, const void* jobs, uint64_t n_jobs, uint64_t blocks_per_job, Dims d,
            const void* values, const uint32_t* counts, void* out, double* partials,
            double* sums, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  auto j = static_cast<const JobRecord*>(jobs);
  size_t shared = static_cast<size_t>(n_jobs) * 2 * sizeof(double);
  if (shared > 48 * 1024 || n_jobs > 65535) return static_cast<int>(cudaErrorInvalidValue);
  dim3 grid(static_cast<unsigned>(blocks_per_job), static_cast<unsigned>(n_jobs));
  if (d.wide)
    walk_kernel<double, uint64_t><<<grid, THREADS, 0, s>>>(
        static_cast<const double*>(x), j, d, static_cast<const uint64_t*>(values), counts,
        static_cast<double*>(out), partials);
  else
    walk_kernel<float, uint32_t><<<grid, THREADS, 0, s>>>(
        static_cast<const float*>(x), j, d, static_cast<const uint32_t*>(values), counts,
        static_cast<float*>(out), partials);
  int launched = last_error();
  if (launched != 0) return launched;
  finish_chunk_kernel<<<1, THREADS, shared, s>>>(partials, j, n_jobs, blocks_per_job, sums);
  return last_error();
}

int lc_losses(const double* sums, const uint32_t* nan, uint64_t groups, uint32_t wide,
              void* losses, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (wide)
    losses_kernel<double><<<grid_for(groups), THREADS, 0, s>>>(sums, nan, groups,
                                                              static_cast<double*>(losses));
  else
    losses_kernel<float><<<grid_for(groups), THREADS, 0, s>>>(sums, nan, groups,
                                                             static_cast<float*>(losses));
  return last_error();
}

}  // extern "C"
