// tfz.plan._sidesimplex: primal network simplex with side columns and lexicographic supplies.
//
// Problem (the dual of the freeze-ratio LP, see tfz/plan/flow.py):
//
//     min  cost @ x + scost @ mu   s.t.  A x + G mu = b1 + eps b2 + eps^2 b3,   x >= 0, mu >= 0
//
// for an infinitesimal eps > 0. A is the node-arc incidence matrix of a network (+1 at the tail, -1 at
// the head; the root node's row is dropped); each side column g_s of G has a few nonzeros on nodes
// that belong to it, at most one side column per node. Flows are triples (the coefficients of 1, eps,
// eps^2) compared lexicographically, so the final basis is optimal for every small enough eps: its
// potentials are the lexicographic optimum of the primal (minimise the b1 objective, then the b2 one).
// b3 is a perturbation chosen so that every basic variable of the current basis has a positive third
// component; no pivot is then degenerate in all three components and the simplex cannot cycle.
//
// Basis: K basic side columns and a forest of N - 1 - K arcs with K + 1 trees; the tree holding node
// 0 is tree 0. Potentials are pi = pi_rel + theta[tree]: pi_rel makes every forest arc's reduced cost
// 0 and the K tree offsets theta (theta[0] = 0) make the basic side columns' reduced costs 0, a K x K
// system with matrix Q[j, i] = sum of g_{side i} over tree j. Flows solve Q mu = tree sums of b and
// then subtree sums of b - G mu.
//
// A pivot whose entering arc joins two nodes of one tree leaves the side columns unchanged and costs
// O(cycle + moved subtree), as in a plain network simplex. Any other pivot changes mu and with it
// flows on arcs anywhere; its direction takes one pass over a topological order of the forest that is
// kept valid by appending moved subtrees (rebuilt when the holes reach a quarter of it).
//
// Plain C++17 and pybind11: no torch, no CUDA. The solve runs without the GIL.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using i64 = std::int64_t;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr i64 kNone = -(i64{1} << 40);

enum Status : int {
  kOptimal = 0,
  kUnbounded = 1,
  kIterationLimit = 2,
  kInfeasibleStart = 3,
  kSingular = 4,
  kInfeasibleFlows = 5,
  kInconsistentForest = 6,
  kInvalidBasis = 7,
};
// What a pivot hands back besides a status: it was made, or it must be retried after a refresh.
constexpr int kDone = -1;
constexpr int kRetry = -2;

// Statistics, in this order in the stats array handed back to Python.
enum Stat : int {
  kPivots = 0,
  kSidePivots = 1,
  kRefreshes = 2,
  kBasicSides = 3,
  kTouched = 4,
  kPriced = 5,
  kDegenerate = 6,
  kSwapped = 7,
  kNumStats = 8,
};

struct Triple {
  double v[3] = {0.0, 0.0, 0.0};
};

// Lexicographic step (r1, r2, r3) at which a value (v1, v2, v3) falling at rate dd > 0 hits 0;
// components within the tolerances f1, f2 of 0 count as 0 (and clamp what follows).
inline Triple ratio(const double* v, double dd, double f1, double f2) {
  Triple r;
  if (v[0] > f1) {
    r.v[0] = v[0] / dd;
    r.v[1] = v[1] / dd;
    r.v[2] = v[2] / dd;
  } else if (v[1] > f2) {
    r.v[1] = v[1] / dd;
    r.v[2] = v[2] / dd;
  } else {
    r.v[2] = std::max(v[2], 0.0) / dd;
  }
  return r;
}

// -1, 0, 1: a below, within a relative 1e-11 of, or above b (steps are >= 0).
inline int cmp(double a, double b) {
  if (b == kInf) return a < b ? -1 : 0;
  const double e = 1e-11 * std::max(a, b);
  if (a < b - e) return -1;
  if (a > b + e) return 1;
  return 0;
}

// Lexicographic comparison of two steps; near-ties in a component defer to the next one, so that of
// two values reaching 0 together the one that stays lexicographically >= 0 remains.
inline int lex_cmp(const Triple& a, const Triple& b) {
  for (int q = 0; q < 3; ++q) {
    const int c = cmp(a.v[q], b.v[q]);
    if (c != 0) return c;
  }
  return 0;
}

inline bool lex_negative(const double* v, double f1, double f2) {
  return v[0] < -f1 || (v[0] <= f1 && v[1] < -f2);
}

// Dense K x K inverse by Gauss-Jordan with partial pivoting; false when (numerically) singular.
bool invert(int K, const std::vector<double>& A, std::vector<double>& inv) {
  std::vector<double> M(A.begin(), A.begin() + static_cast<size_t>(K) * K);
  inv.assign(static_cast<size_t>(K) * K, 0.0);
  for (int i = 0; i < K; ++i) inv[static_cast<size_t>(i) * K + i] = 1.0;
  for (int c = 0; c < K; ++c) {
    int p = c;
    double best = std::abs(M[static_cast<size_t>(c) * K + c]);
    for (int r = c + 1; r < K; ++r) {
      const double v = std::abs(M[static_cast<size_t>(r) * K + c]);
      if (v > best) best = v, p = r;
    }
    if (!(best > 0.0) || !std::isfinite(best)) return false;
    if (p != c) {
      for (int j = 0; j < K; ++j) {
        std::swap(M[static_cast<size_t>(p) * K + j], M[static_cast<size_t>(c) * K + j]);
        std::swap(inv[static_cast<size_t>(p) * K + j], inv[static_cast<size_t>(c) * K + j]);
      }
    }
    const double d = M[static_cast<size_t>(c) * K + c];
    for (int j = 0; j < K; ++j) {
      M[static_cast<size_t>(c) * K + j] /= d;
      inv[static_cast<size_t>(c) * K + j] /= d;
    }
    for (int r = 0; r < K; ++r) {
      if (r == c) continue;
      const double f = M[static_cast<size_t>(r) * K + c];
      if (f == 0.0) continue;
      for (int j = 0; j < K; ++j) {
        M[static_cast<size_t>(r) * K + j] -= f * M[static_cast<size_t>(c) * K + j];
        inv[static_cast<size_t>(r) * K + j] -= f * inv[static_cast<size_t>(c) * K + j];
      }
    }
  }
  for (double v : inv) {
    if (!(std::abs(v) < 1e12)) return false;
  }
  return true;
}

