// A GPU benchmark of our CUDA launchers that needs no JAX: it runs every
// case of a manifest (benchmarks/gpu_workloads.py writes it, with the boxes
// of the benchmark's own generator and the hashes of the outputs the CPU
// computed) under every tuning below that changes the kernels of its layout
// (LayoutsOf), each a template instantiation of the
// same kernels (gpu_schedule.h, Tuning), times each launch with CUDA events
// (warm-up, then the median of --repeats runs), and checks every output
// bitwise against the CPU's by its hash. One table, one line per (case,
// tuning). `--host` runs the same tunings' schedules serially on the host
// instead (gpu_schedule_serial.h), so a new tuning is checked here, on a
// machine without a GPU, before it costs a GPU minute; compiled as C++
// (g++ -x c++, no CUDA), the file is that host check alone.
//
//   gpu_driver --manifest DIR/manifest.txt [--host] [--tunings a,b]
//              [--cases SUBSTRING] [--repeats N] [--budget-seconds S]
//
// Feature maps and cotangents are not in the manifest (a training batch's
// map is hundreds of MB): both sides generate them from the element index
// (workload_value below, gpu_workloads.py's twin), in values of 1/128 that
// every dtype holds exactly.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __CUDACC__
#include <cuda_runtime_api.h>

#include "cuda/kernels.cuh"
#endif
#include "ffi_common.h"
#include "gpu_schedule.h"
#include "gpu_schedule_serial.h"
#include "kernel_table.h"
#include "roi_math.h"
#include "storage_types.h"

