// tfz._C: a stream timer made of a pre-created pool of CUDA events, resolved in one batch.
//
// libcudart is loaded at run time (dlopen), so this file builds with a plain C++ compiler: no CUDA
// headers, no nvcc, no torch. Without a usable runtime or device the timer uses the host steady clock.
//
// Runtime search order: $TFZ_CUDART_PATH (only that file), then an already-mapped libcudart.so.13 /
// .12 / .11.0 (RTLD_NOLOAD: reuse torch's copy), then loading those names and libcudart.so.
// TFZ_TIMER_FORCE_CPU=1 selects the host clock without touching libcudart.

#include <dlfcn.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace py = pybind11;

namespace {

// The few CUDA runtime types this file needs (stable C ABI since CUDA 4).
using cudaError_t = int;
using cudaEvent_t = void*;
using cudaStream_t = void*;
constexpr cudaError_t kCudaSuccess = 0;
constexpr unsigned kCudaEventDefault = 0;  // timing enabled, spin-wait synchronisation

constexpr std::int64_t kMaxCapacity = std::int64_t{1} << 24;

bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && std::string(value) != "0";
}

// Function pointers into one loaded libcudart, or the reason why there is none.
struct CudaRuntime {
  bool usable = false;
  std::string path;
  std::string reason;
  int device_count = 0;
  cudaError_t (*get_device_count)(int*) = nullptr;
  cudaError_t (*get_device)(int*) = nullptr;
  cudaError_t (*set_device)(int) = nullptr;
  cudaError_t (*event_create)(cudaEvent_t*, unsigned) = nullptr;
  cudaError_t (*event_record)(cudaEvent_t, cudaStream_t) = nullptr;
  cudaError_t (*event_synchronize)(cudaEvent_t) = nullptr;
  cudaError_t (*event_elapsed)(float*, cudaEvent_t, cudaEvent_t) = nullptr;
  cudaError_t (*event_destroy)(cudaEvent_t) = nullptr;
  const char* (*error_string)(cudaError_t) = nullptr;

  std::string describe(cudaError_t err) const {
    const char* text = error_string != nullptr ? error_string(err) : nullptr;
    return std::string(text != nullptr ? text : "unknown error") + " (cudaError " + std::to_string(err) + ")";
  }
};