// Everything the solver reads; arrays are owned by the Python caller and outlive the call.
struct Input {
  i64 m = 0, N = 0, S = 0, m_price = 0;
  const i64* tail = nullptr;
  const i64* head = nullptr;
  const double* cost = nullptr;
  const i64* partner = nullptr;
  const i64* sptr = nullptr;
  const i64* snode = nullptr;
  const double* scoef = nullptr;
  const double* snorm = nullptr;
  const double* scost = nullptr;
  const double* salt = nullptr;
  const i64* node_side = nullptr;
  const double* node_coef = nullptr;
  const double* b = nullptr;  // [N, 2]: b1, b2
  bool price_sides = true;
  double rc_tol = 0.0, f1 = 0.0, f2 = 0.0;
  i64 max_side_entries = 16, max_iter = 0, block = 64;
};

// The basis (updated in place) and the solution.
struct Output {
  i64* parent = nullptr;
  i64* pred = nullptr;
  bool* side_basic = nullptr;
  bool* side_flip = nullptr;
  double* X = nullptr;   // [m, 3]
  double* MU = nullptr;  // [S, 3]
  double* pi = nullptr;  // [N]
  i64* stats = nullptr;  // [kNumStats]
};

class SideSimplex {
 public:
  SideSimplex(const Input& in, Output& out)
      : in_(in),
        out_(out),
        m_(in.m),
        N_(in.N),
        S_(in.S),
        tail_(in.tail),
        head_(in.head),
        cost_(in.cost),
        parent_(out.parent),
        pred_(out.pred),
        X_(out.X),
        MU_(out.MU),
        stats_(out.stats) {}

  int run();

 private:
  // ---- forest helpers
  void link(i64 u, i64 p) {
    const i64 f = first_child_[p];
    next_sib_[u] = f;
    prev_sib_[u] = -1;
    if (f >= 0) prev_sib_[f] = u;
    first_child_[p] = u;
  }
  void unlink(i64 u, i64 p) {
    const i64 a = prev_sib_[u], b = next_sib_[u];
    if (a >= 0)
      next_sib_[a] = b;
    else
      first_child_[p] = b;
    if (b >= 0) prev_sib_[b] = a;
  }
  // Preorder of the subtree of r into out (from offset); returns its size.
  i64 collect(i64 r, i64* out) {
    i64 top = 1, cnt = 0;
    stack_[0] = r;
    while (top > 0) {
      const i64 u = stack_[--top];
      out[cnt++] = u;
      for (i64 c = first_child_[u]; c >= 0; c = next_sib_[c]) stack_[top++] = c;
    }
    return cnt;
  }
  void rebuild_order();
  void append(i64 cnt);
  void flip_side(i64 s);
  bool compact();
  void perturb();
  bool setup();
  int refresh();
  void solve_theta();
  i64 price();
  int pivot_in_tree(i64 enter);
  int pivot_through_sides(i64 enter);
  double X(i64 a, int q) const { return X_[3 * a + q]; }

  const Input& in_;
  Output& out_;
  const i64 m_, N_, S_;
  const i64* tail_;
  const i64* head_;
  const double* cost_;
  i64* parent_;
  i64* pred_;
  double* X_;
  double* MU_;
  i64* stats_;

  // local copies of the side-column data (negation swaps them)
  std::vector<double> scoef_, scost_, salt_, node_coef_, b_;
  // forest
  std::vector<i64> first_child_, next_sib_, prev_sib_, depth_, tid_, stack_, buf_;
  std::vector<char> up_, in_tree_;
  std::vector<double> pi_rel_;
  // tree slots
  std::vector<i64> slot_size_, free_slots_, slots_, slot_pos_, basic_, side_pos_;
  i64 n_free_ = 0, K_ = 0;
  std::vector<char> sflip_;
  // topological order with per-position parent position, arc and direction
  i64 cap_ord_ = 0, ord_len_ = 0;
  bool order_valid_ = true;
  std::vector<i64> order_, pos_, ppar_, parc_;
  std::vector<char> pup_;
  // side-column matrices
  std::vector<double> Qfull_, Q_, Qinv_, c0_, theta_, agg_, dmu_, vec_, dpos_;
  // iteration state
  i64 it_ = 0, since_opt_ = 0, flip_rounds_ = 0, next_arc_ = 0;
  bool reperturb_ = false, perturbed_ = false, fresh_ = false, need_refresh_ = true;
};

void SideSimplex::rebuild_order() {
  i64 n = collect(0, order_.data());
  for (i64 r = 1; r < N_; ++r) {
    if (parent_[r] < 0) n += collect(r, order_.data() + n);
  }
  for (i64 i = 0; i < n; ++i) pos_[order_[i]] = i;
  for (i64 i = 0; i < n; ++i) {
    const i64 u = order_[i], p = parent_[u];
    ppar_[i] = p >= 0 ? pos_[p] : -1;
    parc_[i] = pred_[u];
    pup_[i] = up_[u];
  }
  ord_len_ = n;
  order_valid_ = true;
}