namespace jax_psroi {
namespace driver {

namespace gs = gpu_schedule;

// Whether an operator takes maxima (its own kernels and buffers).
template <typename Operation>
constexpr bool kMaxPooling = std::is_same_v<typename Operation::Pooling, MaxPooling>;

// --- Tunings ----------------------------------------------------------------
// Each a set of the schedule's compile-time choices (gpu_schedule.h, Tuning:
// threads, tile rows, cover per pixel, forward planes, NHWC channel group,
// NHWC planes, forward min blocks, forward and backward blocks per SM, list
// capacity). `default` is what the package ships.
// What a tuning changes, so the driver builds and times only that.
enum Directions { kForwardOnly = 1, kBackwardOnly = 2, kBoth = 3 };

// A tuning the driver alone builds: without the large-grid kernels.
#define JAX_PSROI_DRIVER_TUNING(type, name, directions, ...)  \
  struct type {                                              \
    struct Tune : gs::Tuning<__VA_ARGS__> {                  \
      static constexpr bool kLargeGrids = false;             \
    };                                                       \
    static constexpr const char* kName = name;               \
    static constexpr int kDirections = directions;           \
  };
struct Default {
  using Tune = gs::DefaultTuning;
  static constexpr const char* kName = "default";
  static constexpr int kDirections = kBoth;
};
// Bigger blocks: 8 x 32 backward tiles.
JAX_PSROI_DRIVER_TUNING(Threads256, "threads256", kBoth, 256, 8, 16, 8, 32, 0, 2048, 3, 3, 96)
// Wide backward tiles (2 x 64) and tall ones (8 x 16: fewer RoIs meet one).
JAX_PSROI_DRIVER_TUNING(Tile2x64, "tile2x64", kBackwardOnly, 128, 2, 16, 8, 32, 0, 2048, 5, 7,
                        128)
JAX_PSROI_DRIVER_TUNING(Tile8x16, "tile8x16", kBackwardOnly, 128, 8, 16, 8, 32, 0, 2048, 5, 7,
                        128)
// Less backward shared memory a block, more blocks an SM.
JAX_PSROI_DRIVER_TUNING(Cover8, "cover8", kBackwardOnly, 128, 4, 8, 8, 32, 0, 2048, 5, 8, 96)
// NCHW forward: 4 sums a thread, more threads.
JAX_PSROI_DRIVER_TUNING(Planes4, "planes4", kForwardOnly, 128, 4, 16, 4, 32, 0, 2048, 8, 7, 128)
// NHWC forward: 64-channel groups, more blocks wanted.
JAX_PSROI_DRIVER_TUNING(Nhwc64, "nhwc64", kForwardOnly, 128, 4, 16, 8, 64, 0, 8192, 5, 7, 128)
// NHWC forward in NCHW's form: a thread's taps found once for a run of 8 or
// 4 channels (contiguous in bin-major order).
JAX_PSROI_DRIVER_TUNING(NhwcPlanes8, "nhwc_planes8", kForwardOnly, 128, 4, 16, 8, 32, 8, 2048,
                        5, 7, 128)
JAX_PSROI_DRIVER_TUNING(NhwcPlanes4, "nhwc_planes4", kForwardOnly, 128, 4, 16, 8, 32, 4, 2048,
                        6, 7, 128)
// Launch bounds off: ptxas picks the registers.
JAX_PSROI_DRIVER_TUNING(Unbounded, "unbounded", kBoth, 128, 4, 16, 8, 32, 0, 2048, 1, 1, 128)
#undef JAX_PSROI_DRIVER_TUNING
// NHWC forward, the default's channel groups, each block staging 4 RoIs'
// taps at a time for their channels' threads (gpu_schedule.h, ForwardStage).
struct NhwcStaged {
  struct Tune : gs::DefaultTuning {
    static constexpr bool kLargeGrids = false;
    static constexpr int kStageRois = 4;
  };
  static constexpr const char* kName = "nhwc_staged";
  static constexpr int kDirections = kForwardOnly;
};

template <typename... Ts>
struct TuningList {};
using AllTunings = TuningList<Default, Threads256, Tile2x64, Tile8x16, Cover8, Planes4, Nhwc64,
                              NhwcPlanes8, NhwcPlanes4, NhwcStaged, Unbounded>;

// The layouts whose kernels a tuning changes: the others it runs exactly as
// the default does, so the driver spends no GPU time on them.
enum Layouts { kNchwOnly = 1, kNhwcOnly = 2, kEveryLayout = 3 };
template <typename Named>
struct LayoutsOf {
  static constexpr int value = kEveryLayout;
};
template <>
struct LayoutsOf<NhwcPlanes8> {  // NhwcPlanes alone differs from the default
  static constexpr int value = kNhwcOnly;
};
template <>
struct LayoutsOf<NhwcStaged> {
  static constexpr int value = kNhwcOnly;
};

// --- Workload values and hashes (gpu_workloads.py has their twins) ----------

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

PSROI_HD uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z;
}

// Element `index` of the map (seed 1) or of the cotangent (seed 2): one of
// the 256 multiples of 1/128 in [-1, 1).
float workload_value(uint64_t index, uint64_t seed) {
  const uint64_t m = mix64(index + seed * kGolden);
  return static_cast<float>(static_cast<int>(m >> 56) - 128) / 128.0f;
}

// The sum of mix64 of each little-endian 8-byte word (zero-padded) plus its
// position times kGolden, then the byte count: order-sensitive, and as cheap
// on numpy's side as on ours.
uint64_t output_hash(const void* bytes, size_t size) {
  const auto* p = static_cast<const unsigned char*>(bytes);
  uint64_t h = 0;
  for (size_t i = 0; i * 8 < size; ++i) {
    uint64_t word = 0;
    const size_t n = std::min<size_t>(8, size - i * 8);
    std::memcpy(&word, p + i * 8, n);
    h += mix64(word + (i + 1) * kGolden);
  }
  return h ^ size;
}

// --- Cases ------------------------------------------------------------------

struct Case {
  std::map<std::string, std::string> fields;
  std::string str(const std::string& key) const {
    auto it = fields.find(key);
    if (it == fields.end()) {
      std::fprintf(stderr, "manifest: a case lacks %s\n", key.c_str());
      std::exit(2);
    }
    return it->second;
  }
  int64_t integer(const std::string& key) const { return std::stoll(str(key)); }
  double real(const std::string& key) const { return std::stod(str(key)); }
  uint64_t hash(const std::string& key) const { return std::stoull(str(key), nullptr, 16); }
};

std::vector<Case> read_manifest(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(2);
  }
  std::vector<Case> cases;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream tokens(line);
    Case c;
    std::string token;
    while (tokens >> token) {
      const size_t eq = token.find('=');
      if (eq != std::string::npos) c.fields[token.substr(0, eq)] = token.substr(eq + 1);
    }
    cases.push_back(c);
  }
  return cases;
}

