// emulate.cpp: runs rtnq's CUDA kernels, from their own source, on the CPU (see simt.h for the model).
// Built by `make -C cuda` as build/librtnq_emu.so with the host C++ compiler; used only by tests. The same library
// carries the kernels' host references (host_ref.cpp, declared in host_ref.h); both model mma.sync with mma_model.h.
//
// Exported (C):
//   rtnq_emu_dequantize(qweight, scales, out, n, k, bits, group_size, dtype, layout, seed)
//   rtnq_emu_gemm_small_m(x, qweight, scales, out, m, n, k, bits, group_size, dtype, splits, seed)
//   rtnq_emu_gemm_tensor_core(x, qweight, scales, out, m, n, k, bits, group_size, dtype, splits, seed)
//   rtnq_emu_last_error()
// Host pointers, the same layouts as the library's entry points. seed 0 runs threads and blocks in order;
// another seed shuffles both. Returns 0, or 1 with rtnq_emu_last_error() describing an emulation failure
// (deadlock, divergent barrier or collective, split-K counters not reset, an access past the end of a buffer).
// Every buffer the kernel sees (inputs, output, workspace) is a copy that ends right before a PROT_NONE page,
// so reading or writing past its end faults; the fault is caught and reported instead of crashing.

// Keywords first, before any CUDA header defines them for a host compiler.
#define RTNQ_EMULATE 1
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime.h>  // before simt.h's macros: it declares threadIdx & co. for host compilers

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../src/dequant_kernel.cuh"
#include "../src/small_m_kernel.cuh"
#include "../src/tc_kernel.cuh"
#include "mma_model.h"

