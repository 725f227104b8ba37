// tfz.plan._sidesimplex: primal network simplex with side columns and lexicographic supplies.
//
// Problem (the dual of the freeze-ratio LP, see tfz/plan/flow.py):
//
//     min  cost @ x + scost @ mu   s.t.  A x + G mu = b1 + eps b2 + eps^2 b3,   x >= 0, mu >= 0
//
// for an infinitesimal eps > 0. A is the node-arc incidence matrix of a network (+1 at the tail, -1 at
// the head; node 0's row is dropped); each side column g_s of G has entries +w at S nodes and -w at
// the paired E nodes (one pair per action of a stage), at most one side column per node. Flows are
// triples (the coefficients of 1, eps, eps^2) compared lexicographically, so the final basis is
// optimal for every small enough eps: its potentials are the lexicographic optimum of the primal
// (minimise the b1 objective, then the b2 one). b3 is a perturbation for which every basic variable
// of the current basis is lexicographically positive; no pivot is then degenerate in all three
// components and the simplex cannot cycle.
//
// Basis: K basic side columns and a forest of N - 1 - K arcs with K + 1 trees, each tree a slot; the
// root slot is the tree holding node 0. Potentials are pi = pi_rel + theta[slot]: pi_rel makes every
// forest arc's reduced cost 0 within its tree (a tree may shift its pi_rel by a constant: theta takes
// it up) and the K offsets theta of the other trees make the basic side columns' reduced costs 0, a
// K x K system with matrix Q[j, i] = sum of g_{side i} over tree j. Flows solve Q mu = tree sums of b
// and then subtree sums of b - G mu.
//
// A pivot whose entering arc joins two nodes of one tree leaves the side columns unchanged: it costs
// the cycle plus the smaller side of the tree, whose potentials shift. Any other pivot changes mu and
// with it flows anywhere: its direction is the subtree sums of the entries of the entering column and
// of the basic side columns. A pair whose E node hangs right below its S node (or the reverse) only
// moves the flow on that arc; the other entries are summed in one backward scan of a topological
// order of the forest, up to where they cancel. Splitting and joining trees relabels the smaller
// part. The cold capped stage follows the cap columns' costs from values at which the uncapped
// optimum is optimal to their real ones (homotopy), so only arcs between two trees and cap columns can
// enter; what enters on a pivot degenerate in the first two components has its third component
// raised, else it leaves again on the next one (bench/RESULTS.md has the measurements behind each
// choice).
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
constexpr i64 kAll = std::numeric_limits<i64>::max();
constexpr double kPivotTol = 1e-7;   // smallest rate at which a basic variable counts as falling
constexpr double kSlopeTol = 1e-12;  // reduced costs falling slower than this do not fall
constexpr double kNoise = 1e-11;     // subtree sums below this are rounding residue (data scaled to 1)
// Flows and potentials are recomputed from scratch after this many pivots through the side columns:
// their updates add rounding errors of about 1e-12 each (sums over the forest of terms that cancel).
constexpr i64 kRefreshEvery = 64;
// ... and after a pivot whose leaving variable falls at less than this share of the fastest rate.
constexpr double kSmallPivot = 1e-3;

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
  kSidePivots = 1,  // pivots through the side columns (all homotopy pivots among them)
  kRefreshes = 2,
  kBasicSides = 3,
  kTouched = 4,  // nodes whose subtree sums pivots through the side columns took
  kPriced = 5,
  kDegenerate = 6,  // pivots with a step of 0 in the first two components
  kSwapped = 7,     // basic variables swapped for their partners (warm starts)
  kHomotopy = 8,    // pivots of the homotopy
  kMoved = 9,       // nodes whose potentials or trees pivots changed
  kLifted = 10,     // arcs entering on degenerate homotopy pivots whose third component was raised
  kNumStats = 11,
};

struct Triple {
  double v[3] = {0.0, 0.0, 0.0};
};

// A basic variable that the pivot's direction decreases at rate d > 0: its value v (three components)
// and who it is (a forest node, whose arc to the parent is the variable, or -(i + 1) for the i-th
// basic side column).
struct Candidate {
  const double* v;
  double d;
  i64 who;
};

// Lexicographic ratio test with tolerances: the step t = (t1, t2, t3) such that every candidate stays
// lexicographically >= 0, where a component within f of 0 counts as 0 and hands the decision to the
// next one. t1 is the smallest first-component ratio; the candidates whose first component then ends
// within f1 of 0 bound t2 with their second components; those whose second component also ends within
// f2 of 0 bound t3. A later component may decrease (a negative ratio) while an earlier one is
// positive. The leaving candidate is the one that sets t3 (largest rate on ties, else the last one
// listed). Returns its index, or -1 when nothing bounds the step. `tied` holds room for n indices.
int leaving(const Candidate* cand, int n, double f1, double f2, Triple& t, int* tied) {
  if (n == 0) return -1;
  double t1 = kInf;
  for (int i = 0; i < n; ++i) t1 = std::min(t1, cand[i].v[0] > f1 ? cand[i].v[0] / cand[i].d : 0.0);
  // the candidates whose first component ends within f1 of 0 (when t1 > 0 every candidate's first
  // component is above f1, else t1 would be 0)
  int n_tied = 0;
  double t2 = kInf;
  for (int i = 0; i < n; ++i) {
    const Candidate& c = cand[i];
    if (c.v[0] - t1 * c.d > f1) continue;
    tied[n_tied++] = i;
    t2 = std::min(t2, (t1 > 0.0 || c.v[1] > f2) ? c.v[1] / c.d : 0.0);
  }
  double t3 = kInf, best_d = 0.0;
  int best = -1;
  const bool zero12 = t1 == 0.0 && t2 <= 0.0;
  for (int k = 0; k < n_tied; ++k) {
    const int i = tied[k];
    const Candidate& c = cand[i];
    if (c.v[1] - t2 * c.d > f2) continue;
    const double r = (zero12 && c.v[1] <= f2) ? std::max(c.v[2], 0.0) / c.d : c.v[2] / c.d;
    if (r < t3 || (r == t3 && c.d >= best_d)) t3 = r, best = i, best_d = c.d;
  }
  t.v[0] = t1;
  t.v[1] = t2;
  t.v[2] = t3;
  return best;
}