// Move the nodes buf[:cnt] (a re-hung subtree in preorder) to the end of the order.
void SideSimplex::append(i64 cnt) {
  if (ord_len_ + cnt > cap_ord_) {
    rebuild_order();
    return;
  }
  for (i64 idx = 0; idx < cnt; ++idx) {
    const i64 u = buf_[idx];
    order_[pos_[u]] = -1;
    ppar_[pos_[u]] = -1;
    order_[ord_len_] = u;
    pos_[u] = ord_len_;
    const i64 p = parent_[u];
    ppar_[ord_len_] = p >= 0 ? pos_[p] : -1;
    parc_[ord_len_] = pred_[u];
    pup_[ord_len_] = up_[u];
    ++ord_len_;
  }
}

// Swap side column s for its negation (cost salt[s]) or back.
void SideSimplex::flip_side(i64 s) {
  for (i64 e = in_.sptr[s]; e < in_.sptr[s + 1]; ++e) {
    scoef_[e] = -scoef_[e];
    node_coef_[in_.snode[e]] = -node_coef_[in_.snode[e]];
  }
  for (i64 j = 0; j < S_ + 2; ++j) Qfull_[j * S_ + s] = -Qfull_[j * S_ + s];
  c0_[s] = -c0_[s];
  std::swap(scost_[s], salt_[s]);
  for (int q = 0; q < 3; ++q) MU_[3 * s + q] = -MU_[3 * s + q];
  sflip_[s] = !sflip_[s];
}

// Q[j, i] = Qfull[slots[j], basic[i]] (K x K) and its inverse; false when singular.
bool SideSimplex::compact() {
  const i64 K = K_;
  Q_.assign(static_cast<size_t>(K * K), 0.0);
  for (i64 j = 0; j < K; ++j)
    for (i64 i = 0; i < K; ++i) Q_[j * K + i] = Qfull_[slots_[j] * S_ + basic_[i]];
  if (K == 0) {
    Qinv_.clear();
    return true;
  }
  return invert(static_cast<int>(K), Q_, Qinv_);
}

// b3 = B x3 for x3 in [1, 2) on every basic arc and side column (a fixed pattern).
void SideSimplex::perturb() {
  for (i64 u = 0; u < N_; ++u) b_[3 * u + 2] = 0.0;
  for (i64 u = 0; u < N_; ++u) {
    if (parent_[u] >= 0) {
      const i64 a = pred_[u];
      const double v = 1.0 + std::fmod(static_cast<double>(a) * 0.6180339887498949, 1.0);
      b_[3 * tail_[a] + 2] += v;
      b_[3 * head_[a] + 2] -= v;
    }
  }
  for (i64 s = 0; s < S_; ++s) {
    if (side_pos_[s] >= 0) {
      const double v = 1.0 + std::fmod(static_cast<double>(s) * 0.7548776662466927, 1.0);
      for (i64 e = in_.sptr[s]; e < in_.sptr[s + 1]; ++e) b_[3 * in_.snode[e] + 2] += v * scoef_[e];
    }
  }
}

// Structures of the start basis; false when it is not a valid basis.
bool SideSimplex::setup() {
  const i64 N = N_, S = S_;
  scoef_.assign(in_.scoef, in_.scoef + in_.sptr[S]);
  scost_.assign(in_.scost, in_.scost + S);
  salt_.assign(in_.salt, in_.salt + S);
  node_coef_.assign(in_.node_coef, in_.node_coef + N);
  b_.assign(static_cast<size_t>(3 * N), 0.0);
  for (i64 u = 0; u < N; ++u) {
    b_[3 * u] = in_.b[2 * u];
    b_[3 * u + 1] = in_.b[2 * u + 1];
  }
  first_child_.assign(N, -1);
  next_sib_.assign(N, -1);
  prev_sib_.assign(N, -1);
  up_.assign(N, 0);
  in_tree_.assign(m_, 0);
  depth_.assign(N, 0);
  tid_.assign(N, 0);
  pi_rel_.assign(N, 0.0);
  stack_.assign(N, 0);
  buf_.assign(N, 0);
  if (parent_[0] >= 0) return false;
  for (i64 u = 0; u < N; ++u) {
    if (parent_[u] < 0) continue;
    const i64 a = pred_[u], p = parent_[u];
    if (p >= N || a < 0 || a >= m_ || in_tree_[a] ||
        !((tail_[a] == u && head_[a] == p) || (head_[a] == u && tail_[a] == p)))
      return false;
    link(u, p);
    in_tree_[a] = 1;
    up_[u] = tail_[a] == u;
  }
  // tree slots: 0 is the root tree, 1 .. S + 1 the others (a pivot may cut before it links)
  slot_size_.assign(S + 2, 0);
  free_slots_.assign(S + 2, 0);
  n_free_ = 0;
  i64 seen = 0, nslot = 1;
  for (i64 r = 0; r < N; ++r) {
    if (parent_[r] >= 0) continue;
    i64 slot = 0;
    if (r != 0) {
      if (nslot > S) return false;
      slot = nslot++;
    }
    const i64 cnt = collect(r, buf_.data());
    seen += cnt;
    slot_size_[slot] = cnt;
    for (i64 idx = 0; idx < cnt; ++idx) {
      const i64 u = buf_[idx];
      tid_[u] = slot;
      if (u == r) continue;
      const i64 p = parent_[u], a = pred_[u];
      depth_[u] = depth_[p] + 1;
      pi_rel_[u] = up_[u] ? cost_[a] + pi_rel_[p] : pi_rel_[p] - cost_[a];
    }
  }
  if (seen != N) return false;  // a cycle in the parent pointers
  for (i64 s = nslot; s < S + 2; ++s) free_slots_[n_free_++] = s;
  cap_ord_ = N + std::max<i64>(N / 4, 1024);
  order_.assign(cap_ord_, -1);
  pos_.assign(N, -1);
  ppar_.assign(cap_ord_, -1);
  parc_.assign(cap_ord_, -1);
  pup_.assign(cap_ord_, 0);
  rebuild_order();
  slots_.assign(S + 2, 0);
  slot_pos_.assign(S + 2, -1);
  K_ = 0;
  for (i64 s = 1; s < nslot; ++s) {
    slots_[K_] = s;
    slot_pos_[s] = K_++;
  }
  basic_.assign(S + 2, 0);
  side_pos_.assign(S, -1);
  i64 nb = 0;
  for (i64 s = 0; s < S; ++s) {
    if (out_.side_basic[s]) {
      basic_[nb] = s;
      side_pos_[s] = nb++;
    }
  }
  if (nb != K_) return false;
  Qfull_.assign(static_cast<size_t>((S + 2) * std::max<i64>(S, 1)), 0.0);
  c0_.assign(S, 0.0);
  for (i64 u = 0; u < N; ++u) {
    const i64 s = in_.node_side[u];
    if (s >= 0) {
      Qfull_[tid_[u] * S + s] += node_coef_[u];
      c0_[s] += node_coef_[u] * pi_rel_[u];
    }
  }
  sflip_.assign(S, 0);
  for (i64 s = 0; s < S; ++s) {
    if (out_.side_flip[s]) {
      if (!out_.side_basic[s]) return false;
      flip_side(s);
    }
  }
  theta_.assign(S + 2, 0.0);
  vec_.assign(static_cast<size_t>(3 * N), 0.0);
  dpos_.assign(cap_ord_, 0.0);
  agg_.assign(static_cast<size_t>(3 * (S + 2)), 0.0);
  dmu_.assign(S + 2, 0.0);
  return true;
}