namespace rtnq_emu {
namespace {

enum class State { Runnable, AtBarrier, AtCollective, Done };
enum class Kind { None, Shfl, Ldsm, Mma };

struct Copy {
    void *dst;
    const void *src;
    int group;
};

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    uint3 tid;
    State state = State::Runnable;
    std::vector<Copy> copies;  // issued, not yet completed cp.async
    int committed = 0;         // groups committed so far
};

struct Slot {  // one lane's operands / results of a warp collective
    float f;
    int imm;
    const void *addr;
    MmaLane mma;
    uint32_t r[4];
    bool bf16;
};

struct Emu {
    dim3 grid, block;
    uint3 bidx;
    std::vector<Fiber> fibers;
    std::vector<unsigned char> smem;
    unsigned char *smem_base = nullptr;
    ucontext_t sched;
    int cur = -1;
    std::function<void()> body;
    std::vector<Kind> warp_kind;
    std::vector<Slot> slots;
    std::string error;
};

Emu g;
constexpr size_t kStack = 256 * 1024;

Fiber &me() { return g.fibers[g.cur]; }

void yield_to_scheduler() { swapcontext(&me().ctx, &g.sched); }

void trampoline() {
    g.body();
    me().state = State::Done;
    swapcontext(&me().ctx, &g.sched);
}

void set_error(const std::string &msg) {
    if (g.error.empty()) g.error = msg;
}

// Collective entry: deposit operands in the lane's slot, wait for the whole warp, return with results.
Slot &collective(Kind kind) {
    const int warp = g.cur / 32;
    Kind &k = g.warp_kind[warp];
    if (k != Kind::None && k != kind)
        set_error("warp " + std::to_string(warp) + ": lanes reached different warp-collective instructions");
    k = kind;
    me().state = State::AtCollective;
    return g.slots[g.cur];
}

void resolve_warp(int warp) {
    Slot *s = &g.slots[warp * 32];
    switch (g.warp_kind[warp]) {
        case Kind::Shfl: {
            float v[32];
            for (int l = 0; l < 32; ++l) v[l] = s[l ^ s[l].imm].f;
            for (int l = 0; l < 32; ++l) s[l].f = v[l];
            break;
        }
        case Kind::Ldsm:  // register j of lane l: row l/4, 32-bit word l%4 of tile j (row address from lane 8j + l/4)
            for (int l = 0; l < 32; ++l)
                for (int j = 0; j < 4; ++j)
                    memcpy(&s[l].r[j], static_cast<const unsigned char *>(s[8 * j + (l >> 2)].addr) + 4 * (l & 3), 4);
            break;
        case Kind::Mma: {
            MmaLane lanes[32];
            for (int l = 0; l < 32; ++l) lanes[l] = s[l].mma;
            mma_m16n8k16(lanes, s[0].bf16);
            for (int l = 0; l < 32; ++l) s[l].mma = lanes[l];
            break;
        }
        case Kind::None:
            break;
    }
    g.warp_kind[warp] = Kind::None;
    for (int l = 0; l < 32; ++l) g.fibers[warp * 32 + l].state = State::Runnable;
}

// Run one block to completion; false (with g.error) on a deadlock or a divergent barrier/collective.
bool run_block(uint3 bidx, std::mt19937 *rng) {
    const int n = static_cast<int>(g.block.x);
    g.bidx = bidx;
    std::fill(g.smem.begin(), g.smem.end(), static_cast<unsigned char>(0xCD));  // stale-looking shared memory
    g.warp_kind.assign((n + 31) / 32, Kind::None);
    g.slots.assign(static_cast<size_t>(n), Slot{});
    for (int i = 0; i < n; ++i) {
        Fiber &f = g.fibers[i];
        f.tid = make_uint3(static_cast<unsigned>(i), 0, 0);
        f.state = State::Runnable;
        f.copies.clear();
        f.committed = 0;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, trampoline, 0);
    }
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    const int warps = (n + 31) / 32;
    std::vector<char> paused(warps, 0);
    // With a seed every warp gets its own speed (the chance it runs in a given pass), so warps drift far apart
    // as they may on hardware, and a missing barrier between them changes the result.
    std::vector<double> speed(warps, 1.0);
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    if (rng)
        for (double &v : speed) v = 0.1 + 0.9 * unit(*rng);
    for (;;) {
        bool progress = false;
        if (rng) {
            std::shuffle(order.begin(), order.end(), *rng);
            bool any = false;
            for (int w = 0; w < warps; ++w) {
                paused[w] = unit(*rng) >= speed[w];
                for (int l = 0; l < 32 && !paused[w] && !any; ++l) any = g.fibers[w * 32 + l].state == State::Runnable;
            }
            if (!any) std::fill(paused.begin(), paused.end(), 0);
        }
        for (int i : order) {
            if (g.fibers[i].state != State::Runnable || paused[i / 32]) continue;
            g.cur = i;
            swapcontext(&g.sched, &g.fibers[i].ctx);
            progress = true;
            if (!g.error.empty()) return false;
        }
        int done = 0, at_barrier = 0;
        for (const Fiber &f : g.fibers) {
            done += f.state == State::Done;
            at_barrier += f.state == State::AtBarrier;
        }
        if (done == n) return true;
        for (int w = 0; w < (n + 31) / 32; ++w) {
            int arrived = 0;
            for (int l = 0; l < 32; ++l) arrived += g.fibers[w * 32 + l].state == State::AtCollective;
            if (arrived == 32) {
                resolve_warp(w);
                progress = true;
            }
        }
        if (at_barrier == n) {
            for (Fiber &f : g.fibers) f.state = State::Runnable;
            progress = true;
        } else if (at_barrier > 0 && done > 0) {
            set_error("__syncthreads reached after " + std::to_string(done) + " threads of the block exited");
            return false;
        }
        if (!progress) {
            set_error("deadlock: threads wait at a barrier or warp collective that not all threads reach");
            return false;
        }
    }
}

}  // namespace

const uint3 &thread_idx() { return me().tid; }
const uint3 &block_idx() { return g.bidx; }
const dim3 &block_dim() { return g.block; }
const dim3 &grid_dim() { return g.grid; }
unsigned char *dynamic_smem_base() { return g.smem_base; }