// A fraction in [0, 1) per arc that breaks ties between equal perturbation values.
inline double arc_fraction(i64 a) { return std::fmod(static_cast<double>(a) * 0.6180339887498949, 1.0); }

// Index of the highest set bit of a nonzero word.
inline int highest_bit(std::uint64_t w) {
#if defined(__GNUC__) || defined(__clang__)
  return 63 - __builtin_clzll(w);
#else
  int b = 0;
  while (w >>= 1) ++b;
  return b;
#endif
}

inline bool lex_negative(const double* v, double f1, double f2) {
  return v[0] < -f1 || (v[0] <= f1 && v[1] < -f2);
}

// A value recomputed from scratch that is negative by less than kRoundoff tolerances is rounding (Q^-1
// of a badly conditioned Q: seen up to 3.4 f1), not a sign: its first two components become 0 and
// the third decides. Returns false for a value that is really negative (after a warm start's drift,
// values of 1e-4 go negative: wider, this band kept them and the flows went wrong).
constexpr double kRoundoff = 10.0;
inline bool snap(double* v, double f1, double f2) {
  if (v[0] < -kRoundoff * f1) return false;
  if (v[0] > f1) return true;
  v[0] = 0.0;
  if (v[1] < -kRoundoff * f2) return false;
  if (v[1] <= f2) v[1] = 0.0;
  return true;
}