// Flows and potentials from scratch: tree sums, mu = Q^-1 agg, subtree sums of b - G mu. A forest arc
// or side column whose value is negative is swapped for its partner (warm starts). Returns -1 to go
// on, 0 when fresh, or a status.
int SideSimplex::refresh() {
  const i64 N = N_, K = K_;
  stats_[kRefreshes] += 1;
  if (reperturb_) {
    perturb();
    reperturb_ = false;
    perturbed_ = true;
  }
  if (!order_valid_) rebuild_order();
  vec_ = b_;
  std::fill(agg_.begin(), agg_.end(), 0.0);
  for (i64 u = 0; u < N; ++u) {
    const i64 t = tid_[u];
    if (t > 0)
      for (int q = 0; q < 3; ++q) agg_[3 * slot_pos_[t] + q] += b_[3 * u + q];
  }
  std::fill(MU_, MU_ + 3 * S_, 0.0);
  for (i64 i = 0; i < K; ++i) {
    const i64 s = basic_[i];
    for (int q = 0; q < 3; ++q) {
      double acc = 0.0;
      for (i64 j = 0; j < K; ++j) acc += Qinv_[i * K + j] * agg_[3 * j + q];
      MU_[3 * s + q] = acc;
      for (i64 e = in_.sptr[s]; e < in_.sptr[s + 1]; ++e) vec_[3 * in_.snode[e] + q] -= acc * scoef_[e];
    }
  }
  std::fill(X_, X_ + 3 * m_, 0.0);
  for (i64 p = ord_len_ - 1; p >= 0; --p) {
    const i64 u = order_[p];
    if (u < 0 || parent_[u] < 0) continue;
    const i64 par = parent_[u], a = pred_[u];
    const double sg = up_[u] ? 1.0 : -1.0;
    for (int q = 0; q < 3; ++q) {
      vec_[3 * par + q] += vec_[3 * u + q];
      X_[3 * a + q] = sg * vec_[3 * u + q];
    }
  }
  std::fill(c0_.begin(), c0_.end(), 0.0);
  for (i64 p = 0; p < ord_len_; ++p) {
    const i64 u = order_[p];
    if (u < 0) continue;
    const i64 par = parent_[u];
    if (par < 0) {
      pi_rel_[u] = 0.0;
    } else {
      const i64 a = pred_[u];
      pi_rel_[u] = up_[u] ? cost_[a] + pi_rel_[par] : pi_rel_[par] - cost_[a];
    }
    const i64 s = in_.node_side[u];
    if (s >= 0) c0_[s] += node_coef_[u] * pi_rel_[u];
  }
  // feasibility of the refreshed flows: a forest arc or side column with a negative value is
  // swapped for its partner (same position in the basis, value negated)
  bool infeas = false;
  i64 nflip = 0;
  const double f1 = in_.f1, f2 = in_.f2;
  for (i64 u = 0; u < N; ++u) {
    if (parent_[u] < 0) continue;
    const i64 a = pred_[u];
    if (!lex_negative(&X_[3 * a], f1, f2)) continue;
    const i64 c = in_.partner[a];
    if (c < 0 || flip_rounds_ >= 3) {
      infeas = true;
      continue;
    }
    in_tree_[a] = 0;
    in_tree_[c] = 1;
    pred_[u] = c;
    up_[u] = !up_[u];
    for (int q = 0; q < 3; ++q) {
      X_[3 * c + q] = -X_[3 * a + q];
      X_[3 * a + q] = 0.0;
    }
    parc_[pos_[u]] = c;
    pup_[pos_[u]] = up_[u];
    ++nflip;
  }
  for (i64 i = 0; i < K; ++i) {
    const i64 s = basic_[i];
    if (!lex_negative(&MU_[3 * s], f1, f2)) continue;
    if (sflip_[s] || flip_rounds_ >= 3) {
      infeas = true;
      continue;
    }
    flip_side(s);
    ++nflip;
  }
  if (infeas) return it_ == 0 ? kInfeasibleStart : kInfeasibleFlows;
  if (nflip > 0) {
    // new basis: new potentials, and a perturbation that is positive on it again
    stats_[kSwapped] += nflip;
    ++flip_rounds_;
    if (!compact()) return kSingular;
    perturb();
    return -1;
  }
  need_refresh_ = false;
  fresh_ = true;
  return 0;
}