void syncthreads() {
    me().state = State::AtBarrier;
    yield_to_scheduler();
}

float shfl_xor(float v, int lane_mask) {
    Slot &s = collective(Kind::Shfl);
    s.f = v;
    s.imm = lane_mask;
    yield_to_scheduler();
    return g.slots[g.cur].f;
}

void ldmatrix_x4(uint32_t (&r)[4], const void *smem) {
    Slot &s = collective(Kind::Ldsm);
    s.addr = smem;
    yield_to_scheduler();
    memcpy(r, g.slots[g.cur].r, sizeof(r));
}

void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
    Slot &s = collective(Kind::Mma);
    memcpy(s.mma.a, a, sizeof(s.mma.a));
    s.mma.b0 = b0;
    s.mma.b1 = b1;
    memcpy(s.mma.d, d, sizeof(s.mma.d));
    s.bf16 = bf16;
    yield_to_scheduler();
    memcpy(d, g.slots[g.cur].mma.d, sizeof(d));
}

void cp_async(void *dst, const void *src) { me().copies.push_back(Copy{dst, src, me().committed}); }

void cp_async_commit() { ++me().committed; }

void cp_async_wait(int pending) {
    Fiber &f = me();
    std::vector<Copy> keep;
    for (const Copy &c : f.copies) {
        if (c.group < f.committed - pending) {
            if (c.src)
                memcpy(c.dst, c.src, 16);
            else
                memset(c.dst, 0, 16);
        } else {
            keep.push_back(c);
        }
    }
    f.copies.swap(keep);
}

// ---- Out-of-bounds detection ----------------------------------------------------------------------------------
// A copy of a buffer placed so that it ends exactly where an inaccessible guard page begins.
struct Guarded {
    std::string name;
    unsigned char *map = nullptr;
    size_t map_len = 0;
    unsigned char *data = nullptr;
    size_t bytes = 0;
    Guarded(const std::string &what, const void *src, size_t n) : name(what), bytes(n) {
        const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        const size_t body = (n + page - 1) / page * page;
        map_len = body + page;
        map = static_cast<unsigned char *>(mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
        mprotect(map + body, page, PROT_NONE);
        data = map + body - n;  // n is a multiple of 16, so data stays 16-byte aligned
        if (src) memcpy(data, src, n);
    }
    Guarded(const Guarded &) = delete;
    Guarded &operator=(const Guarded &) = delete;
    ~Guarded() { munmap(map, map_len); }
    bool guard_hit(const void *addr) const {
        const unsigned char *a = static_cast<const unsigned char *>(addr);
        return a >= data + bytes && a < map + map_len;
    }
};

std::vector<const Guarded *> g_guarded;
sigjmp_buf g_fault_jump;

void on_fault(int, siginfo_t *info, void *) {
    std::string where = "an unknown address";
    for (const Guarded *b : g_guarded)
        if (b->guard_hit(info->si_addr))
            where = "byte " + std::to_string(static_cast<const unsigned char *>(info->si_addr) - (b->data + b->bytes)) +
                    " past the end of " + b->name;
    set_error("memory fault in the kernel: access to " + where + " (block " + std::to_string(g.bidx.x) + "," +
              std::to_string(g.bidx.y) + "," + std::to_string(g.bidx.z) + ", thread " + std::to_string(g.cur) + ")");
    siglongjmp(g_fault_jump, 1);
}

// Launch `body` over the grid, blocks in order or shuffled.
bool launch_blocks(dim3 grid, dim3 block, size_t dyn_smem, unsigned seed, const std::function<void()> &body);

bool launch(dim3 grid, dim3 block, size_t dyn_smem, unsigned seed, const std::function<void()> &body,
            const std::vector<const Guarded *> &buffers) {
    struct sigaction act {}, old_segv {}, old_bus {};
    act.sa_sigaction = on_fault;
    act.sa_flags = SA_SIGINFO;
    sigemptyset(&act.sa_mask);
    g_guarded = buffers;
    sigaction(SIGSEGV, &act, &old_segv);
    sigaction(SIGBUS, &act, &old_bus);
    bool ok = false;
    if (sigsetjmp(g_fault_jump, 1) == 0) ok = launch_blocks(grid, block, dyn_smem, seed, body);
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    g_guarded.clear();
    return ok && g.error.empty();
}

bool launch_blocks(dim3 grid, dim3 block, size_t dyn_smem, unsigned seed, const std::function<void()> &body) {
    g.grid = grid;
    g.block = block;
    g.body = body;
    g.error.clear();
    g.smem.assign(dyn_smem + 16, 0);
    g.smem_base = reinterpret_cast<unsigned char *>((reinterpret_cast<uintptr_t>(g.smem.data()) + 15) & ~uintptr_t(15));
    if (g.fibers.size() < block.x) {
        g.fibers.resize(block.x);
        for (Fiber &f : g.fibers)
            if (f.stack.size() < kStack) f.stack.resize(kStack);
    }
    std::vector<uint3> blocks;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(make_uint3(x, y, z));
    std::mt19937 rng(seed);
    if (seed) std::shuffle(blocks.begin(), blocks.end(), rng);
    for (const uint3 &b : blocks)
        if (!run_block(b, seed ? &rng : nullptr)) return false;
    return true;
}

}  // namespace rtnq_emu