std::string directory_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

template <typename T>
std::vector<T> read_array(const std::string& path, size_t count) {
  std::vector<T> values(count);
  std::ifstream in(path, std::ios::binary);
  in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(count * sizeof(T)));
  if (!in) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", count, path.c_str());
    std::exit(2);
  }
  return values;
}

template <typename S>
std::vector<S> generated(int64_t count, uint64_t seed) {
  std::vector<S> values(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    values[i] = Storage<S>::store(
        static_cast<ComputeType<S>>(workload_value(static_cast<uint64_t>(i), seed)));
  }
  return values;
}

// What one case needs, on the host, for any tuning.
template <typename Operation, typename S, typename Layout>
struct HostCase {
  using T = ComputeType<S>;
  CallShape shape;
  BoxRule rule;
  T scale;
  int64_t sampling_ratio;
  std::vector<S> features, cotangent;
  std::vector<T> rois;

  static HostCase make(const Case& c, const std::string& directory) {
    HostCase h;
    const int64_t n = c.integer("N"), channels = c.integer("C"), height = c.integer("H"),
                  width = c.integer("W"), k = c.integer("K"), ph = c.integer("PH"),
                  pw = c.integer("PW");
    const int64_t channels_out =
        Operation::channel_order(0) == ChannelOrder::kShared ? channels : channels / (ph * pw);
    std::vector<int64_t> features = {n, channels, height, width};
    std::vector<int64_t> pooled = {k, channels_out, ph, pw};
    if (Layout::kChannelsLast) {
      features = {n, height, width, channels};
      pooled = {k, ph, pw, channels_out};
    }
    const std::vector<int64_t> rois = {k, 5};
    CallAttributes a;
    a.spatial_scale = c.real("spatial_scale");
    a.sampling_ratio = kMaxPooling<Operation> ? 0 : c.integer("sampling_ratio");
    a.operation = c.integer("attribute");
    a.bin_rows = ph;
    ffi::ErrorOr<CallShape> dims = call_dims<Operation, Layout, T>(
        ffi::Span<const int64_t>(features), ffi::Span<const int64_t>(rois),
        ffi::Span<const int64_t>(pooled), a);
    if (dims.has_error()) {
      std::fprintf(stderr, "%s: %s\n", c.str("name").c_str(), dims.error().message().c_str());
      std::exit(2);
    }
    h.shape = dims.value();
    h.rule = Operation::box_rule(a.operation);
    h.scale = static_cast<T>(a.spatial_scale);
    h.sampling_ratio = a.sampling_ratio;
    h.features = generated<S>(h.shape.feature_elements(), 1);
    h.cotangent = generated<S>(h.shape.outputs(), 2);
    h.rois = read_array<T>(directory + "/" + c.str("rois"), static_cast<size_t>(5 * k));
    return h;
  }
};

struct Row {
  std::string forward_ms = "-", backward_ms = "-", forward_check = "-", backward_check = "-";
};

std::string verdict(uint64_t got, uint64_t expected) {
  return got == expected ? "bitwise" : "DIFFERS";
}

// --- Host: the schedule of a tuning, serially --------------------------------