// theta: Q^T theta = scost - c0 over the basic side columns.
void SideSimplex::solve_theta() {
  const i64 K = K_;
  for (i64 j = 0; j < K; ++j) {
    double acc = 0.0;
    for (i64 i = 0; i < K; ++i) {
      const i64 s = basic_[i];
      acc += Qinv_[i * K + j] * (scost_[s] - c0_[s]);
    }
    theta_[slots_[j]] = acc;
  }
  theta_[0] = 0.0;
}

// Side columns (reduced cost over their norm) compete with a block of arcs, but at most
// max_side_entries of them enter between two points where no arc can. Returns the entering arc, m +
// the entering side column, or -1.
i64 SideSimplex::price() {
  const i64 m = m_, K = K_;
  i64 enter = -1;
  double best = -in_.rc_tol;
  auto price_sides = [&]() {
    for (i64 s = 0; s < S_; ++s) {
      if (side_pos_[s] >= 0) continue;
      double rc = scost_[s] - c0_[s];
      for (i64 j = 0; j < K; ++j) rc -= Qfull_[slots_[j] * S_ + s] * theta_[slots_[j]];
      rc /= in_.snorm[s];
      if (rc < best) best = rc, enter = m + s;
    }
  };
  if (in_.price_sides && since_opt_ < in_.max_side_entries) price_sides();
  i64 a = next_arc_, cnt = 0, checked = 0;
  const i64 mp = in_.m_price;
  while (checked < mp) {
    if (!in_tree_[a]) {
      const i64 t = tail_[a], h = head_[a];
      const double rc = cost_[a] - pi_rel_[t] - theta_[tid_[t]] + pi_rel_[h] + theta_[tid_[h]];
      if (rc < best) best = rc, enter = a;
    }
    if (++a == mp) a = 0;
    ++checked;
    if (++cnt == in_.block) {
      if (enter >= 0) break;
      cnt = 0;
    }
  }
  if (in_.price_sides && enter < 0) {
    since_opt_ = 0;
    price_sides();
  }
  next_arc_ = a;
  stats_[kPriced] += checked;
  if (enter >= m) ++since_opt_;
  return enter;
}

// A pivot inside one tree: the cycle of the entering arc.
int SideSimplex::pivot_in_tree(i64 enter) {
  const double f1 = in_.f1, f2 = in_.f2;
  const i64 first = tail_[enter], second = head_[enter];
  i64 u = first, v = second;
  while (u != v) {
    if (depth_[u] > depth_[v]) {
      u = parent_[u];
    } else if (depth_[v] > depth_[u]) {
      v = parent_[v];
    } else {
      u = parent_[u];
      v = parent_[v];
    }
  }
  const i64 join = u;
  Triple t;
  t.v[0] = t.v[1] = t.v[2] = kInf;
  i64 u_out = -1;
  bool side_first = true;
  // flow decreases on arcs against the cycle (entering arc: first -> second)
  for (u = first; u != join; u = parent_[u]) {
    if (up_[u]) {
      const Triple r = ratio(&X_[3 * pred_[u]], 1.0, f1, f2);
      if (lex_cmp(r, t) < 0) t = r, u_out = u, side_first = true;
    }
  }
  for (u = second; u != join; u = parent_[u]) {
    if (!up_[u]) {
      const Triple r = ratio(&X_[3 * pred_[u]], 1.0, f1, f2);
      if (lex_cmp(r, t) <= 0) t = r, u_out = u, side_first = false;
    }
  }
  if (u_out < 0) return kUnbounded;
  if (t.v[0] == 0.0 && t.v[1] == 0.0) {
    stats_[kDegenerate] += 1;
    if (t.v[2] == 0.0 && !perturbed_) {
      // a value within the tolerances of 0 with a negative third component: renew the
      // perturbation on the current basis instead of a fully degenerate pivot
      need_refresh_ = true;
      reperturb_ = true;
      return kRetry;
    }
  }
  perturbed_ = false;
  for (int q = 0; q < 3; ++q) X_[3 * enter + q] += t.v[q];
  for (u = first; u != join; u = parent_[u]) {
    const double sg = up_[u] ? -1.0 : 1.0;
    for (int q = 0; q < 3; ++q) X_[3 * pred_[u] + q] += sg * t.v[q];
  }
  for (u = second; u != join; u = parent_[u]) {
    const double sg = up_[u] ? 1.0 : -1.0;
    for (int q = 0; q < 3; ++q) X_[3 * pred_[u] + q] += sg * t.v[q];
  }
  const i64 u_in = side_first ? first : second;
  const i64 v_in = side_first ? second : first;
  const i64 leave = pred_[u_out];
  in_tree_[leave] = 0;
  in_tree_[enter] = 1;
  for (int q = 0; q < 3; ++q) X_[3 * leave + q] = 0.0;
  const double sigma = tail_[enter] == u_in ? cost_[enter] + pi_rel_[head_[enter]] - pi_rel_[u_in]
                                            : pi_rel_[tail_[enter]] - cost_[enter] - pi_rel_[u_in];
  // re-hang the stem u_in .. u_out below v_in, reversing it
  i64 new_par = v_in, new_pred = enter;
  bool new_up = tail_[enter] == u_in;
  u = u_in;
  while (true) {
    const i64 old_par = parent_[u], old_pred = pred_[u];
    const bool old_up = up_[u];
    unlink(u, old_par);
    parent_[u] = new_par;
    pred_[u] = new_pred;
    up_[u] = new_up;
    link(u, new_par);
    if (u == u_out) break;
    new_par = u;
    new_pred = old_pred;
    new_up = !old_up;
    u = old_par;
  }
  const i64 cnt = collect(u_in, buf_.data());
  for (i64 idx = 0; idx < cnt; ++idx) {
    const i64 z = buf_[idx];
    depth_[z] = depth_[parent_[z]] + 1;
    pi_rel_[z] += sigma;
    const i64 s = in_.node_side[z];
    if (s >= 0) c0_[s] += node_coef_[z] * sigma;
  }
  if (!(in_.price_sides || K_ > 0))
    order_valid_ = false;  // no pivot will need it before the next refresh
  else
    append(cnt);
  return kDone;
}