void* open_cudart(std::string& reason) {
  const char* explicit_path = std::getenv("TFZ_CUDART_PATH");
  if (explicit_path != nullptr && explicit_path[0] != '\0') {
    void* handle = dlopen(explicit_path, RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* err = dlerror();
      reason = std::string("TFZ_CUDART_PATH=") + explicit_path + " could not be loaded: " + (err ? err : "?");
    }
    return handle;
  }
  static const char* const kMapped[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"};
  for (const char* name : kMapped) {
    if (void* handle = dlopen(name, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD)) return handle;
  }
  static const char* const kLoadable[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
                                          "libcudart.so"};
  for (const char* name : kLoadable) {
    if (void* handle = dlopen(name, RTLD_NOW | RTLD_LOCAL)) return handle;
  }
  dlerror();  // clear the last failure
  reason = "libcudart not found (tried libcudart.so.13, .12, .11.0, libcudart.so)";
  return nullptr;
}

template <typename Fn>
bool bind(void* handle, const char* name, Fn& fn, CudaRuntime& rt) {
  fn = reinterpret_cast<Fn>(dlsym(handle, name));
  if (fn == nullptr) rt.reason = std::string("symbol ") + name + " missing in " + rt.path;
  return fn != nullptr;
}

CudaRuntime load_runtime() {
  CudaRuntime rt;
  void* handle = open_cudart(rt.reason);
  if (handle == nullptr) return rt;  // never dlclose'd: the runtime stays mapped for the process
  void* any_symbol = dlsym(handle, "cudaGetDeviceCount");
  Dl_info info{};
  if (any_symbol != nullptr && dladdr(any_symbol, &info) != 0 && info.dli_fname != nullptr) {
    rt.path = info.dli_fname;
  } else {
    const char* explicit_path = std::getenv("TFZ_CUDART_PATH");
    rt.path = explicit_path != nullptr ? explicit_path : "libcudart";
  }
  bool ok = bind(handle, "cudaGetDeviceCount", rt.get_device_count, rt) &&
            bind(handle, "cudaGetDevice", rt.get_device, rt) &&
            bind(handle, "cudaSetDevice", rt.set_device, rt) &&
            bind(handle, "cudaEventCreateWithFlags", rt.event_create, rt) &&
            bind(handle, "cudaEventRecord", rt.event_record, rt) &&
            bind(handle, "cudaEventSynchronize", rt.event_synchronize, rt) &&
            bind(handle, "cudaEventElapsedTime", rt.event_elapsed, rt) &&
            bind(handle, "cudaEventDestroy", rt.event_destroy, rt) &&
            bind(handle, "cudaGetErrorString", rt.error_string, rt);
  if (!ok) return rt;
  int count = 0;
  cudaError_t err = rt.get_device_count(&count);
  if (err != kCudaSuccess) {
    rt.reason = "cudaGetDeviceCount failed: " + rt.describe(err);
    return rt;
  }
  if (count <= 0) {
    rt.reason = "no CUDA device";
    return rt;
  }
  rt.device_count = count;
  rt.usable = true;
  return rt;
}

// Loaded once per process, on first use (not at import).
const CudaRuntime& runtime() {
  static const CudaRuntime rt = load_runtime();
  return rt;
}

// The runtime to time with, or nullptr for the host clock; `reason` says why not CUDA.
const CudaRuntime* cuda_or_null(std::string& reason) {
  if (env_flag("TFZ_TIMER_FORCE_CPU")) {
    reason = "TFZ_TIMER_FORCE_CPU=1";
    return nullptr;
  }
  const CudaRuntime& rt = runtime();
  if (!rt.usable) {
    reason = rt.reason;
    return nullptr;
  }
  return &rt;
}

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

bool is_int(py::handle obj) { return PyLong_Check(obj.ptr()) && !PyBool_Check(obj.ptr()); }

std::int64_t as_int64(py::handle obj, const char* arg) {
  if (!is_int(obj)) throw py::type_error(std::string(arg) + " must be an int, got " + type_name(obj));
  int overflow = 0;
  long long value = PyLong_AsLongLongAndOverflow(obj.ptr(), &overflow);
  if (overflow != 0) {
    throw py::value_error(std::string(arg) + " out of int64 range: " + std::string(py::repr(obj)));
  }
  return value;
}

using Tag = std::variant<std::int64_t, std::string>;

Tag as_tag(py::handle tag) {
  if (PyUnicode_Check(tag.ptr())) {
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(tag.ptr(), &size);
    if (data == nullptr) throw py::error_already_set();
    return std::string(data, static_cast<std::size_t>(size));
  }
  if (is_int(tag)) return as_int64(tag, "tag");
  throw py::type_error("tag must be a str or an int, got " + type_name(tag));
}

std::uintptr_t as_stream(py::handle stream) {
  if (stream.is_none()) return 0;
  if (is_int(stream)) {
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(stream.ptr(), &overflow);
    if (overflow < 0 || (overflow == 0 && value < 0)) {
      throw py::value_error("stream must be a non-negative CUDA stream handle, got " +
                            std::string(py::repr(stream)));
    }
    unsigned long long handle = PyLong_AsUnsignedLongLong(stream.ptr());
    if (PyErr_Occurred()) {
      PyErr_Clear();
      throw py::value_error("stream handle does not fit in 64 bits: " + std::string(py::repr(stream)));
    }
    return static_cast<std::uintptr_t>(handle);
  }
  if (py::hasattr(stream, "cuda_stream")) return as_stream(stream.attr("cuda_stream"));
  throw py::type_error(
      "stream must be an int handle (torch.cuda.current_stream().cuda_stream), None or an object with "
      ".cuda_stream, got " +
      type_name(stream));
}

py::object tag_to_python(Tag& tag) {
  if (auto* number = std::get_if<std::int64_t>(&tag)) return py::int_(*number);
  return py::str(std::get<std::string>(tag));
}

struct Record {
  Tag tag;
  std::uintptr_t stream = 0;
  std::chrono::steady_clock::time_point host;
};

// Pool of `capacity` slots; record() fills the next slot, resolve() reads them all and empties the pool.
// Timestamps are relative to the first record of the batch (the step: a batch starts after a resolve
// or clear), so their float32 resolution follows the step's length, not the process's age.
class StreamTimer {
 public:
  StreamTimer(const py::object& capacity, const std::string& clock, const py::object& device) {
    std::int64_t cap = as_int64(capacity, "capacity");
    if (cap < 1 || cap > kMaxCapacity) {
      throw py::value_error("capacity must be in [1, " + std::to_string(kMaxCapacity) + "], got " +
                            std::to_string(cap));
    }
    std::int64_t dev = as_int64(device, "device");
    if (dev < -1) {
      throw py::value_error("device must be -1 (current) or a device index, got " + std::to_string(dev));
    }
    if (clock != "auto" && clock != "cuda-events" && clock != "host") {
      throw py::value_error("clock must be 'auto', 'cuda-events' or 'host', got '" + clock + "'");
    }
    if (clock != "host") {
      std::string reason;
      rt_ = cuda_or_null(reason);
      if (rt_ == nullptr && clock == "cuda-events") {
        throw std::runtime_error("clock='cuda-events' is unavailable: " + reason);
      }
      reason_ = reason;
    } else {
      reason_ = "clock='host' requested";
    }
    records_.resize(static_cast<std::size_t>(cap));
    if (rt_ != nullptr) create_events(dev);
  }

  ~StreamTimer() {
    // Errors are ignored: at interpreter exit the runtime may already be shutting down.
    for (cudaEvent_t event : events_) rt_->event_destroy(event);
  }

  StreamTimer(const StreamTimer&) = delete;
  StreamTimer& operator=(const StreamTimer&) = delete;

  std::int64_t record(py::handle tag, py::handle stream) {
    Tag value = as_tag(tag);
    std::uintptr_t handle = as_stream(stream);
    std::unique_lock<std::mutex> lock = acquire();
    if (count_ == records_.size()) {
      throw std::overflow_error("StreamTimer overflow: all " + std::to_string(records_.size()) +
                                " slots hold unresolved records; "
                                "call resolve() more often or raise capacity");
    }
    Record& slot = records_[count_];
    if (rt_ != nullptr) {
      cudaError_t err = record_on_device(events_[count_], reinterpret_cast<cudaStream_t>(handle));
      if (err != kCudaSuccess) throw std::runtime_error("cudaEventRecord failed: " + rt_->describe(err));
    } else {
      slot.host = std::chrono::steady_clock::now();
    }
    slot.tag = std::move(value);
    slot.stream = handle;
    return static_cast<std::int64_t>(count_++);
  }

  py::list resolve() {
    std::vector<std::pair<Tag, double>> resolved;
    std::string error;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(mutex_);
      error = resolve_locked(resolved);
    }
    if (!error.empty()) throw std::runtime_error(error);
    py::list out(resolved.size());
    for (std::size_t i = 0; i < resolved.size(); ++i) {
      out[i] = py::make_tuple(tag_to_python(resolved[i].first), resolved[i].second);
    }
    return out;
  }

  void clear() {
    std::unique_lock<std::mutex> lock = acquire();
    count_ = 0;
  }

  std::int64_t pending() {
    std::unique_lock<std::mutex> lock = acquire();
    return static_cast<std::int64_t>(count_);
  }

  std::int64_t capacity() const { return static_cast<std::int64_t>(records_.size()); }
  std::string clock() const { return rt_ != nullptr ? "cuda-events" : "host"; }
  int device() const { return device_; }
  const std::string& reason() const { return reason_; }

 private:
  // Lock the pool; if another thread holds it (e.g. a resolve waiting on the GPU), wait without the GIL.
  std::unique_lock<std::mutex> acquire() {
    std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
    if (!lock.owns_lock()) {
      py::gil_scoped_release nogil;
      lock.lock();
    }
    return lock;
  }

  // cudaEventRecord with the events' device current (the calling thread may have another one current:
  // the legacy default stream and the event's context are those of the current device).
  cudaError_t record_on_device(cudaEvent_t event, cudaStream_t stream) {
    int current = 0;
    cudaError_t err = rt_->get_device(&current);
    if (err != kCudaSuccess) return err;
    if (current == device_) return rt_->event_record(event, stream);
    if ((err = rt_->set_device(device_)) != kCudaSuccess) return err;
    err = rt_->event_record(event, stream);
    cudaError_t restore = rt_->set_device(current);
    return err != kCudaSuccess ? err : restore;
  }

  void create_events(std::int64_t dev) {
    int current = 0;
    cudaError_t err = rt_->get_device(&current);
    if (err != kCudaSuccess) throw std::runtime_error("cudaGetDevice failed: " + rt_->describe(err));
    int target = dev < 0 ? current : static_cast<int>(dev);
    if (target >= rt_->device_count) {
      throw py::value_error("device=" + std::to_string(dev) + " out of range: " +
                            std::to_string(rt_->device_count) + " CUDA device(s)");
    }
    if (target != current && (err = rt_->set_device(target)) != kCudaSuccess) {
      throw std::runtime_error("cudaSetDevice(" + std::to_string(target) + ") failed: " + rt_->describe(err));
    }
    events_.reserve(records_.size());
    for (std::size_t i = 0; i < records_.size() && err == kCudaSuccess; ++i) {
      cudaEvent_t event = nullptr;
      err = rt_->event_create(&event, kCudaEventDefault);
      if (err == kCudaSuccess) events_.push_back(event);
    }
    if (target != current) rt_->set_device(current);
    if (err != kCudaSuccess) {
      for (cudaEvent_t event : events_) rt_->event_destroy(event);
      events_.clear();
      throw std::runtime_error("cudaEventCreateWithFlags failed: " + rt_->describe(err));
    }
    device_ = target;
  }

  // Fills `out` with (tag, ms since the first record) in record order and empties the pool. On a CUDA
  // failure the pool is emptied too and the error text is returned. Runs without the GIL.
  std::string resolve_locked(std::vector<std::pair<Tag, double>>& out) {
    std::size_t n = count_;
    count_ = 0;
    out.reserve(n);
    if (n == 0) return {};
    if (rt_ == nullptr) {
      for (std::size_t i = 0; i < n; ++i) {
        double ms = std::chrono::duration<double, std::milli>(records_[i].host - records_[0].host).count();
        out.emplace_back(std::move(records_[i].tag), ms);
      }
      return {};
    }
    // One synchronisation per stream: its last event completes after all earlier ones on that stream.
    std::vector<std::pair<std::uintptr_t, std::size_t>> last_on_stream;
    for (std::size_t i = 0; i < n; ++i) {
      bool seen = false;
      for (auto& entry : last_on_stream) {
        if (entry.first == records_[i].stream) {
          entry.second = i;
          seen = true;
        }
      }
      if (!seen) last_on_stream.emplace_back(records_[i].stream, i);
    }
    for (const auto& entry : last_on_stream) {
      cudaError_t err = rt_->event_synchronize(events_[entry.second]);
      if (err != kCudaSuccess) return "cudaEventSynchronize failed: " + rt_->describe(err);
    }
    out.emplace_back(std::move(records_[0].tag), 0.0);
    for (std::size_t i = 1; i < n; ++i) {
      float ms = 0.0f;
      cudaError_t err = rt_->event_elapsed(&ms, events_[0], events_[i]);
      if (err != kCudaSuccess) {
        out.clear();
        return "cudaEventElapsedTime failed: " + rt_->describe(err);
      }
      out.emplace_back(std::move(records_[i].tag), static_cast<double>(ms));
    }
    return {};
  }

  const CudaRuntime* rt_ = nullptr;
  std::string reason_;
  int device_ = -1;
  std::vector<cudaEvent_t> events_;
  std::vector<Record> records_;
  std::size_t count_ = 0;
  std::mutex mutex_;
};

