// tfz._row_adamw: one AdamW step over a row-major [rows, cols] float32 parameter, with tfz.optim's
// row-freezing semantics in the same pass (CPU). Rows active in no call keep weight and moments;
// active rows get the gradient scale calls / counts (rescale) and the step factor
// (calls / counts) ** step_scale where partly frozen. Equals torch's AdamW step followed by
// tfz.optim's hooks: p <- p - f * (lr * wd * p + lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)).
// Tensors are passed as data pointers; tfz/optim.py checks dtype, device and layout.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>

namespace py = pybind11;

namespace {

struct Hyper {
  float beta1, beta2, one_minus_b1, one_minus_b2, eps, bc2_sqrt;
  double lr, weight_decay, step_size;
};

// One row: the loop has no branch, so the compiler vectorises it (sqrt without errno). The operations
// and their order are those of torch's single-tensor AdamW, so with factor 1 and grad_scale 1 the
// result is bit for bit torch's (built without floating-point contraction).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))  // 8 floats a vector where the CPU has AVX2
#endif
void step_row(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
              int64_t cols, float grad_scale, float factor, const Hyper& h) {
  const float decay = static_cast<float>(1.0 - h.lr * h.weight_decay * factor);
  const float size = static_cast<float>(h.step_size * factor);
  for (int64_t j = 0; j < cols; ++j) {
    const float grad = g[j] * grad_scale;
    const float mj = m[j] + h.one_minus_b1 * (grad - m[j]);
    const float vj = h.beta2 * v[j] + h.one_minus_b2 * grad * grad;
    m[j] = mj;
    v[j] = vj;
    p[j] = p[j] * decay - size * mj / (std::sqrt(vj) / h.bc2_sqrt + h.eps);
  }
}

void row_adamw(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, int64_t rows,
               int64_t cols, uintptr_t counts, int64_t calls, bool rescale, double step_scale, double lr,
               double beta1, double beta2, double eps, double weight_decay, double step) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("row_adamw: negative shape");
  if (step < 1) throw std::invalid_argument("row_adamw: step must be >= 1 (the step after increment)");
  auto* p = reinterpret_cast<float*>(param);
  const auto* g = reinterpret_cast<const float*>(grad);
  auto* m = reinterpret_cast<float*>(exp_avg);
  auto* v = reinterpret_cast<float*>(exp_avg_sq);
  const auto* active = reinterpret_cast<const int32_t*>(counts);  // null: every row in every call
  Hyper h;
  h.beta1 = static_cast<float>(beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_b1 = static_cast<float>(1.0 - beta1);
  h.one_minus_b2 = static_cast<float>(1.0 - beta2);
  h.eps = static_cast<float>(eps);
  h.bc2_sqrt = static_cast<float>(std::pow(1.0 - std::pow(beta2, step), 0.5));
  h.lr = lr;
  h.weight_decay = weight_decay;
  h.step_size = lr / (1.0 - std::pow(beta1, step));
  for (int64_t r = 0; r < rows; ++r) {
    float grad_scale = 1.0f, factor = 1.0f;
    if (active != nullptr) {
      const int32_t c = active[r];
      if (c <= 0) continue;  // frozen in every call: untouched
      if (c < calls) {
        const double share = static_cast<double>(calls) / c;
        if (rescale) grad_scale = static_cast<float>(share);
        if (step_scale != 0.0) factor = static_cast<float>(std::pow(share, step_scale));
      }
    }
    const int64_t at = r * cols;
    step_row(p + at, g + at, m + at, v + at, cols, grad_scale, factor, h);
  }
}

}  // namespace

PYBIND11_MODULE(_row_adamw, m, py::mod_gil_not_used()) {
  m.doc() = "AdamW step with tfz.optim's row-freezing semantics in one pass (CPU, float32)";
  m.def("row_adamw", &row_adamw, py::arg("param"), py::arg("grad"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("rows"), py::arg("cols"), py::arg("counts"), py::arg("calls"),
        py::arg("rescale"), py::arg("step_scale"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
        py::call_guard<py::gil_scoped_release>(),
        "Step a [rows, cols] float32 parameter in place (data pointers; counts: int32 [rows] or 0).");
}