// The forward of `Tune` on the host into `output` (and RoI Pool's `pixels`).
template <typename Tune, typename Operation, typename S, typename Layout>
void host_forward(const HostCase<Operation, S, Layout>& h, std::vector<S>* output,
                  std::vector<int32_t>* pixels) {
  output->assign(static_cast<size_t>(h.shape.outputs()), S{});
  if constexpr (kMaxPooling<Operation>) {
    pixels->assign(output->size(), -1);
    gs::serial_roi_pool_forward<Tune, S, Layout>(h.features.data(), h.rois.data(), h.shape, h.rule,
                                                 h.scale, nullptr, output->data(), pixels->data());
  } else {
    gs::serial_forward<Tune, S, Layout>(h.features.data(), h.rois.data(), h.shape, h.rule, h.scale,
                                        h.sampling_ratio, /*skip_empty_rois=*/false,
                                        output->data());
  }
}

template <typename Named, typename Operation, typename S, typename Layout>
Row run_on_host(const Case& c, const HostCase<Operation, S, Layout>& h) {
  using Tune = typename Named::Tune;
  Row row;
  std::vector<S> output;
  std::vector<int32_t> pixels;
  if constexpr ((Named::kDirections & kForwardOnly) != 0) {
    host_forward<Tune>(h, &output, &pixels);
    row.forward_check =
        verdict(output_hash(output.data(), output.size() * sizeof(S)), c.hash("forward_hash"));
  } else if constexpr (kMaxPooling<Operation>) {
    host_forward<gs::DefaultTuning>(h, &output, &pixels);  // the maxima's pixels
  }
  if constexpr ((Named::kDirections & kBackwardOnly) != 0) {
    std::vector<S> grad(static_cast<size_t>(h.shape.feature_elements()));
    if constexpr (kMaxPooling<Operation>) {
      gs::serial_backward<Tune, S, Layout>(
          gs::CotangentAtMaximum<S, Layout>{h.cotangent.data(), pixels.data(), h.shape},
          h.rois.data(), h.shape, h.rule, h.scale, 0, grad.data());
    } else {
      gs::serial_backward<Tune, S, Layout>(
          gs::WeightedCotangent<S, Layout>{h.cotangent.data(), h.shape}, h.rois.data(), h.shape,
          h.rule, h.scale, h.sampling_ratio, grad.data());
    }
    row.backward_check =
        verdict(output_hash(grad.data(), grad.size() * sizeof(S)), c.hash("backward_hash"));
  }
  return row;
}

// --- GPU: the launchers of a tuning, timed ----------------------------------
#ifdef __CUDACC__

#define CHECK_CUDA(call)                                                                \
  do {                                                                                  \
    const cudaError_t err_ = (call);                                                    \
    if (err_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err_)); \
      std::exit(3);                                                                     \
    }                                                                                   \
  } while (0)