py::dict runtime_info() {
  py::dict info;
  std::string reason;
  const CudaRuntime* rt = cuda_or_null(reason);
  info["clock"] = rt != nullptr ? "cuda-events" : "host";
  info["reason"] = reason;
  info["forced_host"] = env_flag("TFZ_TIMER_FORCE_CPU");
  if (info["forced_host"].cast<bool>()) {
    info["cudart"] = py::none();
    info["device_count"] = 0;
  } else {
    const CudaRuntime& loaded = runtime();
    info["cudart"] = loaded.path.empty() ? py::object(py::none()) : py::object(py::str(loaded.path));
    info["device_count"] = loaded.device_count;
  }
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m, py::mod_gil_not_used()) {
  m.doc() = "tfz native stream timer: pooled CUDA events resolved in one batch, host steady clock fallback.";

  py::class_<StreamTimer>(m, "StreamTimer",
                          "Pool of `capacity` timestamps: record(tag, stream) each, resolve() per batch.")
      .def(py::init<const py::object&, const std::string&, const py::object&>(), py::arg("capacity") = 4096,
           py::kw_only(), py::arg("clock") = "auto", py::arg("device") = -1,
           "Create the pool; clock is 'auto', 'cuda-events' or 'host'; device -1 means the current device.")
      .def("record", &StreamTimer::record, py::arg("tag"), py::arg("stream") = py::none(),
           "Record a timestamp for tag (str or int) on stream (int handle, None = 0, or .cuda_stream); "
           "returns its index.")
      .def("resolve", &StreamTimer::resolve,
           "Synchronise once per stream, return [(tag, ms since the first record)] in record order, "
           "empty the pool.")
      .def("clear", &StreamTimer::clear, "Drop unresolved records without synchronising.")
      .def_property_readonly("pending", &StreamTimer::pending, "Number of unresolved records.")
      .def_property_readonly("capacity", &StreamTimer::capacity, "Maximum number of unresolved records.")
      .def_property_readonly("clock", &StreamTimer::clock, "'cuda-events' or 'host'.")
      .def_property_readonly("device", &StreamTimer::device, "CUDA device of the events, -1 for host.")
      .def_property_readonly("reason", &StreamTimer::reason, "Why the host clock is used ('' for CUDA).")
      .def("__repr__", [](StreamTimer& self) {
        return "StreamTimer(capacity=" + std::to_string(self.capacity()) + ", clock='" + self.clock() +
               "', device=" + std::to_string(self.device()) +
               ", pending=" + std::to_string(self.pending()) + ")";
      });

  m.def("default_clock",
        []() {
          std::string reason;
          return std::string(cuda_or_null(reason) != nullptr ? "cuda-events" : "host");
        },
        "Clock a StreamTimer(clock='auto') uses now: 'cuda-events' or 'host'.");
  m.def("runtime_info", &runtime_info,
        "Dict with clock, reason (why host), forced_host, cudart (loaded path or None), device_count.");
}