// A pivot through the side columns: the direction needs one pass over the forest.
int SideSimplex::pivot_through_sides(i64 enter) {
  const double f1 = in_.f1, f2 = in_.f2;
  const i64 m = m_;
  stats_[kSidePivots] += 1;
  if (!order_valid_) rebuild_order();
  i64 K = K_;
  for (i64 j = 0; j < K; ++j) agg_[3 * j] = 0.0;
  if (enter < m) {
    i64 t = tid_[tail_[enter]];
    if (t > 0) agg_[3 * slot_pos_[t]] += 1.0;
    t = tid_[head_[enter]];
    if (t > 0) agg_[3 * slot_pos_[t]] -= 1.0;
    dpos_[pos_[tail_[enter]]] -= 1.0;
    dpos_[pos_[head_[enter]]] += 1.0;
  } else {
    const i64 s = enter - m;
    for (i64 e = in_.sptr[s]; e < in_.sptr[s + 1]; ++e) {
      const i64 t = tid_[in_.snode[e]];
      if (t > 0) agg_[3 * slot_pos_[t]] += scoef_[e];
      dpos_[pos_[in_.snode[e]]] -= scoef_[e];
    }
  }
  for (i64 i = 0; i < K; ++i) {
    double acc = 0.0;
    for (i64 j = 0; j < K; ++j) acc -= Qinv_[i * K + j] * agg_[3 * j];
    dmu_[i] = acc;
    if (acc != 0.0) {
      const i64 s = basic_[i];
      for (i64 e = in_.sptr[s]; e < in_.sptr[s + 1]; ++e) dpos_[pos_[in_.snode[e]]] -= acc * scoef_[e];
    }
  }
  // subtree sums in reverse topological order, fused with the ratio test
  Triple t;
  t.v[0] = t.v[1] = t.v[2] = kInf;
  i64 leave_node = kNone;
  double leave_d = 0.0;
  i64 nnz = 0;
  for (i64 p = ord_len_ - 1; p >= 0; --p) {
    double d = dpos_[p];
    if (d == 0.0) continue;
    buf_[nnz++] = p;
    const i64 qq = ppar_[p];
    if (qq < 0) continue;
    dpos_[qq] += d;
    if (pup_[p]) d = -d;
    if (d > 1e-7) {  // the arc's flow falls at rate d
      const i64 a = parc_[p];
      if (t.v[0] == 0.0 && (X_[3 * a] > f1 || (t.v[1] == 0.0 && X_[3 * a + 1] > f2)))
        continue;  // cannot beat a step that is already 0 in those components
      const Triple r = ratio(&X_[3 * a], d, f1, f2);
      const int c = lex_cmp(r, t);
      if (c < 0 || (c == 0 && d > leave_d)) t = r, leave_node = order_[p], leave_d = d;
    }
  }
  for (i64 i = 0; i < K; ++i) {
    const double d = -dmu_[i];
    if (d > 1e-7) {
      const Triple r = ratio(&MU_[3 * basic_[i]], d, f1, f2);
      const int c = lex_cmp(r, t);
      if (c < 0 || (c == 0 && d > leave_d)) t = r, leave_node = -(i + 1), leave_d = d;
    }
  }
  if (leave_node == kNone) {
    for (i64 idx = 0; idx < nnz; ++idx) dpos_[buf_[idx]] = 0.0;
    return kUnbounded;
  }
  if (t.v[0] == 0.0 && t.v[1] == 0.0) {
    stats_[kDegenerate] += 1;
    if (t.v[2] == 0.0 && !perturbed_) {
      for (i64 idx = 0; idx < nnz; ++idx) dpos_[buf_[idx]] = 0.0;
      stats_[kSidePivots] -= 1;
      need_refresh_ = true;
      reperturb_ = true;
      return kRetry;
    }
  }
  perturbed_ = false;
  stats_[kTouched] += nnz;
  // apply the step to the arcs with a nonzero direction
  for (i64 idx = 0; idx < nnz; ++idx) {
    const i64 p = buf_[idx];
    double d = dpos_[p];
    dpos_[p] = 0.0;
    if (ppar_[p] < 0) continue;
    const i64 a = parc_[p];
    if (!pup_[p]) d = -d;
    for (int q = 0; q < 3; ++q) X_[3 * a + q] += t.v[q] * d;
  }
  for (i64 i = 0; i < K; ++i) {
    const i64 s = basic_[i];
    for (int q = 0; q < 3; ++q) MU_[3 * s + q] += t.v[q] * dmu_[i];
  }
  i64 s_in = -1;
  if (enter < m) {
    for (int q = 0; q < 3; ++q) X_[3 * enter + q] = t.v[q];
  } else {
    s_in = enter - m;
    for (int q = 0; q < 3; ++q) MU_[3 * s_in + q] = t.v[q];
  }
  // ---- basis change
  if (leave_node >= 0) {
    // cut the arc above leave_node: its subtree becomes a new tree
    const i64 u = leave_node, a = pred_[u];
    for (int q = 0; q < 3; ++q) X_[3 * a + q] = 0.0;
    in_tree_[a] = 0;
    const i64 old = tid_[u];
    unlink(u, parent_[u]);
    parent_[u] = -1;
    pred_[u] = -1;
    ppar_[pos_[u]] = -1;
    const i64 ns = free_slots_[--n_free_];
    const i64 cnt = collect(u, buf_.data());
    slot_size_[ns] = cnt;
    slot_size_[old] -= cnt;
    for (i64 idx = 0; idx < cnt; ++idx) {
      const i64 z = buf_[idx];
      tid_[z] = ns;
      const i64 s = in_.node_side[z];
      if (s >= 0) {
        Qfull_[old * S_ + s] -= node_coef_[z];
        Qfull_[ns * S_ + s] += node_coef_[z];
      }
    }
    slots_[K] = ns;
    slot_pos_[ns] = K;
    if (s_in >= 0) {
      basic_[K] = s_in;
      side_pos_[s_in] = K;
    }
    K_ = ++K;
  } else {
    // a side column leaves: the entering one takes its place, or the last one does
    const i64 i = -leave_node - 1, s_out = basic_[i];
    for (int q = 0; q < 3; ++q) MU_[3 * s_out + q] = 0.0;
    side_pos_[s_out] = -1;
    if (sflip_[s_out]) flip_side(s_out);
    if (s_in >= 0) {
      basic_[i] = s_in;
      side_pos_[s_in] = i;
    } else {
      const i64 last = basic_[K - 1];
      basic_[i] = last;
      if (last != s_out) side_pos_[last] = i;
    }
  }
  if (enter < m) {
    // link the entering arc: reroot the smaller of its trees (never the root tree) at its endpoint
    // and hang it below the other endpoint; it takes the place of that tree
    const i64 x = tail_[enter], y = head_[enter], tx = tid_[x], ty = tid_[y];
    if (tx == ty) return kInconsistentForest;
    i64 z, w, tz;
    if (ty == 0 || (tx != 0 && slot_size_[tx] <= slot_size_[ty]))
      z = x, w = y, tz = tx;
    else
      z = y, w = x, tz = ty;
    i64 u = z, np_ = w, npred = enter;
    while (u >= 0) {
      const i64 p = parent_[u], a = pred_[u];
      if (p >= 0) unlink(u, p);
      parent_[u] = np_;
      pred_[u] = npred;
      up_[u] = tail_[npred] == u;
      link(u, np_);
      np_ = u;
      npred = a;
      u = p;
    }
    in_tree_[enter] = 1;
    const double sigma = up_[z] ? cost_[enter] + pi_rel_[w] - pi_rel_[z] : pi_rel_[w] - cost_[enter] - pi_rel_[z];
    const i64 tw = tid_[w];
    const i64 cnt = collect(z, buf_.data());
    append(cnt);
    for (i64 idx = 0; idx < cnt; ++idx) {
      const i64 v = buf_[idx];
      depth_[v] = depth_[parent_[v]] + 1;
      pi_rel_[v] += sigma;
      tid_[v] = tw;
      const i64 s = in_.node_side[v];
      if (s >= 0) {
        c0_[s] += node_coef_[v] * sigma;
        Qfull_[tz * S_ + s] -= node_coef_[v];
        Qfull_[tw * S_ + s] += node_coef_[v];
      }
    }
    slot_size_[tw] += cnt;
    slot_size_[tz] = 0;
    const i64 j = slot_pos_[tz];
    K_ = --K;
    slots_[j] = slots_[K];
    slot_pos_[slots_[j]] = j;
    slot_pos_[tz] = -1;
    free_slots_[n_free_++] = tz;
  }
  if (!compact()) return kSingular;
  return kDone;
}