template <typename V>
struct DeviceArray {
  V* data = nullptr;
  size_t count = 0;
  explicit DeviceArray(size_t n) : count(n) {
    CHECK_CUDA(cudaMalloc(&data, std::max<size_t>(n, 1) * sizeof(V)));
  }
  explicit DeviceArray(const std::vector<V>& host) : DeviceArray(host.size()) {
    CHECK_CUDA(cudaMemcpy(data, host.data(), count * sizeof(V), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() { cudaFree(data); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  // output_hash of the array, summed on the GPU (a gradient is hundreds of
  // MB: copied and hashed on the host, it took longer than its kernels).
  uint64_t hash() const;
};

// output_hash's sum over the whole 8-byte words of `words`.
__global__ void word_hash_kernel(const uint64_t* words, size_t count, unsigned long long* sum) {
  unsigned long long local = 0;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    local += mix64(words[i] + (i + 1) * kGolden);
  }
  atomicAdd(sum, local);  // integers: the same sum in any order
}

template <typename V>
uint64_t DeviceArray<V>::hash() const {
  const size_t size = count * sizeof(V), whole = size / 8;
  unsigned long long* sum;
  CHECK_CUDA(cudaMalloc(&sum, sizeof(*sum)));
  CHECK_CUDA(cudaMemset(sum, 0, sizeof(*sum)));
  if (whole > 0) {
    word_hash_kernel<<<1024, 256>>>(reinterpret_cast<const uint64_t*>(data), whole, sum);
    CHECK_CUDA(cudaGetLastError());
  }
  unsigned long long h = 0;
  CHECK_CUDA(cudaMemcpy(&h, sum, sizeof(h), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(sum));
  if (size % 8 != 0) {  // the last word, zero-padded
    uint64_t word = 0;
    CHECK_CUDA(cudaMemcpy(&word, reinterpret_cast<const unsigned char*>(data) + whole * 8,
                          size % 8, cudaMemcpyDeviceToHost));
    h += mix64(word + (whole + 1) * kGolden);
  }
  return h ^ size;
}

// The median of `repeats` timed launches of `launch` after three untimed.
template <typename F>
double median_ms(cudaStream_t stream, int repeats, F launch) {
  for (int i = 0; i < 3; ++i) CHECK_CUDA(launch());
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int i = 0; i < repeats; ++i) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    CHECK_CUDA(launch());
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

std::string milliseconds(double ms) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.4f", ms);
  return text;
}

// The device buffers of one case.
template <typename S, typename T>
struct DeviceCase {
  DeviceArray<S> input, cotangent, output, grad;
  DeviceArray<T> rois, accumulator;
  DeviceArray<int32_t> pixels;
  template <typename H>
  explicit DeviceCase(const H& h)
      : input(h.features),
        cotangent(h.cotangent),
        output(static_cast<size_t>(h.shape.outputs())),
        grad(static_cast<size_t>(h.shape.feature_elements())),
        rois(h.rois),
        accumulator(std::is_same_v<S, T> ? 0 : static_cast<size_t>(h.shape.feature_elements())),
        pixels(static_cast<size_t>(h.shape.outputs())) {}
};

// Launches `Tune`'s forward of a case on `stream`.
template <typename Tune, typename Operation, typename S, typename Layout, typename T>
cudaError_t gpu_forward(cudaStream_t stream, const HostCase<Operation, S, Layout>& h,
                        DeviceCase<S, T>& dev, int32_t* workspace) {
  if constexpr (kMaxPooling<Operation>) {
    return cuda::launch_roi_pool_forward<S, Layout, Tune>(stream, dev.input.data, dev.rois.data,
                                                          h.shape, h.rule, h.scale, nullptr,
                                                          dev.output.data, dev.pixels.data);
  } else {
    return cuda::launch_forward<S, Layout, Tune>(stream, dev.input.data, dev.rois.data, h.shape,
                                                 h.rule, h.scale, h.sampling_ratio, workspace,
                                                 /*skip_empty_rois=*/false, dev.output.data);
  }
}

template <typename Named, typename Operation, typename S, typename Layout>
Row run_on_gpu(const Case& c, const HostCase<Operation, S, Layout>& h, int repeats) {
  using Tune = typename Named::Tune;
  using T = ComputeType<S>;
  Row row;
  const CallShape& shape = h.shape;
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  DeviceCase<S, T> dev(h);
  DeviceArray<int32_t> workspace(static_cast<size_t>(
      std::max(gs::workspace_elements<Tune>(shape, false), gs::workspace_elements<Tune>(shape, true))));
  if constexpr ((Named::kDirections & kForwardOnly) != 0) {
    row.forward_ms = milliseconds(
        median_ms(stream, repeats, [&] { return gpu_forward<Tune>(stream, h, dev, workspace.data); }));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    row.forward_check = verdict(dev.output.hash(), c.hash("forward_hash"));
  } else if constexpr (kMaxPooling<Operation>) {
    CHECK_CUDA(gpu_forward<gs::DefaultTuning>(stream, h, dev, workspace.data));  // the pixels
  }
  if constexpr ((Named::kDirections & kBackwardOnly) != 0) {
    T* sums = std::is_same_v<S, T> ? reinterpret_cast<T*>(dev.grad.data) : dev.accumulator.data;
    auto backward = [&] {
      if constexpr (kMaxPooling<Operation>) {
        return cuda::launch_backward<S, Layout, Tune>(
            stream, gs::CotangentAtMaximum<S, Layout>{dev.cotangent.data, dev.pixels.data, shape},
            dev.rois.data, shape, h.rule, h.scale, 0, workspace.data, sums, dev.grad.data);
      } else {
        return cuda::launch_backward<S, Layout, Tune>(
            stream, gs::WeightedCotangent<S, Layout>{dev.cotangent.data, shape}, dev.rois.data,
            shape, h.rule, h.scale, h.sampling_ratio, workspace.data, sums, dev.grad.data);
      }
    };
    // Five runs apart, each hashed: the gradient must repeat bitwise.
    uint64_t first = 0;
    bool repeats_bitwise = true;
    for (int run = 0; run < 5; ++run) {
      CHECK_CUDA(backward());
      CHECK_CUDA(cudaStreamSynchronize(stream));
      const uint64_t hash = dev.grad.hash();
      if (run == 0) first = hash;
      repeats_bitwise = repeats_bitwise && hash == first;
    }
    row.backward_ms = milliseconds(median_ms(stream, repeats, backward));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    row.backward_check = verdict(dev.grad.hash(), c.hash("backward_hash"));
    if (!repeats_bitwise) row.backward_check += ",NONDETERMINISTIC";
  }
  CHECK_CUDA(cudaStreamDestroy(stream));
  return row;
}

#endif  // __CUDACC__

// --- Dispatch ---------------------------------------------------------------

struct Options {
  std::string manifest;
  bool host = false;
  std::string tunings;  // comma-separated names; empty: all
  std::string cases;    // substring of case names; empty: all
  int repeats = 25;
  double budget_seconds = 1e9;
};

bool selected(const std::string& list, const std::string& name) {
  if (list.empty()) return true;
  std::stringstream names(list);
  std::string item;
  while (std::getline(names, item, ',')) {
    if (item == name) return true;
  }
  return false;
}

template <typename Operation, typename S, typename Layout, typename... Named>
void run_case(const Case& c, const Options& options, const std::string& directory,
              TuningList<Named...>, int* failures) {
  const HostCase<Operation, S, Layout> h =
      HostCase<Operation, S, Layout>::make(c, directory);
  auto one = [&](auto named) {
    using N = decltype(named);
    constexpr int kLayout = Layout::kChannelsLast ? kNhwcOnly : kNchwOnly;
    if constexpr ((LayoutsOf<N>::value & kLayout) == 0) return;
    if (!selected(options.tunings, N::kName)) return;
#ifdef __CUDACC__
    const Row row = options.host ? run_on_host<N>(c, h) : run_on_gpu<N>(c, h, options.repeats);
#else
    const Row row = run_on_host<N>(c, h);
#endif
    std::printf("| %s | %s | %s | %s | %s | %s |\n", c.str("name").c_str(), N::kName,
                row.forward_ms.c_str(), row.backward_ms.c_str(), row.forward_check.c_str(),
                row.backward_check.c_str());
    std::fflush(stdout);
    const bool forward_ok = row.forward_check == "bitwise" || row.forward_check == "-";
    const bool backward_ok = row.backward_check == "bitwise" || row.backward_check == "-";
    if (!forward_ok || !backward_ok) ++*failures;
  };
  (one(Named{}), ...);
}

template <typename Operation, typename S>
void by_layout(const Case& c, const Options& o, const std::string& dir, int* failures) {
  if (c.str("data_format") == "NHWC") {
    run_case<Operation, S, NhwcLayout>(c, o, dir, AllTunings{}, failures);
  } else {
    run_case<Operation, S, NchwLayout>(c, o, dir, AllTunings{}, failures);
  }
}

// float32 for every operator; bfloat16 for ps_roi_align, the benchmark's
// 16-bit rows (each more dtype is a build of every tuning's kernels more).
template <typename Operation>
void by_dtype(const Case& c, const Options& o, const std::string& dir, int* failures) {
  const std::string dtype = c.str("dtype");
  if (dtype == "float32") {
    by_layout<Operation, float>(c, o, dir, failures);
    return;
  }
  if constexpr (std::is_same_v<Operation, PsRoiAlign>) {
    if (dtype == "bfloat16") {
      by_layout<Operation, BFloat16>(c, o, dir, failures);
      return;
    }
  }
  std::fprintf(stderr, "%s: the driver has no %s rows of this operator\n",
               c.str("name").c_str(), dtype.c_str());
  ++*failures;
}

void dispatch(const Case& c, const Options& o, const std::string& dir, int* failures) {
  const std::string op = c.str("op");
  if (op == "ps_roi_align") {
    by_dtype<PsRoiAlign>(c, o, dir, failures);
  } else if (op == "roi_align") {
    by_dtype<RoiAlign>(c, o, dir, failures);
  } else if (op == "ps_roi_pool") {
    by_dtype<PsRoiPool>(c, o, dir, failures);
  } else if (op == "roi_pool") {
    by_dtype<RoiPool>(c, o, dir, failures);
  } else {
    std::fprintf(stderr, "%s: unknown op %s\n", c.str("name").c_str(), op.c_str());
    ++*failures;
  }
}

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--manifest") {
      o.manifest = value();
    } else if (arg == "--host") {
      o.host = true;
    } else if (arg == "--tunings") {
      o.tunings = value();
    } else if (arg == "--cases") {
      o.cases = value();
    } else if (arg == "--repeats") {
      o.repeats = std::max(1, std::stoi(value()));
    } else if (arg == "--budget-seconds") {
      o.budget_seconds = std::stod(value());
    } else {
      std::fprintf(stderr, "unknown argument %s (see the header of gpu_driver.cu)\n",
                   arg.c_str());
      return 2;
    }
  }
  if (o.manifest.empty()) {
    std::fprintf(stderr, "--manifest is required\n");
    return 2;
  }
  const std::string directory = directory_of(o.manifest);
  const auto started = std::chrono::steady_clock::now();
#ifndef __CUDACC__
  if (!o.host) {
    std::fprintf(stderr, "built without CUDA: only --host runs\n");
    return 2;
  }
#else
  if (!o.host) {
    cudaDeviceProp properties;
    CHECK_CUDA(cudaGetDeviceProperties(&properties, 0));
    std::printf("device: %s, %d SMs\n", properties.name, properties.multiProcessorCount);
  }
#endif
  std::printf("| case | tuning | forward ms | backward ms | forward | backward |\n");
  std::printf("|---|---|---|---|---|---|\n");
  int failures = 0, skipped = 0;
  for (const Case& c : read_manifest(o.manifest)) {
    if (!o.cases.empty() && c.str("name").find(o.cases) == std::string::npos) continue;
    if (o.host && c.fields.count("host") == 0) continue;  // big cases: GPU only
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    if (elapsed > o.budget_seconds) {
      std::printf("| %s | (over the time budget: not run) | | | | |\n", c.str("name").c_str());
      ++skipped;
      continue;
    }
    dispatch(c, o, directory, &failures);
  }
  std::printf("%d rows failed a check, %d cases over budget\n", failures, skipped);
  return failures == 0 ? 0 : 1;
}

}  // namespace driver
}  // namespace jax_psroi

int main(int argc, char** argv) { return jax_psroi::driver::main(argc, argv); }