using namespace rtnq;

namespace {

dim3 to_dim3(const Grid3 &g) {
    return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

size_t elems_bytes(int64_t a, int64_t b, size_t elem) { return static_cast<size_t>(a) * static_cast<size_t>(b) * elem; }

// Inputs and output as guarded copies; the output is copied back after a successful run.
struct Buffers {
    rtnq_emu::Guarded x, qweight, scales, out, counters, partials;
    Buffers(const void *x_, size_t x_bytes, const void *qw, size_t qw_bytes, const void *s, size_t s_bytes, void *o,
            size_t o_bytes, size_t partial_floats)
        : x("x", x_, x_bytes), qweight("qweight", qw, qw_bytes), scales("scales", s, s_bytes), out("out", o, o_bytes),
          counters("the split-K counters", nullptr, kCounterInts * 4),
          partials("the split-K partials", nullptr, std::max<size_t>(partial_floats, 4) * 4),
          dst(o) {
        memset(counters.data, 0, counters.bytes);
        const float nan = std::nanf("");
        for (size_t i = 0; i < partials.bytes / 4; ++i) memcpy(partials.data + 4 * i, &nan, 4);
    }
    std::vector<const rtnq_emu::Guarded *> all() const { return {&x, &qweight, &scales, &out, &counters, &partials}; }
    int finish(bool ok, bool check_counters) {
        if (!ok) return 1;
        if (check_counters)
            for (size_t i = 0; i < counters.bytes; ++i)
                if (counters.data[i]) {
                    rtnq_emu::g.error = "split-K counters were not reset to zero";
                    return 1;
                }
        memcpy(dst, out.data, out.bytes);
        return 0;
    }
    void *dst;
};

template <int BITS, typename T>
int emu_dequant(const void *qw, const void *s, void *out, int64_t n, int64_t k, Groups g, int layout, unsigned seed) {
    Buffers b(nullptr, 16, qw, elems_bytes(k / 16, n * BITS / 2, 4), s, elems_bytes(g.rows, n, 2), out,
              elems_bytes(n, k, 2), 0);
    const dim3 grid(static_cast<unsigned>(n / kBlockN), static_cast<unsigned>(k / dequant::kTileK));
    const bool ok = rtnq_emu::launch(grid, dim3(256), 0, seed, [&] {
        dequant::dequant_kernel<BITS, T>(reinterpret_cast<const int4 *>(b.qweight.data), reinterpret_cast<const T *>(b.scales.data),
                                         reinterpret_cast<T *>(b.out.data), n, k, g.channelwise ? 0 : static_cast<int>(g.size),
                                         g.channelwise ? 1 : 0, layout);
    }, b.all());
    return b.finish(ok, false);
}

template <int BITS, typename T, int MT>
int emu_small_m(const void *x, const void *qw, const void *s, void *out, int64_t m, int64_t n, int64_t k, Groups g,
                int splits, unsigned seed) {
    const Grid3 grid = small_m_grid(m, n, MT, splits);
    Buffers b(x, elems_bytes(m, k, 2), qw, elems_bytes(k / 16, n * BITS / 2, 4), s, elems_bytes(g.rows, n, 2), out,
              elems_bytes(m, n, 2), static_cast<size_t>(grid.x * grid.z) * splits * MT * kBlockN);
    const bool ok = rtnq_emu::launch(to_dim3(grid), dim3(256), 0, seed, [&] {
        small_m::small_m_kernel<BITS, T, MT>(reinterpret_cast<const T *>(b.x.data), reinterpret_cast<const int4 *>(b.qweight.data),
                                             reinterpret_cast<const T *>(b.scales.data), reinterpret_cast<T *>(b.out.data),
                                             reinterpret_cast<float *>(b.partials.data), reinterpret_cast<int *>(b.counters.data),
                                             static_cast<int>(m), n, k, g.channelwise ? 0 : static_cast<int>(g.size),
                                             g.channelwise ? 1 : 0, splits);
    }, b.all());
    return b.finish(ok, true);
}

template <int BITS, typename T, class C>
int emu_tc(const void *x, const void *qw, const void *s, void *out, int64_t m, int64_t n, int64_t k, Groups g,
           int splits, unsigned seed) {
    const Grid3 grid = tc_grid<C>(m, n, splits);
    Buffers b(x, elems_bytes(m, k, 2), qw, elems_bytes(k / 16, n * BITS / 2, 4), s, elems_bytes(g.rows, n, 2), out,
              elems_bytes(m, n, 2), static_cast<size_t>(grid.x * grid.y) * splits * C::BM * C::BN);
    const bool ok = rtnq_emu::launch(to_dim3(grid), dim3(256), TcSmem<BITS, C>::TOTAL, seed, [&] {
        tc_kernel<BITS, T, C>(reinterpret_cast<const T *>(b.x.data), reinterpret_cast<const int4 *>(b.qweight.data),
                              reinterpret_cast<const T *>(b.scales.data), reinterpret_cast<T *>(b.out.data),
                              reinterpret_cast<float *>(b.partials.data), reinterpret_cast<int *>(b.counters.data), m, n, k,
                              g.channelwise ? 0 : static_cast<int>(g.size), g.channelwise ? 1 : 0, splits);
    }, b.all());
    return b.finish(ok, true);
}

template <int BITS, typename T>
int emu_small_m_rows(const void *x, const void *qw, const void *s, void *out, int64_t m, int64_t n, int64_t k,
                     Groups g, int splits, unsigned seed) {
    switch (small_m_rows(m)) {
        case 1: return emu_small_m<BITS, T, 1>(x, qw, s, out, m, n, k, g, splits, seed);
        case 2: return emu_small_m<BITS, T, 2>(x, qw, s, out, m, n, k, g, splits, seed);
        case 4: return emu_small_m<BITS, T, 4>(x, qw, s, out, m, n, k, g, splits, seed);
        default: return emu_small_m<BITS, T, 8>(x, qw, s, out, m, n, k, g, splits, seed);
    }
}

template <int BITS, typename T>
int emu_tc_cfg(const void *x, const void *qw, const void *s, void *out, int64_t m, int64_t n, int64_t k, Groups g,
               int splits, unsigned seed) {
    switch (tc_config_index(m)) {
        case 0: return emu_tc<BITS, T, TcSmall<BITS>>(x, qw, s, out, m, n, k, g, splits, seed);
        case 1: return emu_tc<BITS, T, TcMid<BITS>>(x, qw, s, out, m, n, k, g, splits, seed);
        default: return emu_tc<BITS, T, TcLarge<BITS>>(x, qw, s, out, m, n, k, g, splits, seed);
    }
}

bool bad_args(int64_t n, int64_t k, int bits, int group_size, int dtype) {
    if ((bits != 4 && bits != 8) || (dtype != 0 && dtype != 1) || n <= 0 || k <= 0 || n % 64 || k % 128 ||
        (group_size != -1 && group_size != 32 && group_size != 64 && group_size != 128)) {
        rtnq_emu::g.error = "invalid arguments";
        return true;
    }
    return false;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) const char *rtnq_emu_last_error(void) { return rtnq_emu::g.error.c_str(); }

__attribute__((visibility("default"))) int rtnq_emu_dequantize(const void *qweight, const void *scales, void *out,
                                                               int64_t n, int64_t k, int32_t bits, int32_t group_size,
                                                               int32_t dtype, int32_t layout, uint32_t seed) {
    rtnq_emu::g.error.clear();
    if (bad_args(n, k, bits, group_size, dtype)) return 1;
    const Groups g = make_groups(k, group_size);
    if (dtype == RTNQ_BFLOAT16)
        return bits == 4 ? emu_dequant<4, __nv_bfloat16>(qweight, scales, out, n, k, g, layout, seed)
                         : emu_dequant<8, __nv_bfloat16>(qweight, scales, out, n, k, g, layout, seed);
    return bits == 4 ? emu_dequant<4, __half>(qweight, scales, out, n, k, g, layout, seed)
                     : emu_dequant<8, __half>(qweight, scales, out, n, k, g, layout, seed);
}

__attribute__((visibility("default"))) int rtnq_emu_gemm_small_m(const void *x, const void *qweight, const void *scales,
                                                                 void *out, int64_t m, int64_t n, int64_t k,
                                                                 int32_t bits, int32_t group_size, int32_t dtype,
                                                                 int32_t splits, uint32_t seed) {
    rtnq_emu::g.error.clear();
    if (bad_args(n, k, bits, group_size, dtype) || m <= 0 || splits < 1) return 1;
    const Groups g = make_groups(k, group_size);
    if (dtype == RTNQ_BFLOAT16)
        return bits == 4 ? emu_small_m_rows<4, __nv_bfloat16>(x, qweight, scales, out, m, n, k, g, splits, seed)
                         : emu_small_m_rows<8, __nv_bfloat16>(x, qweight, scales, out, m, n, k, g, splits, seed);
    return bits == 4 ? emu_small_m_rows<4, __half>(x, qweight, scales, out, m, n, k, g, splits, seed)
                     : emu_small_m_rows<8, __half>(x, qweight, scales, out, m, n, k, g, splits, seed);
}

__attribute__((visibility("default"))) int rtnq_emu_gemm_tensor_core(const void *x, const void *qweight,
                                                                     const void *scales, void *out, int64_t m,
                                                                     int64_t n, int64_t k, int32_t bits,
                                                                     int32_t group_size, int32_t dtype, int32_t splits,
                                                                     uint32_t seed) {
    rtnq_emu::g.error.clear();
    if (bad_args(n, k, bits, group_size, dtype) || m <= 0 || splits < 1) return 1;
    const Groups g = make_groups(k, group_size);
    if (dtype == RTNQ_BFLOAT16)
        return bits == 4 ? emu_tc_cfg<4, __nv_bfloat16>(x, qweight, scales, out, m, n, k, g, splits, seed)
                         : emu_tc_cfg<8, __nv_bfloat16>(x, qweight, scales, out, m, n, k, g, splits, seed);
    return bits == 4 ? emu_tc_cfg<4, __half>(x, qweight, scales, out, m, n, k, g, splits, seed)
                     : emu_tc_cfg<8, __half>(x, qweight, scales, out, m, n, k, g, splits, seed);
}

}  // extern "C"