int SideSimplex::run() {
  if (!setup()) return kInvalidBasis;
  if (!compact()) return kSingular;
  perturb();
  int status = -1;
  while (true) {
    if (need_refresh_) {
      const int r = refresh();
      if (r > 0) {
        status = r;
        break;
      }
      if (r < 0) continue;
    }
    solve_theta();
    if (it_ >= in_.max_iter) break;
    const i64 enter = price();
    if (enter < 0) {
      if (fresh_) break;
      need_refresh_ = true;
      continue;
    }
    fresh_ = false;
    flip_rounds_ = 0;
    ++it_;
    stats_[kPivots] += 1;
    const bool in_tree = enter < m_ && tid_[tail_[enter]] == tid_[head_[enter]];
    const int r = in_tree ? pivot_in_tree(enter) : pivot_through_sides(enter);
    if (r == kRetry) {
      --it_;
      stats_[kPivots] -= 1;
      continue;
    }
    if (r != kDone) {
      status = r;
      break;
    }
  }
  // potentials and the basic side columns (also after a failure: the basis is valid)
  if (status < 0) status = it_ < in_.max_iter ? kOptimal : kIterationLimit;
  for (i64 u = 0; u < N_; ++u) out_.pi[u] = pi_rel_[u] + theta_[tid_[u]];
  for (i64 s = 0; s < S_; ++s) {
    out_.side_basic[s] = side_pos_[s] >= 0;
    out_.side_flip[s] = sflip_[s];
  }
  stats_[kBasicSides] = K_;
  return status;
}

// ---- Python bindings

template <typename T>
using Arr = py::array_t<T, py::array::c_style>;

template <typename T>
const T* in_ptr(const py::array& a, i64 size, const char* name) {
  if (!py::isinstance<Arr<T>>(a) || !(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": wrong dtype or not contiguous");
  if (a.size() != size)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(size) + " values, got " +
                                std::to_string(a.size()));
  return static_cast<const T*>(a.data());
}