// Dense K x K inverse by Gauss-Jordan with partial pivoting; false when (numerically) singular.
bool invert(int K, const std::vector<double>& A, std::vector<double>& inv) {
  const size_t k = static_cast<size_t>(K);
  std::vector<double> M(A.begin(), A.begin() + k * k);
  inv.assign(k * k, 0.0);
  for (size_t i = 0; i < k; ++i) inv[i * k + i] = 1.0;
  for (size_t c = 0; c < k; ++c) {
    size_t p = c;
    double best = std::abs(M[c * k + c]);
    for (size_t r = c + 1; r < k; ++r) {
      const double v = std::abs(M[r * k + c]);
      if (v > best) best = v, p = r;
    }
    if (!(best > 0.0) || !std::isfinite(best)) return false;
    if (p != c) {
      for (size_t j = 0; j < k; ++j) {
        std::swap(M[p * k + j], M[c * k + j]);
        std::swap(inv[p * k + j], inv[c * k + j]);
      }
    }
    const double d = M[c * k + c];
    for (size_t j = 0; j < k; ++j) {
      M[c * k + j] /= d;
      inv[c * k + j] /= d;
    }
    for (size_t r = 0; r < k; ++r) {
      if (r == c) continue;
      const double f = M[r * k + c];
      if (f == 0.0) continue;
      for (size_t j = 0; j < k; ++j) {
        M[r * k + j] -= f * M[c * k + j];
        inv[r * k + j] -= f * inv[c * k + j];
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
  const double* start = nullptr;  // [S]: the cap columns' costs where the homotopy starts (or null)
  double rc_tol = 0.0, f1 = 0.0, f2 = 0.0;
  i64 max_side_entries = 16, max_iter = 0, max_side_pivots = 0, block = 64;
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
  // ---- forest
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
  // Make arc `arc` to `p` the tree arc of u (u has no parent now).
  void hang(i64 u, i64 p, i64 arc) {
    parent_[u] = p;
    pred_[u] = arc;
    up_[u] = tail_[arc] == u;
    link(u, p);
  }
  // Preorder of the subtree of r, without the subtree of skip, into out: returns its size, or -1 as
  // soon as it would exceed limit.
  i64 collect(i64 r, i64* out, i64 limit = kAll, i64 skip = -1) {
    i64 top = 1, cnt = 0;
    stack_[0] = r;
    while (top > 0) {
      if (cnt == limit) return -1;
      const i64 u = stack_[--top];
      out[cnt++] = u;
      for (i64 c = first_child_[u]; c >= 0; c = next_sib_[c]) {
        if (c != skip) stack_[top++] = c;
      }
    }
    return cnt;
  }
  i64 forest_order();
  void rebuild_order();
  void append(i64 cnt);
  i64 find_join(i64 a, i64 b);
  void reframe(i64 cnt, double shift);
  void relabel(i64 cnt, i64 from, i64 to, double shift);
  void build_cross();
  void update_cross(i64 cnt);
  // ---- side columns
  void flip_side(i64 s);
  bool compact();
  void solve_theta();
  double side_reduced_cost(i64 s) const {
    double rc = scost_[s] - c0_[s];
    for (i64 j = 0; j < K_; ++j) rc -= Qfull_[slots_[j] * S_ + s] * theta_[slots_[j]];
    return rc;
  }
  // ---- simplex
  void perturb();
  bool setup();
  int refresh();
  i64 price();
  void push(i64 u, double value);
  void clear_touched();
  int pivot_in_tree(i64 enter);
  int pivot_through_sides(i64 enter);
  void lift(i64 enter, double size);  // an entering arc's third component
  int homotopy();

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
  std::vector<i64> pair_;  // the paired node of each side-column node (S_v <-> E_v)
  // forest
  std::vector<i64> first_child_, next_sib_, prev_sib_, tid_, stack_, buf_, mark_;
  std::vector<char> up_, in_tree_;
  std::vector<double> pi_rel_;
  i64 stamp_ = 0;
  // a topological order of the forest with, per position, the parent's position, the arc to the
  // parent and its direction: the subtree sums of pivots through the side columns scan it backwards.
  // Moved trees are appended (holes are left behind; rebuilt when full); a pivot inside a tree only
  // marks it stale (rebuilt when next needed).
  std::vector<i64> order_, pos_, ppar_, parc_;
  std::vector<char> pup_;
  std::vector<double> dpos_;
  i64 cap_ord_ = 0, ord_len_ = 0;
  // one bit per position whose entry of dpos_ was written, and the highest word with a bit set: the
  // backward scan visits only those (a parent comes before its children, so it never goes back up)
  std::vector<std::uint64_t> written_;
  i64 top_word_ = -1;
  void add_at(i64 p, double value) {
    dpos_[p] += value;
    written_[p >> 6] |= std::uint64_t{1} << (p & 63);
    top_word_ = std::max(top_word_, p >> 6);
  }
  bool order_valid_ = false;
  // tree slots; the root slot holds node 0
  std::vector<i64> slot_size_, slot_root_, free_slots_, slots_, slot_pos_, basic_, side_pos_;
  i64 n_free_ = 0, K_ = 0, root_slot_ = 0;
  std::vector<char> sflip_;
  // positions with a nonzero subtree sum; rates of arcs that move alone (a side column's pair across
  // one arc)
  std::vector<double> dlocal_;
  std::vector<char> local_;
  std::vector<i64> touched_list_, local_list_;
  // side-column matrices
  std::vector<double> Qfull_, Q_, Qinv_, c0_, theta_, agg_, dmu_, vec_;
  // the ratio test's candidates (at most one per node and basic side column) and the tied ones
  std::vector<Candidate> cand_;
  std::vector<int> tied_;
  i64 n_cand_ = 0;
  void add_candidate(const double* v, double d, i64 who) { cand_[n_cand_++] = {v, d, who}; }
  int ratio_test(Triple& t) {
    return leaving(cand_.data(), static_cast<int>(n_cand_), in_.f1, in_.f2, t, tied_.data());
  }
  // homotopy: cap column costs at its start, their slope, theta's slope; arcs between two trees
  std::vector<double> target_, start_, slope_, dtheta_;
  std::vector<i64> adj_ptr_, adj_arc_, cross_list_, cross_pos_;
  // iteration state
  i64 it_ = 0, since_opt_ = 0, flip_rounds_ = 0, next_arc_ = 0, since_refresh_ = 0;
  bool reperturb_ = false, perturbed_ = false, fresh_ = false, need_refresh_ = true;
  bool first_perturb_ = true, check_third_ = false, lifting_ = false;
};

// Preorder of every tree into buf_: parents before children. Returns its length (N).
i64 SideSimplex::forest_order() {
  i64 n = 0;
  for (i64 r = 0; r < N_; ++r) {
    if (parent_[r] < 0) n += collect(r, buf_.data() + n);
  }
  return n;
}

void SideSimplex::rebuild_order() {
  const i64 n = forest_order();
  for (i64 p = 0; p < n; ++p) {
    const i64 u = buf_[p];
    order_[p] = u;
    pos_[u] = p;
  }
  for (i64 p = 0; p < n; ++p) {
    const i64 u = order_[p], par = parent_[u];
    ppar_[p] = par >= 0 ? pos_[par] : -1;
    parc_[p] = pred_[u];
    pup_[p] = up_[u];
  }
  ord_len_ = n;
  order_valid_ = true;
}

// Move the nodes buf_[:cnt] (a re-hung tree in preorder) to the end of the order. When the order is
// full it goes stale instead (rebuilding here would overwrite buf_, which the caller still uses).
void SideSimplex::append(i64 cnt) {
  if (!order_valid_) return;
  if (ord_len_ + cnt > cap_ord_) {
    order_valid_ = false;
    return;
  }
  for (i64 idx = 0; idx < cnt; ++idx) {
    const i64 u = buf_[idx];
    order_[pos_[u]] = -1;
    ppar_[pos_[u]] = -1;
    order_[ord_len_] = u;
    pos_[u] = ord_len_;
    const i64 par = parent_[u];
    ppar_[ord_len_] = par >= 0 ? pos_[par] : -1;
    parc_[ord_len_] = pred_[u];
    pup_[ord_len_] = up_[u];
    ++ord_len_;
  }
}

// The lowest common ancestor of a and b (one tree): both climb in turns, marking what they pass.
i64 SideSimplex::find_join(i64 a, i64 b) {
  const i64 sa = stamp_ + 1, sb = stamp_ + 2;
  stamp_ += 2;
  while (a >= 0 || b >= 0) {
    if (a >= 0) {
      if (mark_[a] == sb) return a;
      mark_[a] = sa;
      a = parent_[a];
    }
    if (b >= 0) {
      if (mark_[b] == sa) return b;
      mark_[b] = sb;
      b = parent_[b];
    }
  }
  return -1;  // not in one tree
}

// pi_rel += shift on the nodes buf_[:cnt] (a tree or part of one whose potentials moved).
void SideSimplex::reframe(i64 cnt, double shift) {
  stats_[kMoved] += cnt;
  if (S_ == 0 || (!in_.price_sides && K_ == 0)) {  // c0 is unused (the next run rebuilds it)
    for (i64 idx = 0; idx < cnt; ++idx) pi_rel_[buf_[idx]] += shift;
    return;
  }
  for (i64 idx = 0; idx < cnt; ++idx) {
    const i64 z = buf_[idx];
    pi_rel_[z] += shift;
    const i64 s = in_.node_side[z];
    if (s >= 0) c0_[s] += node_coef_[z] * shift;
  }
}

// The nodes buf_[:cnt] move from slot `from` to slot `to`, their pi_rel shifted by `shift`.
void SideSimplex::relabel(i64 cnt, i64 from, i64 to, double shift) {
  reframe(cnt, shift);
  for (i64 idx = 0; idx < cnt; ++idx) {
    const i64 z = buf_[idx];
    tid_[z] = to;
    const i64 s = in_.node_side[z];
    if (s >= 0) {
      Qfull_[from * S_ + s] -= node_coef_[z];
      Qfull_[to * S_ + s] += node_coef_[z];
    }
  }
  update_cross(cnt);
}

// Arcs incident to each node and the list of nonbasic arcs between two trees (homotopy only).
void SideSimplex::build_cross() {
  const i64 mp = in_.m_price;
  adj_ptr_.assign(N_ + 1, 0);
  for (i64 a = 0; a < mp; ++a) {
    ++adj_ptr_[tail_[a] + 1];
    ++adj_ptr_[head_[a] + 1];
  }
  for (i64 u = 0; u < N_; ++u) adj_ptr_[u + 1] += adj_ptr_[u];
  adj_arc_.assign(2 * mp, 0);
  std::vector<i64> fill(adj_ptr_.begin(), adj_ptr_.end() - 1);
  for (i64 a = 0; a < mp; ++a) {
    adj_arc_[fill[tail_[a]]++] = a;
    adj_arc_[fill[head_[a]]++] = a;
  }
  cross_pos_.assign(mp, -1);
  cross_list_.clear();
  for (i64 a = 0; a < mp; ++a) {
    if (!in_tree_[a] && tid_[tail_[a]] != tid_[head_[a]]) {
      cross_pos_[a] = static_cast<i64>(cross_list_.size());
      cross_list_.push_back(a);
    }
  }
}

// The cross-tree status of every arc incident to the nodes buf_[:cnt] (their trees changed).
void SideSimplex::update_cross(i64 cnt) {
  if (cross_pos_.empty()) return;
  for (i64 idx = 0; idx < cnt; ++idx) {
    const i64 u = buf_[idx];
    for (i64 j = adj_ptr_[u]; j < adj_ptr_[u + 1]; ++j) {
      const i64 a = adj_arc_[j];
      const bool want = !in_tree_[a] && tid_[tail_[a]] != tid_[head_[a]];
      if (want == (cross_pos_[a] >= 0)) continue;
      if (want) {
        cross_pos_[a] = static_cast<i64>(cross_list_.size());
        cross_list_.push_back(a);
      } else {
        const i64 last = cross_list_.back();
        cross_list_[cross_pos_[a]] = last;
        cross_pos_[last] = cross_pos_[a];
        cross_list_.pop_back();
        cross_pos_[a] = -1;
      }
    }
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
  theta_[root_slot_] = 0.0;
}

// b3, a perturbation for which the basis is lexicographically positive. At the start every node but
// node 0 asks for one unit (b3 = -1, node 0: N - 1): the third objective is then the earliest event
// times, for which the start bases (longest-path trees, earlier optima) are nearly optimal already;
// refresh checks that it is positive. Otherwise, and whenever a pivot would be degenerate in all
// three components, b3 = B x3 with x3 on each forest arc the size of the subtree below it (a
// degenerate pivot then cuts off the smallest subtree, as with strongly feasible trees) plus a
// fraction in [0, 1) that breaks ties, and 1 plus such a fraction on each basic side column.
void SideSimplex::perturb() {
  for (i64 u = 0; u < N_; ++u) b_[3 * u + 2] = 0.0;
  if (first_perturb_) {
    first_perturb_ = false;
    check_third_ = true;
    for (i64 u = 1; u < N_; ++u) b_[3 * u + 2] = -1.0;
    b_[2] = static_cast<double>(N_ - 1);
    return;
  }
  const i64 n = forest_order();
  std::vector<double> size(N_, 1.0);
  for (i64 p = n - 1; p >= 0; --p) {
    const i64 u = buf_[p];
    if (parent_[u] >= 0) size[parent_[u]] += size[u];
  }
  for (i64 u = 0; u < N_; ++u) {
    if (parent_[u] < 0) continue;
    const i64 a = pred_[u];
    const double v = size[u] + arc_fraction(a);
    b_[3 * tail_[a] + 2] += v;
    b_[3 * head_[a] + 2] -= v;
  }
  for (i64 s = 0; s < S_; ++s) {
    if (side_pos_[s] < 0) continue;
    const double v = 1.0 + std::fmod(static_cast<double>(s) * 0.7548776662466927, 1.0);
    for (i64 e = in_.sptr[s]; e < in_.sptr[s + 1]; ++e) b_[3 * in_.snode[e] + 2] += v * scoef_[e];
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
  // each column's entries: its S nodes (+w), then their E nodes (-w) in the same order
  pair_.assign(N, -1);
  for (i64 s = 0; s < S; ++s) {
    const i64 lo = in_.sptr[s], half = (in_.sptr[s + 1] - lo) / 2;
    for (i64 k = 0; k < half; ++k) {
      const i64 a = in_.snode[lo + k], b = in_.snode[lo + half + k];
      if (in_.scoef[lo + k] != -in_.scoef[lo + half + k]) return false;
      pair_[a] = b;
      pair_[b] = a;
    }
  }
  first_child_.assign(N, -1);
  next_sib_.assign(N, -1);
  prev_sib_.assign(N, -1);
  up_.assign(N, 0);
  in_tree_.assign(m_, 0);
  tid_.assign(N, 0);
  mark_.assign(N, 0);
  pi_rel_.assign(N, 0.0);
  stack_.assign(N, 0);
  buf_.assign(N, 0);
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
  // tree slots 0 .. S + 1 (a pivot may cut before it links)
  slot_size_.assign(S + 2, 0);
  slot_root_.assign(S + 2, -1);
  free_slots_.assign(S + 2, 0);
  n_free_ = 0;
  i64 seen = 0, nslot = 0;
  for (i64 r = 0; r < N; ++r) {
    if (parent_[r] >= 0) continue;
    if (nslot > S) return false;
    const i64 slot = nslot++;
    slot_root_[slot] = r;
    const i64 cnt = collect(r, buf_.data());
    seen += cnt;
    slot_size_[slot] = cnt;
    for (i64 idx = 0; idx < cnt; ++idx) {
      const i64 u = buf_[idx];
      tid_[u] = slot;
      if (u == r) continue;
      const i64 p = parent_[u], a = pred_[u];
      pi_rel_[u] = up_[u] ? cost_[a] + pi_rel_[p] : pi_rel_[p] - cost_[a];
    }
  }
  if (seen != N) return false;  // a cycle in the parent pointers
  root_slot_ = tid_[0];
  for (i64 s = nslot; s < S + 2; ++s) free_slots_[n_free_++] = s;
  dlocal_.assign(N, 0.0);
  local_.assign(N, 0);
  touched_list_.reserve(N);
  cand_.assign(N + S + 2, Candidate{});
  tied_.assign(N + S + 2, 0);
  cap_ord_ = N + std::max<i64>(N / 4, 1024);
  order_.assign(cap_ord_, -1);
  pos_.assign(N, -1);
  ppar_.assign(cap_ord_, -1);
  parc_.assign(cap_ord_, -1);
  pup_.assign(cap_ord_, 0);
  dpos_.assign(cap_ord_, 0.0);
  written_.assign(cap_ord_ / 64 + 1, 0);
  top_word_ = -1;
  order_valid_ = false;
  slots_.assign(S + 2, 0);
  slot_pos_.assign(S + 2, -1);
  K_ = 0;
  for (i64 s = 0; s < nslot; ++s) {
    if (s == root_slot_) continue;
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
  const i64 ord_len = forest_order();
  vec_ = b_;
  std::fill(agg_.begin(), agg_.end(), 0.0);
  for (i64 u = 0; u < N; ++u) {
    const i64 t = tid_[u];
    if (t != root_slot_)
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
  for (i64 p = ord_len - 1; p >= 0; --p) {
    const i64 u = buf_[p];
    if (parent_[u] < 0) continue;
    const i64 par = parent_[u], a = pred_[u];
    const double sg = up_[u] ? 1.0 : -1.0;
    for (int q = 0; q < 3; ++q) {
      vec_[3 * par + q] += vec_[3 * u + q];
      X_[3 * a + q] = sg * vec_[3 * u + q];
    }
  }
  std::fill(c0_.begin(), c0_.end(), 0.0);
  for (i64 p = 0; p < ord_len; ++p) {
    const i64 u = buf_[p];
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
  bool infeas = false, unperturbed = false;
  i64 nflip = 0;
  const double f1 = in_.f1, f2 = in_.f2;
  auto negative = [&](double* v) {
    if (!lex_negative(v, f1, f2)) return false;
    if (!snap(v, f1, f2)) return true;
    if (v[0] == 0.0 && v[1] == 0.0 && v[2] <= 0.0) unperturbed = true;
    return false;
  };
  for (i64 u = 0; u < N; ++u) {
    if (parent_[u] < 0) continue;
    const i64 a = pred_[u];
    if (!negative(&X_[3 * a])) continue;
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
    ++nflip;
  }
  for (i64 i = 0; i < K; ++i) {
    const i64 s = basic_[i];
    if (!negative(&MU_[3 * s])) continue;
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
    order_valid_ = false;  // arcs swapped in place
    if (!compact()) return kSingular;
    perturb();
    return -1;
  }
  if (unperturbed && !perturbed_) {
    // a snapped value left with a third component <= 0: a perturbation positive on this basis
    reperturb_ = true;
    return -1;
  }
  if (check_third_) {
    // a start perturbation not chosen from this basis: every basic variable whose first two
    // components are 0 needs a positive third one, else the perturbation is chosen from the basis
    check_third_ = false;
    bool bad = false;
    for (i64 u = 0; u < N && !bad; ++u) {
      if (parent_[u] < 0) continue;
      const double* v = &X_[3 * pred_[u]];
      bad = v[0] <= f1 && v[1] <= f2 && v[2] <= 0.0;
    }
    for (i64 i = 0; i < K && !bad; ++i) {
      const double* v = &MU_[3 * basic_[i]];
      bad = v[0] <= f1 && v[1] <= f2 && v[2] <= 0.0;
    }
    if (bad) {
      reperturb_ = true;
      return -1;
    }
  }
  need_refresh_ = false;
  fresh_ = true;
  since_refresh_ = 0;
  return 0;
}

// Side columns (reduced cost over their norm) compete with a block of arcs, but at most
// max_side_entries of them enter between two points where no arc can. Returns the entering arc, m +
// the entering side column, or -1.
i64 SideSimplex::price() {
  const i64 m = m_;
  i64 enter = -1;
  double best = -in_.rc_tol;
  auto price_sides = [&]() {
    for (i64 s = 0; s < S_; ++s) {
      if (side_pos_[s] >= 0) continue;
      const double rc = side_reduced_cost(s) / in_.snorm[s];
      if (rc < best) best = rc, enter = m + s;
    }
  };
  if (in_.price_sides && since_opt_ < in_.max_side_entries) price_sides();
  i64 a = next_arc_, cnt = 0, checked = 0;
  const i64 mp = in_.m_price;
  const bool one_tree = K_ == 0;  // no tree offsets: skip looking them up
  while (checked < mp) {
    if (!in_tree_[a]) {
      const i64 t = tail_[a], h = head_[a];
      double rc = cost_[a] - pi_rel_[t] + pi_rel_[h];
      if (!one_tree) rc += theta_[tid_[h]] - theta_[tid_[t]];
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
  const i64 first = tail_[enter], second = head_[enter];
  const i64 join = find_join(first, second);
  if (join < 0) return kInconsistentForest;
  // flow decreases on arcs against the cycle (entering arc: first -> second)
  n_cand_ = 0;
  for (i64 u = first; u != join; u = parent_[u]) {
    if (up_[u]) add_candidate(&X_[3 * pred_[u]], 1.0, u);
  }
  const i64 n_first = n_cand_;
  for (i64 u = second; u != join; u = parent_[u]) {
    if (!up_[u]) add_candidate(&X_[3 * pred_[u]], 1.0, u);
  }
  Triple t;
  const int out = ratio_test(t);
  if (out < 0) return kUnbounded;
  const i64 u_out = cand_[out].who;
  const bool side_first = out < n_first;
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
  for (i64 u = first; u != join; u = parent_[u]) {
    const double sg = up_[u] ? -1.0 : 1.0;
    for (int q = 0; q < 3; ++q) X_[3 * pred_[u] + q] += sg * t.v[q];
  }
  for (i64 u = second; u != join; u = parent_[u]) {
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
  i64 u = u_in, new_par = v_in, new_pred = enter;
  while (true) {
    const i64 old_par = parent_[u], old_pred = pred_[u];
    unlink(u, old_par);
    hang(u, new_par, new_pred);
    if (u == u_out) break;
    new_par = u;
    new_pred = old_pred;
    u = old_par;
  }
  if (order_valid_ && (in_.price_sides || K_ > 0)) {
    // pivots through the side columns will follow: keep the order, the re-hung subtree appended
    const i64 cnt = collect(u_in, buf_.data());
    append(cnt);
    reframe(cnt, sigma);
    return kDone;
  }
  order_valid_ = false;
  // the re-hung subtree's potentials rise by sigma, or the rest of the tree's fall by it
  const i64 tree = tid_[u_in];
  i64 cnt = collect(u_in, buf_.data(), slot_size_[tree] / 2 + 1);
  if (cnt >= 0) {
    reframe(cnt, sigma);
  } else {
    cnt = collect(slot_root_[tree], buf_.data(), kAll, u_in);
    reframe(cnt, -sigma);
  }
  return kDone;
}

// Add value to node u's entry of the vector whose subtree sums are being taken.
void SideSimplex::push(i64 u, double value) { add_at(pos_[u], value); }

void SideSimplex::clear_touched() {
  for (const i64 p : touched_list_) dpos_[p] = 0.0;
  touched_list_.clear();
  for (const i64 u : local_list_) {
    local_[u] = 0;
    dlocal_[u] = 0.0;
  }
  local_list_.clear();
}

// A pivot through the side columns: its direction is the subtree sums of the entering column's and
// the basic side columns' entries.
int SideSimplex::pivot_through_sides(i64 enter) {
  const i64 m = m_;
  stats_[kSidePivots] += 1;
  if (!order_valid_) rebuild_order();
  i64 K = K_;
  // add the entries of column s times value: a pair across one forest arc only moves that arc
  auto add_column = [&](i64 s, double value) {
    const i64 lo = in_.sptr[s], half = (in_.sptr[s + 1] - lo) / 2;
    for (i64 k = 0; k < half; ++k) {
      const i64 a = in_.snode[lo + k], b = in_.snode[lo + half + k];
      const double va = -value * scoef_[lo + k];  // the entry of b is -va
      if (parent_[b] == a || parent_[a] == b) {
        const i64 c = parent_[b] == a ? b : a;
        if (!local_[c]) {
          local_[c] = 1;
          local_list_.push_back(c);
        }
        dlocal_[c] += c == a ? va : -va;
      } else {
        push(a, va);
        push(b, -va);
      }
    }
  };
  for (i64 j = 0; j < K; ++j) agg_[3 * j] = 0.0;
  if (enter < m) {
    i64 t = tid_[tail_[enter]];
    if (t != root_slot_) agg_[3 * slot_pos_[t]] += 1.0;
    t = tid_[head_[enter]];
    if (t != root_slot_) agg_[3 * slot_pos_[t]] -= 1.0;
    push(tail_[enter], -1.0);
    push(head_[enter], 1.0);
  } else {
    const i64 s = enter - m;
    for (i64 e = in_.sptr[s]; e < in_.sptr[s + 1]; ++e) {
      const i64 t = tid_[in_.snode[e]];
      if (t != root_slot_) agg_[3 * slot_pos_[t]] += scoef_[e];
    }
    add_column(s, 1.0);
  }
  for (i64 i = 0; i < K; ++i) {
    double acc = 0.0;
    for (i64 j = 0; j < K; ++j) acc -= Qinv_[i * K + j] * agg_[3 * j];
    dmu_[i] = acc;
    if (acc != 0.0) add_column(basic_[i], acc);
  }
  // subtree sums in reverse topological order; arcs whose flow falls are candidates to leave. A sum
  // below kNoise is the rounding residue of entries that cancel (a pair below it): it stops there.
  n_cand_ = 0;
  for (i64 w = top_word_; w >= 0; --w) {
    while (written_[w] != 0) {
      const int bit = highest_bit(written_[w]);
      written_[w] &= ~(std::uint64_t{1} << bit);
      const i64 p = (w << 6) + bit;
      double d = dpos_[p];
      if (d == 0.0) continue;
      touched_list_.push_back(p);
      if (std::abs(d) < kNoise) d = dpos_[p] = 0.0;
      const i64 q = ppar_[p];
      if (q < 0) continue;
      add_at(q, d);
      const i64 u = order_[p];
      double rate = d;
      if (local_[u]) {
        rate += dlocal_[u];
        local_[u] = 2;  // taken here
      }
      if (pup_[p]) rate = -rate;
      if (rate > kPivotTol) add_candidate(&X_[3 * parc_[p]], rate, u);
    }
  }
  top_word_ = -1;
  for (const i64 c : local_list_) {
    if (local_[c] == 2) continue;  // taken with its subtree sum above
    const double rate = up_[c] ? -dlocal_[c] : dlocal_[c];
    if (rate > kPivotTol) add_candidate(&X_[3 * pred_[c]], rate, c);
  }
  for (i64 i = 0; i < K; ++i) {
    const double d = -dmu_[i];
    if (d > kPivotTol) add_candidate(&MU_[3 * basic_[i]], d, -(i + 1));
  }
  Triple t;
  const int out = ratio_test(t);
  if (out < 0) {
    clear_touched();
    return kUnbounded;
  }
  const i64 leave_node = cand_[out].who;
  double largest = 0.0;
  for (i64 i = 0; i < n_cand_; ++i) largest = std::max(largest, cand_[i].d);
  // a small pivot makes a long step: the rounding of every rate it multiplies shows; recompute after
  if (cand_[out].d < kSmallPivot * largest && (t.v[0] > 0.0 || t.v[1] > 0.0)) need_refresh_ = true;
  if (t.v[0] == 0.0 && t.v[1] == 0.0) {
    stats_[kDegenerate] += 1;
    if (t.v[2] == 0.0 && !perturbed_) {
      clear_touched();
      stats_[kSidePivots] -= 1;
      need_refresh_ = true;
      reperturb_ = true;
      return kRetry;
    }
  }
  perturbed_ = false;
  stats_[kTouched] += static_cast<i64>(touched_list_.size() + local_list_.size());
  // apply the step: the arcs with a nonzero direction (components the step leaves at 0 stay as they
  // are), the basic side columns, the entering one
  const int q0 = t.v[0] != 0.0 ? 0 : (t.v[1] != 0.0 ? 1 : 2);
  auto step = [&](i64 a, bool up, double d) {
    if (!up) d = -d;
    for (int q = q0; q < 3; ++q) X_[3 * a + q] += t.v[q] * d;
  };
  for (const i64 p : touched_list_) {
    const i64 u = order_[p];
    const double d = dpos_[p] + (local_[u] ? dlocal_[u] : 0.0);
    if (d != 0.0 && ppar_[p] >= 0) step(parc_[p], pup_[p], d);
  }
  for (const i64 c : local_list_) {
    if (local_[c] != 2 && dlocal_[c] != 0.0 && parent_[c] >= 0) step(pred_[c], up_[c], dlocal_[c]);
  }
  clear_touched();
  for (i64 i = 0; i < K; ++i) {
    const i64 s = basic_[i];
    for (int q = 0; q < 3; ++q) MU_[3 * s + q] += t.v[q] * dmu_[i];
  }
  const bool lift_entering = lifting_ && enter < m && t.v[0] == 0.0 && t.v[1] == 0.0;
  i64 s_in = -1;
  if (enter < m) {
    for (int q = 0; q < 3; ++q) X_[3 * enter + q] = t.v[q];
  } else {
    s_in = enter - m;
    for (int q = 0; q < 3; ++q) MU_[3 * s_in + q] = t.v[q];
  }
  // ---- basis change
  if (leave_node >= 0) {
    // cut the arc above leave_node: the smaller of the two parts takes a new slot (and, when it
    // holds node 0, the root slot's role)
    const i64 u = leave_node, a = pred_[u];
    for (int q = 0; q < 3; ++q) X_[3 * a + q] = 0.0;
    in_tree_[a] = 0;
    const i64 old = tid_[u];
    unlink(u, parent_[u]);
    parent_[u] = -1;
    pred_[u] = -1;
    if (order_valid_) ppar_[pos_[u]] = -1;
    const i64 ns = free_slots_[--n_free_];
    const i64 total = slot_size_[old];
    i64 cnt = collect(u, buf_.data(), total / 2 + 1);
    if (cnt >= 0) {
      slot_root_[ns] = u;
    } else {
      cnt = collect(slot_root_[old], buf_.data());
      slot_root_[ns] = slot_root_[old];
      slot_root_[old] = u;
    }
    slot_size_[ns] = cnt;
    slot_size_[old] = total - cnt;
    relabel(cnt, old, ns, 0.0);
    i64 added = ns;  // the slot that joins the K x K system
    if (tid_[0] == ns) {
      root_slot_ = ns;
      added = old;
    }
    slots_[K] = added;
    slot_pos_[added] = K;
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
    // link the entering arc: reroot the smaller of its trees at its endpoint and hang it below the
    // other endpoint; it takes that tree's slot and frame
    const i64 x = tail_[enter], y = head_[enter], tx = tid_[x], ty = tid_[y];
    if (tx == ty) return kInconsistentForest;
    i64 z, w, tz;
    if (slot_size_[tx] <= slot_size_[ty])
      z = x, w = y, tz = tx;
    else
      z = y, w = x, tz = ty;
    i64 u = z, np = w, npred = enter;
    while (u >= 0) {
      const i64 p = parent_[u], a = pred_[u];
      if (p >= 0) unlink(u, p);
      hang(u, np, npred);
      np = u;
      npred = a;
      u = p;
    }
    in_tree_[enter] = 1;
    const double sigma = up_[z] ? cost_[enter] + pi_rel_[w] - pi_rel_[z] : pi_rel_[w] - cost_[enter] - pi_rel_[z];
    const i64 tw = tid_[w];
    const i64 cnt = collect(z, buf_.data());
    append(cnt);
    relabel(cnt, tz, tw, sigma);
    if (lift_entering) lift(enter, static_cast<double>(cnt));
    slot_size_[tw] += cnt;
    slot_size_[tz] = 0;
    slot_root_[tz] = -1;
    i64 gone = tz;  // the slot that leaves the K x K system
    if (tz == root_slot_) {
      root_slot_ = tw;
      gone = tw;
    }
    const i64 j = slot_pos_[gone];
    K_ = --K;
    slots_[j] = slots_[K];
    slot_pos_[slots_[j]] = j;
    slot_pos_[gone] = -1;
    free_slots_[n_free_++] = tz;
  }
  if (!compact()) return kSingular;
  return kDone;
}

// The arc that enters on a homotopy pivot degenerate in the first two components takes the step's
// third component, often tiny: it is then the first to leave on the next degenerate pivot that
// lowers it, and re-enters soon after (arcs went in and out up to 11 times within a few hundred
// pivots, per-stage times on interleaved1f1b). Its third component is raised above every value the
// perturbation gives (N plus the `size` nodes it carries plus a fraction, where perturb gives the
// size plus a fraction): b3 moves along the arc's own column, which changes no other basic value, so
// the basis stays lexicographically feasible. Cap columns entering the same way keep their value
// (raising them too doubled the pivots of uniform times on interleaved1f1b).
void SideSimplex::lift(i64 enter, double size) {
  const double delta = static_cast<double>(N_) + size + arc_fraction(enter) - X_[3 * enter + 2];
  if (!(delta > 0.0)) return;
  X_[3 * enter + 2] += delta;
  b_[3 * tail_[enter] + 2] += delta;
  b_[3 * head_[enter] + 2] -= delta;
  stats_[kLifted] += 1;
}

// The cap columns' costs move from values at which the start basis is optimal (every nonbasic cap
// column's reduced cost raised to 0) to their real values, and the basis follows the optimum: costs
// change only the tree offsets theta, so only arcs between two trees and cap columns change their
// reduced costs; at each point where one of them reaches 0 it enters. Returns -1 when the real costs
// are reached (then the plain simplex checks and finishes), else a status.
int SideSimplex::homotopy() {
  const i64 S = S_;
  build_cross();
  target_.assign(scost_.begin(), scost_.end());
  start_.assign(S, 0.0);
  slope_.assign(S, 0.0);
  dtheta_.assign(S + 2, 0.0);
  bool started = false;
  double lambda = 0.0;
  while (true) {
    if (need_refresh_) {
      const int r = refresh();
      if (r > 0) return r;
      if (r < 0) continue;
    }
    solve_theta();
    if (!started) {
      started = true;
      for (i64 s = 0; s < S; ++s) {
        start_[s] = in_.start[s];
        slope_[s] = target_[s] - start_[s];
        scost_[s] = start_[s];
      }
      solve_theta();
    }
    if (it_ >= in_.max_iter) break;
    // d theta / d lambda over the basic cap columns
    const i64 K = K_;
    std::fill(dtheta_.begin(), dtheta_.end(), 0.0);
    for (i64 j = 0; j < K; ++j) {
      double acc = 0.0;
      for (i64 i = 0; i < K; ++i) acc += Qinv_[i * K + j] * slope_[basic_[i]];
      dtheta_[slots_[j]] = acc;
    }
    i64 enter = -1;
    double step = kInf, rate = 0.0;
    auto consider = [&](i64 who, double rc, double drc) {
      if (drc >= -kSlopeTol) return;
      const double r = std::max(rc, 0.0) / -drc;
      if (r < step || (r == step && -drc > rate)) step = r, rate = -drc, enter = who;
    };
    for (const i64 a : cross_list_) {
      const i64 t = tail_[a], h = head_[a], tt = tid_[t], th = tid_[h];
      const double drc = dtheta_[th] - dtheta_[tt];
      if (drc < -kSlopeTol) consider(a, cost_[a] - pi_rel_[t] - theta_[tt] + pi_rel_[h] + theta_[th], drc);
    }
    stats_[kPriced] += static_cast<i64>(cross_list_.size());
    for (i64 s = 0; s < S; ++s) {
      if (side_pos_[s] >= 0) continue;
      double drc = slope_[s];
      for (i64 j = 0; j < K; ++j) drc -= Qfull_[slots_[j] * S + s] * dtheta_[slots_[j]];
      if (drc < -kSlopeTol) consider(m_ + s, side_reduced_cost(s), drc);
    }
    if (enter < 0 || lambda + step >= 1.0) break;
    lambda += step;
    for (i64 s = 0; s < S; ++s) scost_[s] = start_[s] + lambda * slope_[s];
    fresh_ = false;
    flip_rounds_ = 0;
    ++it_;
    stats_[kPivots] += 1;
    stats_[kHomotopy] += 1;
    const int r = pivot_through_sides(enter);
    if (r == kRetry) {
      --it_;
      stats_[kPivots] -= 1;
      stats_[kHomotopy] -= 1;
      continue;
    }
    if (++since_refresh_ >= kRefreshEvery) need_refresh_ = true;
    if (r != kDone) return r;
  }
  scost_.assign(target_.begin(), target_.end());
  return -1;
}

int SideSimplex::run() {
  if (!setup()) return kInvalidBasis;
  if (!compact()) return kSingular;
  perturb();
  int status = -1;
  if (in_.start != nullptr && in_.price_sides && K_ == 0) {
    lifting_ = true;
    status = homotopy();
    lifting_ = false;
  }
  while (status < 0) {
    if (need_refresh_) {
      const int r = refresh();
      if (r > 0) {
        status = r;
        break;
      }
      if (r < 0) continue;
    }
    solve_theta();
    if (it_ >= in_.max_iter || stats_[kSidePivots] >= in_.max_side_pivots) {
      status = kIterationLimit;
      break;
    }
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
    if (!in_tree && ++since_refresh_ >= kRefreshEvery) need_refresh_ = true;
    if (r != kDone) status = r;
  }
  // potentials (node 0 at 0) and the basic side columns, also after a failure: the basis is valid
  if (status < 0) status = it_ < in_.max_iter ? kOptimal : kIterationLimit;
  const double origin = pi_rel_[0] + theta_[tid_[0]];
  for (i64 u = 0; u < N_; ++u) out_.pi[u] = pi_rel_[u] + theta_[tid_[u]] - origin;
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
                 i64 max_side_pivots, i64 block, py::array X, py::array MU, py::array pi, py::array stats, py::object start) {
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
  py::array start_arr;
  if (!start.is_none()) {
    start_arr = start.cast<py::array>();
    in.start = in_ptr<double>(start_arr, in.S, "start");
  }
  in.max_iter = max_iter;
  in.max_side_pivots = max_side_pivots;
  in.block = std::max<i64>(block, 1);
  for (i64 a = 0; a < in.m; ++a) {
    if (in.tail[a] < 0 || in.tail[a] >= in.N || in.head[a] < 0 || in.head[a] >= in.N || in.partner[a] >= in.m)
      throw std::invalid_argument("arc " + std::to_string(a) + " out of range");
  }
  for (i64 s = 0; s < in.S; ++s) {
    if (in.sptr[s + 1] < in.sptr[s] || (in.sptr[s + 1] - in.sptr[s]) % 2 != 0)
      throw std::invalid_argument("side column " + std::to_string(s) + ": expected pairs of entries");
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