template <typename T>
T* out_ptr(py::array& a, i64 size, const char* name) {
  if (!a.writeable()) throw std::invalid_argument(std::string(name) + ": read-only");
  return const_cast<T*>(in_ptr<T>(a, size, name));
}

int side_simplex(py::array tail, py::array head, py::array cost, py::array partner, i64 m_price, py::array sptr,
                 py::array snode, py::array scoef, py::array snorm, py::array scost, py::array salt,
                 py::array node_side, py::array node_coef, py::array b, py::array parent, py::array pred,
                 py::array side_basic, py::array side_flip, bool price_sides, py::array tol, i64 max_iter,
                 i64 block, py::array X, py::array MU, py::array pi, py::array stats) {
  Input in;
  in.m = tail.size();
  in.N = parent.size();
  in.S = scost.size();
  in.m_price = m_price;
  if (m_price < 0 || m_price > in.m) throw std::invalid_argument("m_price out of range");
  in.tail = in_ptr<i64>(tail, in.m, "tail");
  in.head = in_ptr<i64>(head, in.m, "head");
  in.cost = in_ptr<double>(cost, in.m, "cost");
  in.partner = in_ptr<i64>(partner, in.m, "partner");
  in.sptr = in_ptr<i64>(sptr, in.S + 1, "sptr");
  const i64 nnz = in.sptr[in.S];
  in.snode = in_ptr<i64>(snode, nnz, "snode");
  in.scoef = in_ptr<double>(scoef, nnz, "scoef");
  in.snorm = in_ptr<double>(snorm, in.S, "snorm");
  in.scost = in_ptr<double>(scost, in.S, "scost");
  in.salt = in_ptr<double>(salt, in.S, "salt");
  in.node_side = in_ptr<i64>(node_side, in.N, "node_side");
  in.node_coef = in_ptr<double>(node_coef, in.N, "node_coef");
  in.b = in_ptr<double>(b, 2 * in.N, "b");
  const double* t = in_ptr<double>(tol, 4, "tol");
  in.rc_tol = t[0];
  in.f1 = t[1];
  in.f2 = t[2];
  in.max_side_entries = static_cast<i64>(t[3]);
  in.price_sides = price_sides;
  in.max_iter = max_iter;
  in.block = std::max<i64>(block, 1);
  for (i64 a = 0; a < in.m; ++a) {
    if (in.tail[a] < 0 || in.tail[a] >= in.N || in.head[a] < 0 || in.head[a] >= in.N || in.partner[a] >= in.m)
      throw std::invalid_argument("arc " + std::to_string(a) + " out of range");
  }
  for (i64 e = 0; e < nnz; ++e) {
    if (in.snode[e] < 0 || in.snode[e] >= in.N) throw std::invalid_argument("snode out of range");
  }
  for (i64 u = 0; u < in.N; ++u) {
    if (in.node_side[u] >= in.S) throw std::invalid_argument("node_side out of range");
  }
  Output out;
  out.parent = out_ptr<i64>(parent, in.N, "parent");
  out.pred = out_ptr<i64>(pred, in.N, "pred");
  out.side_basic = out_ptr<bool>(side_basic, in.S, "side_basic");
  out.side_flip = out_ptr<bool>(side_flip, in.S, "side_flip");
  out.X = out_ptr<double>(X, 3 * in.m, "X");
  out.MU = out_ptr<double>(MU, 3 * in.S, "MU");
  out.pi = out_ptr<double>(pi, in.N, "pi");
  out.stats = out_ptr<i64>(stats, kNumStats, "stats");
  py::gil_scoped_release release;
  SideSimplex solver(in, out);
  return solver.run();
}

// End times [n] and, per action, the arc from its latest-ending predecessor (-1: none), along a
// topological order; predecessors as CSR (ptr [n + 1], node, arc).
py::tuple longest_path_tree(py::array topo, py::array ptr, py::array pnode, py::array parc, py::array dur) {
  const i64 n = dur.size();
  const i64* order = in_ptr<i64>(topo, n, "topo");
  const i64* p = in_ptr<i64>(ptr, n + 1, "ptr");
  const i64 e = p[n];
  const i64* node = in_ptr<i64>(pnode, e, "pnode");
  const i64* arc = in_ptr<i64>(parc, e, "parc");
  const double* d = in_ptr<double>(dur, n, "dur");
  Arr<double> end_arr(n);
  Arr<i64> best_arr(n);
  double* end = end_arr.mutable_data();
  i64* best = best_arr.mutable_data();
  for (i64 i = 0; i < n; ++i) {
    if (order[i] < 0 || order[i] >= n) throw std::invalid_argument("topo out of range");
  }
  for (i64 j = 0; j < e; ++j) {
    if (node[j] < 0 || node[j] >= n) throw std::invalid_argument("pnode out of range");
  }
  {
    py::gil_scoped_release release;
    for (i64 i = 0; i < n; ++i) {
      const i64 v = order[i];
      double t = 0.0;
      i64 b = -1;
      for (i64 j = p[v]; j < p[v + 1]; ++j) {
        const double x = end[node[j]];
        if (b < 0 || x > t) t = x, b = arc[j];
      }
      end[v] = t + d[v];
      best[v] = b;
    }
  }
  return py::make_tuple(end_arr, best_arr);
}

}  // namespace

PYBIND11_MODULE(_sidesimplex, m, py::mod_gil_not_used()) {
  m.doc() = "Primal network simplex with side columns and lexicographic supplies (tfz.plan.flow).";
  m.def("side_simplex", &side_simplex,
        "Run to lexicographic optimality from a basis (updated in place); returns the status.");
  m.def("longest_path_tree", &longest_path_tree, py::arg("topo"), py::arg("ptr"), py::arg("pnode"),
        py::arg("parc"), py::arg("dur"),
        "(end times, arc from the latest-ending predecessor or -1) along a topological order.");
}
