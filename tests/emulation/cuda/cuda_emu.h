// cuda_emu.h - the CUDA execution model on the CPU, for running the project's .cu kernels in tests.
//
// rewrite.py turns a kernel source into plain C++ that includes this header and compiles it with g++.
// What a GPU does in hardware is modelled here in software, one launch at a time:
//
//   * Every CUDA thread is a *fiber*: a function with its own small stack that can be paused and resumed
//     (ucontext's makecontext / swapcontext, or on x86-64 the same idea in 14 instructions). All fibers of a
//     block run on one OS thread; the scheduler picks one, runs it until it must wait, then picks another.
//     Blocks run one after another.
//   * __syncthreads() pauses the fiber until every thread of the block has arrived (a barrier). Warp
//     collectives (__shfl_*_sync, mma.sync, ldmatrix) pause it until every lane named in the mask has arrived, then
//     exchange the values and resume them all. Every barrier and collective is a switch point, so the order in
//     which threads run between them is the scheduler's choice: in order, reversed, shuffled, warps skewed.
//     A kernel that is only correct in one order (a missing barrier) gives different results in another.
//   * Kernel pointers become emu::ptr<T>: a pointer that knows the allocation it points into and checks every
//     access (bounds and alignment). __shared__ arrays live in a per-block arena filled with 0xFF bytes (NaN)
//     when the block starts; indexing them is checked too.
//   * Anything a GPU would hide (an out-of-bounds access, a barrier some threads never reach, a shuffle with
//     a lane that has exited, a deadlock) throws emu::Fault inside the fiber; the launch stops and Python
//     raises it as an exception naming the kernel, the block and the thread. A crash in a fiber (stack
//     overflow, wild local pointer) is caught by a signal handler and reported the same way.
#pragma once

#include <ucontext.h>
#include <signal.h>
#include <sys/mman.h>
#include <xmmintrin.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

// ------------------------------------------------------------------------------------- CUDA keywords
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __align__(n) alignas(n)

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace emu {

// ------------------------------------------------------------------------------------------ errors
struct Fault {
    std::string msg;
};

// ------------------------------------------------------------------------------- launch description
// Filled in by the Python driver (emulator.py) through ctypes; the layouts must match its ctypes classes.
struct Arg {                 // one kernel argument
    uint64_t value;          // the pointer, or the scalar's bytes
    uint64_t lo, hi;         // for pointers: the allocation it points into, [lo, hi) (0, 0 for NULL)
};

struct Launch {
    unsigned grid[3], block[3];
    uint64_t dynamic_smem;   // bytes of extern __shared__ memory
    int schedule;            // 0 in order, 1 reversed, 2 shuffled, 3 warps skewed
    uint64_t seed;
    int trace;               // 1: print every barrier, collective and thread exit
    const char* kernel;      // for messages
    const char* const* arg_names;  // "argument 'out'" ... indexed like the Arg array
    int nargs;
};

// ------------------------------------------------------------------------------ switching stacks
// A fiber's context is where its stack pointer (and saved registers) were when it last paused. Switching
// means: save ours, load theirs, continue where they left off. ucontext's swapcontext does that portably but
// also saves the signal mask with a system call each time; on x86-64 the six callee-saved registers and the
// stack pointer are all a switch needs (the System V ABI lets every other register be clobbered by a call),
// which is ~50x cheaper. Build with -DEMU_USE_UCONTEXT to use ucontext everywhere.
#if defined(__x86_64__) && !defined(EMU_USE_UCONTEXT)
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
    .pushsection .text
    .globl emu_switch_stack
    .hidden emu_switch_stack
    .type emu_switch_stack, @function
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_stack, .-emu_switch_stack
    .popsection
)");

struct Context {
    void* sp = nullptr;
};
inline void context_switch(Context& from, Context& to) { emu_switch_stack(&from.sp, to.sp); }
// A new fiber's stack looks as if it had paused in emu_switch_stack: six saved registers (zeros), then the
// return address = entry. The slot for entry is 16-byte aligned, as a function expects right after a call.
inline void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + size)) & ~uintptr_t(15);
    void** sp = (void**)(top - 16);
    sp[0] = (void*)entry;
    sp[1] = nullptr;
    sp -= 6;
    for (int i = 0; i < 6; i++) sp[i] = nullptr;
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

enum State { READY, AT_BARRIER, AT_WARP, DONE };
enum Collective { SHFL_XOR, SHFL_IDX, SHFL_DOWN, SHFL_UP, MMA_M16N8K16_BF16, SYNCWARP, BALLOT, LDMATRIX };
static const char* const COLLECTIVE_NAMES[] = {"__shfl_xor_sync", "__shfl_sync", "__shfl_down_sync",
                                               "__shfl_up_sync", "mma.sync.m16n8k16", "__syncwarp",
                                               "__ballot_sync/__any_sync/__all_sync", "ldmatrix.sync.m8n8"};

// One cp.async copy in flight (ptx_models.h): the 16 bytes read from global memory when it was issued, and the
// shared address where they land when this thread's cp.async.wait_group / wait_all covers its group.
struct AsyncCopy {
    char* dst;
    unsigned char bytes[16];
    int group;               // -1 until cp.async.commit_group puts it into this thread's next group
};

struct Fiber {               // one CUDA thread
    Context ctx;
    State state;
    uint3 tid;
    int linear, warp, lane;
    int line;                // source line of the barrier / collective it waits at
    // the warp collective it waits at: its kind, mask and this lane's inputs; outputs are written back here
    int kind;
    unsigned mask;
    int param;               // shuffle offset / source lane
    uint32_t in[10];
    uint32_t out[4];
    std::vector<AsyncCopy> async;   // this thread's cp.async copies not yet landed
    int async_groups;               // groups this thread has committed so far
};

// One launch's state. A single OS thread runs a launch (the Python driver holds a lock), so plain globals.
struct Machine {
    const Launch* L = nullptr;
    uint3 blockIdx{0, 0, 0};
    dim3 blockDim, gridDim;
    int nthreads = 0, nwarps = 0;
    std::vector<Fiber> fibers;
    Fiber* cur = nullptr;
    Context scheduler;
    std::function<void()> body;            // calls the kernel with its arguments
    std::string error;                     // set by a fault: the launch stops
    std::mt19937_64 rng;
    std::vector<int> warp_order;           // schedule 3: the order in which warps are preferred
    std::vector<uint32_t> ready;           // per warp: bit l set when lane l is runnable
    int at_barrier = 0, done = 0;
    // per-thread stacks, reused across blocks and launches
    char* stacks = nullptr;
    size_t stack_bytes = 0, nstacks = 0;
    // shared memory arena of the current block
    char arena[96 * 1024] __attribute__((aligned(64)));
    size_t arena_used = 0, static_smem = 0;
    std::vector<void*> shared_slots;       // address of each __shared__ declaration in this block
    std::vector<const char*> shared_names; // and its name, for messages
    std::vector<size_t> shared_sizes;      // and its size in bytes (for addresses in the shared state space)
    char signal_stack[64 * 1024];          // where the crash handler runs (the fiber's stack may be full)
};

inline Machine& M() {
    static Machine m;
    return m;
}

inline std::string where() {
    Machine& m = M();
    char buf[160];
    if (m.cur)
        snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", m.blockIdx.x, m.blockIdx.y, m.blockIdx.z,
                 m.cur->tid.x, m.cur->tid.y, m.cur->tid.z);
    else
        snprintf(buf, sizeof buf, "block (%u,%u,%u)", m.blockIdx.x, m.blockIdx.y, m.blockIdx.z);
    return buf;
}

[[noreturn]] inline void fault(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    throw Fault{std::string(buf) + " [" + where() + "]"};
}

// ----------------------------------------------------------------------------------- the scheduler
// Give control back to the scheduler; returns when this fiber is picked again.
inline void switch_to_scheduler() {
    Machine& m = M();
    Fiber* f = m.cur;
    context_switch(f->ctx, m.scheduler);
    if (!m.error.empty()) throw Fault{""};   // another thread faulted: unwind this one quietly
}

inline void make_ready(Fiber& f) {
    f.state = READY;
    M().ready[f.warp] |= 1u << f.lane;
}

// The schedule's choice among the runnable threads, or -1 if none is runnable.
inline int pick() {
    Machine& m = M();
    int s = m.L->schedule;
    if (s == 2) {                            // shuffled: a random runnable thread
        int n = 0;
        for (int w = 0; w < m.nwarps; w++) n += __builtin_popcount(m.ready[w]);
        if (n == 0) return -1;
        int k = (int)(m.rng() % n);
        for (int w = 0; w < m.nwarps; w++) {
            int c = __builtin_popcount(m.ready[w]);
            if (k < c) {
                uint32_t bits = m.ready[w];
                for (int i = 0; i < k; i++) bits &= bits - 1;   // drop the k lowest set bits
                return w * 32 + __builtin_ctz(bits);
            }
            k -= c;
        }
    }
    for (int i = 0; i < m.nwarps; i++) {
        int w = s == 1 ? m.nwarps - 1 - i : (s == 3 ? m.warp_order[i] : i);
        uint32_t bits = m.ready[w];
        if (bits) return w * 32 + (s == 1 ? 31 - __builtin_clz(bits) : __builtin_ctz(bits));
    }
    return -1;
}

// Schedule 2 also switches at some memory accesses, so that threads interleave between barriers as well.
inline void on_memory_access() {
    Machine& m = M();
    if (m.L->schedule == 2 && (m.rng() & 7) == 0) {
        make_ready(*m.cur);
        switch_to_scheduler();
    }
}

inline void trace(const char* what, int line) {
    Machine& m = M();
    if (!m.L->trace) return;
    if (line > 0) printf("[%s] %s (line %d)\n", where().c_str(), what, line);
    else printf("[%s] %s\n", where().c_str(), what);
}

// ----------------------------------------------------------------------------------------- barrier
inline void syncthreads(int line) {
    Machine& m = M();
    Fiber* f = m.cur;
    trace("__syncthreads", line);
    if (m.done > 0) {
        for (Fiber& o : m.fibers)
            if (o.state == DONE)
                fault("__syncthreads at line %d can never complete: thread (%u,%u,%u) has already exited", line,
                      o.tid.x, o.tid.y, o.tid.z);
    }
    f->state = AT_BARRIER;
    f->line = line;
    if (++m.at_barrier == m.nthreads) {      // the last one to arrive releases everyone
        for (Fiber& o : m.fibers)
            if (o.line != line)
                fault("threads wait at different __syncthreads: thread (%u,%u,%u) at line %d, this one at line %d",
                      o.tid.x, o.tid.y, o.tid.z, o.line, line);
        m.at_barrier = 0;
        for (Fiber& o : m.fibers) make_ready(o);
    }
    switch_to_scheduler();                   // a switch at every barrier, even the one that completes it
}

// ------------------------------------------------------------------------------- warp collectives
inline void mma_m16n8k16_bf16(Fiber* lanes[32]);   // in ptx_models.h
inline void ldmatrix_m8n8(Fiber* lanes[32], int param, int line);

// This lane arrives at a warp collective; returns when all lanes of `mask` have arrived and exchanged.
inline void warp_collective(int kind, unsigned mask, int param, int line) {
    Machine& m = M();
    Fiber* f = m.cur;
    if (m.L->trace) trace(COLLECTIVE_NAMES[kind], line);
    if (!(mask >> f->lane & 1u)) fault("%s at line %d: the calling lane %d is not in the mask %#x",
                                       COLLECTIVE_NAMES[kind], line, f->lane, mask);
    f->state = AT_WARP;
    f->kind = kind;
    f->mask = mask;
    f->param = param;
    f->line = line;
    Fiber* lanes[32] = {};
    bool all = true;
    for (int l = 0; l < 32; l++) {
        if (!(mask >> l & 1u)) continue;
        int t = f->warp * 32 + l;
        if (t >= m.nthreads) fault("%s at line %d: mask %#x names lane %d, which this block does not have",
                                   COLLECTIVE_NAMES[kind], line, mask, l);
        Fiber& o = m.fibers[t];
        if (o.state == DONE) fault("%s at line %d: lane %d of the mask %#x has already exited",
                                   COLLECTIVE_NAMES[kind], line, l, mask);
        if (o.state != AT_WARP) { all = false; continue; }
        if (o.kind != kind || o.mask != mask)
            fault("lanes of one warp meet at different collectives: lane %d at %s (line %d, mask %#x), lane %d at "
                  "%s (line %d, mask %#x)", l, COLLECTIVE_NAMES[o.kind], o.line, o.mask, f->lane,
                  COLLECTIVE_NAMES[kind], line, mask);
        if (kind == LDMATRIX && o.param != param)
            fault("lanes of one warp meet at ldmatrix with different qualifiers (lane %d: %#x, lane %d: %#x)", l,
                  o.param, f->lane, param);
        lanes[l] = &o;
    }
    if (all) {                               // the last lane to arrive performs the exchange for everyone
        if (kind == MMA_M16N8K16_BF16) {
            if (mask != 0xffffffffu) fault("mma.sync needs all 32 lanes, mask %#x", mask);
            mma_m16n8k16_bf16(lanes);
        } else if (kind == LDMATRIX) {
            if (mask != 0xffffffffu) fault("ldmatrix.sync needs all 32 lanes, mask %#x", mask);
            ldmatrix_m8n8(lanes, param, line);
        } else if (kind == SYNCWARP) {
            // nothing to exchange: arriving together is the point
        } else if (kind == BALLOT) {             // bit l of the result: lane l's predicate
            uint32_t bits = 0;
            for (int l = 0; l < 32; l++)
                if (lanes[l] && lanes[l]->in[0]) bits |= 1u << l;
            for (int l = 0; l < 32; l++)
                if (lanes[l]) lanes[l]->out[0] = bits;
        } else {
            for (int l = 0; l < 32; l++) {
                if (!lanes[l]) continue;
                int src = kind == SHFL_XOR ? l ^ param : kind == SHFL_IDX ? (param & 31)
                        : kind == SHFL_DOWN ? l + param : l - param;
                if (src < 0 || src > 31) src = l;                 // down/up past the warp's edge: own value
                if (!lanes[src]) fault("%s at line %d: lane %d reads lane %d, which is not in the mask %#x",
                                       COLLECTIVE_NAMES[kind], line, l, src, mask);
                lanes[l]->out[0] = lanes[src]->in[0];
                lanes[l]->out[1] = lanes[src]->in[1];
            }
        }
        for (int l = 0; l < 32; l++)
            if (lanes[l]) make_ready(*lanes[l]);
    }
    switch_to_scheduler();
}

template <class T>
T shuffle(int kind, unsigned mask, T v, int param, int line) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    Fiber* f = M().cur;
    f->in[0] = f->in[1] = 0;
    memcpy(f->in, &v, sizeof(T));
    warp_collective(kind, mask, param, line);
    T r;
    memcpy(&r, f->out, sizeof(T));
    return r;
}

inline void syncwarp(int line, unsigned mask = 0xffffffffu) { warp_collective(SYNCWARP, mask, 0, line); }

inline unsigned ballot(unsigned mask, int predicate, int line) {
    Fiber* f = M().cur;
    f->in[0] = predicate != 0;
    warp_collective(BALLOT, mask, 0, line);
    return f->out[0];
}

// ------------------------------------------------------------------------------- checked pointers
// A pointer into one allocation: a kernel argument's array, or one __shared__ array. Arithmetic is free;
// every access checks that the element lies inside [lo, hi) and is aligned for its type. A pointer made from
// a plain address (a local variable's, `(const bf16_t*)&v`) is not checked: lo = 0, hi = max.
template <class T>
struct ptr {
    T* p = nullptr;
    const char* lo = nullptr;
    const char* hi = nullptr;
    int region = -1;                        // index of a kernel argument, or -1 (shared or local)

    ptr() = default;
    ptr(std::nullptr_t) {}
    ptr(T* raw) : p(raw), lo(nullptr), hi((const char*)UINTPTR_MAX) {}      // a local address: unchecked
    template <class U, class = std::enable_if_t<!std::is_convertible<U*, T*>::value>>
    explicit ptr(U* raw) : p((T*)raw), lo(nullptr), hi((const char*)UINTPTR_MAX) {}
    ptr(T* q, const char* lo_, const char* hi_, int r) : p(q), lo(lo_), hi(hi_), region(r) {}
    // float* -> const float*: implicit, like in C++; float* -> float4*: only by a cast, like in C++
    template <class U, std::enable_if_t<std::is_convertible<U*, T*>::value, int> = 0>
    ptr(const ptr<U>& o) : p(o.p), lo(o.lo), hi(o.hi), region(o.region) {}
    template <class U, std::enable_if_t<!std::is_convertible<U*, T*>::value, int> = 0>
    explicit ptr(const ptr<U>& o) : p((T*)o.p), lo(o.lo), hi(o.hi), region(o.region) {}

    explicit operator bool() const { return p != nullptr; }

    T& at(T* q) const {
        const char* c = (const char*)q;
        if (c < lo || c + sizeof(T) > hi || hi == nullptr) bad_access(q);
        if ((uintptr_t)q % alignof(T)) bad_access(q);
        on_memory_access();
        return *q;
    }
    [[noreturn]] void bad_access(T* q) const;

    T& operator*() const { return at(p); }
    template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
    T& operator[](I i) const { return at(p + i); }
    template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
    ptr operator+(I i) const { ptr r = *this; r.p += i; return r; }
    template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
    ptr operator-(I i) const { ptr r = *this; r.p -= i; return r; }
    template <class I> ptr& operator+=(I i) { p += i; return *this; }
    template <class I> ptr& operator-=(I i) { p -= i; return *this; }
    ptr& operator++() { ++p; return *this; }
    ptr operator++(int) { ptr r = *this; ++p; return r; }
    long long operator-(const ptr& o) const { return p - o.p; }
    bool operator==(std::nullptr_t) const { return p == nullptr; }
    bool operator!=(std::nullptr_t) const { return p != nullptr; }
    template <class U> bool operator==(const ptr<U>& o) const { return (const void*)p == (const void*)o.p; }
    template <class U> bool operator!=(const ptr<U>& o) const { return (const void*)p != (const void*)o.p; }
};

template <class T, class I, class = std::enable_if_t<std::is_integral<I>::value>>
ptr<T> operator+(I i, const ptr<T>& q) { return q + i; }

// reinterpret_cast<const float4*>(x) in a kernel becomes emu::ptr_cast<emu::ptr<const float4>>(x)
template <class P, class Q>
P ptr_cast(const Q& q) { return P(q); }

inline std::string region_name(int region, const char* lo) {
    Machine& m = M();
    if (region >= 0 && region < m.L->nargs) return m.L->arg_names[region];
    if (lo && lo >= m.arena && lo < m.arena + sizeof m.arena) return "shared memory";
    return "local memory";
}

template <class T>
void ptr<T>::bad_access(T* q) const {
    const char* c = (const char*)q;
    if (hi == nullptr) fault("null pointer dereference (%s)", region_name(region, lo).c_str());
    long long elem = (long long)(c - lo) / (long long)sizeof(T);
    if (c < lo || c + sizeof(T) > hi)
        fault("out-of-bounds access: %zu-byte element at byte offset %lld (element %lld) of %s, which has %lld "
              "bytes", sizeof(T), (long long)(c - lo), elem, region_name(region, lo).c_str(), (long long)(hi - lo));
    fault("misaligned access: %zu-byte element at byte offset %lld of %s needs %zu-byte alignment",
          sizeof(T), (long long)(c - lo), region_name(region, lo).c_str(), alignof(T));
}

// Build a kernel's pointer / scalar parameter from the Python driver's Arg.
template <class P> struct arg_of;
template <class T> struct arg_of<ptr<T>> {
    static ptr<T> get(const Arg& a, int i) {
        if (a.value == 0) return ptr<T>(nullptr, nullptr, nullptr, i);
        return ptr<T>((T*)a.value, (const char*)a.lo, (const char*)a.hi, i);
    }
};
template <class T> struct arg_of {
    static T get(const Arg& a, int) { T v; memcpy(&v, &a.value, sizeof v); return v; }
};
template <class P> P arg(const Arg* a, int i) { return arg_of<P>::get(a[i], i); }

// ---------------------------------------------------------------------------------- shared memory
// `__shared__ float sh[32];` becomes `auto& sh = emu::shared_var<float[32]>(id);`: the first thread of a
// block to reach the declaration takes the space from the arena, the others get the same array. The array
// type is wrapped in sarr, whose operator[] checks the index (also for 2-D arrays: sarr<float[8][32]>).
inline const char* shared_name(const void* p);
template <class A> struct sarr;
template <class E, size_t N> struct sarr<E[N]> {
    E data[N];
    using elem = std::remove_all_extents_t<E>;
    template <class I> auto& operator[](I i) {
        if (i < 0 || (size_t)i >= N)
            fault("out-of-bounds index %lld of __shared__ %s[%zu]", (long long)i, shared_name(this), N);
        on_memory_access();
        if constexpr (std::is_array<E>::value) return *reinterpret_cast<sarr<E>*>(&data[i]);
        else return data[i];
    }
    ptr<elem> as_ptr() {
        return ptr<elem>((elem*)data, (const char*)data, (const char*)data + sizeof data, -1);
    }
    operator ptr<elem>() { return as_ptr(); }
    operator ptr<const elem>() { return as_ptr(); }
    template <class I, class = std::enable_if_t<std::is_integral<I>::value>>
    ptr<elem> operator+(I i) { return as_ptr() + i; }
};

inline void* shared_alloc(size_t bytes) {
    Machine& m = M();
    size_t off = (m.arena_used + 15) & ~size_t(15);
    m.static_smem += bytes;
    if (m.static_smem + m.L->dynamic_smem > 48 * 1024)
        fault("shared memory %zu bytes static + %llu dynamic exceeds 48 KB (the limit without opt-in)",
              m.static_smem, (unsigned long long)m.L->dynamic_smem);
    m.arena_used = off + bytes + 16;         // 16 poisoned bytes between arrays
    return m.arena + off;
}

template <class A>
sarr<A>& shared_var(int id, const char* name) {
    Machine& m = M();
    if ((int)m.shared_slots.size() <= id) {
        m.shared_slots.resize(id + 1, nullptr);
        m.shared_names.resize(id + 1, nullptr);
        m.shared_sizes.resize(id + 1, 0);
    }
    if (!m.shared_slots[id]) {
        m.shared_slots[id] = shared_alloc(sizeof(A));
        m.shared_names[id] = name;
        m.shared_sizes[id] = sizeof(A);
    }
    return *reinterpret_cast<sarr<A>*>(m.shared_slots[id]);
}

// `__shared__ float total;` becomes `auto& total = emu::shared_scalar<float>(id, "total");`
template <class T>
T& shared_scalar(int id, const char* name) {
    return shared_var<T[1]>(id, name).data[0];
}

// The name of the __shared__ array that holds address p (the one starting closest below it).
inline const char* shared_name(const void* p) {
    Machine& m = M();
    const char* name = "?";
    const char* at = nullptr;
    for (size_t i = 0; i < m.shared_slots.size(); i++) {
        const char* slot = (const char*)m.shared_slots[i];
        if (slot && slot <= (const char*)p && slot > at) {
            at = slot;
            name = m.shared_names[i];
        }
    }
    return name;
}

// `extern __shared__ float smem[];` becomes `emu::ptr<float> smem = emu::dynamic_shared<float>();`
template <class T>
ptr<T> dynamic_shared() {
    Machine& m = M();
    char* base = m.arena + sizeof m.arena - ((m.L->dynamic_smem + 15) & ~uint64_t(15));
    return ptr<T>((T*)base, base, base + m.L->dynamic_smem, -1);
}

// `__cvta_generic_to_shared(p)` (a generic pointer -> its address in the shared state space, what ldmatrix and
// cp.async take) gives p's offset in the block's arena; shared_at turns such an address back into memory,
// checking that `bytes` bytes from it lie inside one __shared__ array (or the dynamic shared memory) and that it
// is aligned to `align`.
inline char* shared_at(uint64_t addr, size_t bytes, size_t align, const char* what, int line) {
    Machine& m = M();
    if (addr % align)
        fault("%s at line %d: shared address %#llx is not %zu-byte aligned", what, line, (unsigned long long)addr,
              align);
    if (addr + bytes > sizeof m.arena)
        fault("%s at line %d: address %#llx is not in shared memory", what, line, (unsigned long long)addr);
    char* p = m.arena + addr;
    for (size_t i = 0; i < m.shared_slots.size(); i++) {
        char* slot = (char*)m.shared_slots[i];
        if (slot && p >= slot && p < slot + m.shared_sizes[i]) {
            if (p + bytes > slot + m.shared_sizes[i])
                fault("%s at line %d: %zu bytes at byte offset %lld of __shared__ %s run past its end (%zu bytes)",
                      what, line, bytes, (long long)(p - slot), m.shared_names[i], m.shared_sizes[i]);
            return p;
        }
    }
    char* dyn = m.arena + sizeof m.arena - ((m.L->dynamic_smem + 15) & ~uint64_t(15));
    if (p >= dyn && p + bytes <= dyn + m.L->dynamic_smem) return p;
    fault("%s at line %d: shared address %#llx is in no __shared__ array", what, line, (unsigned long long)addr);
}

// ------------------------------------------------------------------------------------- the launch
inline void fiber_main() {
    Machine& m = M();
    Fiber* f = m.cur;
    if (!m.error.empty()) { f->state = DONE; return; }   // the launch already failed: do not start
    try {
        m.body();
        if (m.L->trace) trace("exit", 0);
        if (!f->async.empty())
            fault("thread exits with %zu cp.async copies it never waited for (cp.async.wait_group / wait_all)",
                  f->async.size());
        f->state = DONE;
        m.done++;
        if (m.at_barrier > 0)                 // others wait at a barrier this thread will never reach
            for (Fiber& o : m.fibers)
                if (o.state == AT_BARRIER)
                    fault("thread exits while thread (%u,%u,%u) waits at __syncthreads (line %d)", o.tid.x,
                          o.tid.y, o.tid.z, o.line);
        for (int l = 0; l < 32; l++) {        // or at a warp collective that names this lane
            int t = f->warp * 32 + l;
            if (t >= m.nthreads) break;
            Fiber& o = m.fibers[t];
            if (o.state == AT_WARP && (o.mask >> f->lane & 1u))
                fault("lane %d exits while lane %d waits for it at %s (line %d)", f->lane, l,
                      COLLECTIVE_NAMES[o.kind], o.line);
        }
    } catch (Fault& e) {
        if (m.error.empty()) m.error = e.msg.empty() ? "fault" : e.msg;
        f->state = DONE;
    }
}

// The first function on a new fiber's stack: run the thread, then hand control back for good.
inline void fiber_entry() {
    fiber_main();
    Machine& m = M();
    context_switch(m.cur->ctx, m.scheduler);   // never resumed
    abort();
}

inline std::string describe_deadlock() {
    Machine& m = M();
    std::string s = "deadlock: no thread can run.";
    int shown = 0;
    for (Fiber& o : m.fibers) {
        if (o.state == DONE || shown >= 6) continue;
        char buf[200];
        if (o.state == AT_BARRIER)
            snprintf(buf, sizeof buf, " thread (%u,%u,%u) waits at __syncthreads (line %d);", o.tid.x, o.tid.y,
                     o.tid.z, o.line);
        else
            snprintf(buf, sizeof buf, " thread (%u,%u,%u) waits at %s (line %d, mask %#x);", o.tid.x, o.tid.y,
                     o.tid.z, COLLECTIVE_NAMES[o.kind], o.line, o.mask);
        s += buf;
        shown++;
    }
    return s;
}

// Run every thread of the current block to its end (or to the first fault).
inline void run_block() {
    Machine& m = M();
    memset(m.arena, 0xFF, sizeof m.arena);   // shared memory starts as NaN bytes, never as zeros
    m.arena_used = 0;
    m.static_smem = 0;
    std::fill(m.shared_slots.begin(), m.shared_slots.end(), nullptr);
    m.at_barrier = m.done = 0;
    std::fill(m.ready.begin(), m.ready.end(), 0u);
    if (m.L->schedule == 3) std::shuffle(m.warp_order.begin(), m.warp_order.end(), m.rng);
    for (int i = 0; i < m.nthreads; i++) {
        Fiber& f = m.fibers[i];
        f.tid = {(unsigned)(i % m.blockDim.x), (unsigned)(i / m.blockDim.x % m.blockDim.y),
                 (unsigned)(i / (m.blockDim.x * m.blockDim.y))};
        f.linear = i;
        f.warp = i / 32;
        f.lane = i % 32;
        f.line = -1;
        f.async.clear();
        f.async_groups = 0;
        // the lowest page of each stack is a guard page
        context_init(f.ctx, m.stacks + i * m.stack_bytes + 4096, m.stack_bytes - 4096, fiber_entry);
        make_ready(f);
    }
    while (m.error.empty()) {
        int i = pick();
        if (i < 0) {
            if (m.done < m.nthreads) m.error = describe_deadlock() + " [" + where() + "]";
            break;
        }
        Fiber& f = m.fibers[i];
        m.ready[f.warp] &= ~(1u << f.lane);
        m.cur = &f;
        context_switch(m.scheduler, f.ctx);
        m.cur = nullptr;
    }
    if (!m.error.empty()) {
        // unwind the paused fibers so nothing is left half-run (each throws from switch_to_scheduler)
        for (Fiber& f : m.fibers) {
            if (f.state == DONE) continue;
            m.cur = &f;
            context_switch(m.scheduler, f.ctx);
            m.cur = nullptr;
        }
    }
}

inline void ensure_stacks(size_t n) {
    Machine& m = M();
    const size_t bytes = 64 * 1024;
    if (m.nstacks >= n) return;
    if (m.stacks) munmap(m.stacks, m.nstacks * m.stack_bytes);
    m.stacks = (char*)mmap(nullptr, n * bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                           -1, 0);
    for (size_t i = 0; i < n; i++) mprotect(m.stacks + i * bytes, 4096, PROT_NONE);   // overflow -> crash, not garbage
    m.stack_bytes = bytes;
    m.nstacks = n;
}

// ------------------------------------------------------------------------- crashes inside a fiber
// Global and shared memory are checked, but a wild pointer into local memory, or a fiber that overflows its
// stack into the guard page below it, would still crash the whole Python process. While a launch runs,
// SIGSEGV and SIGBUS go to this handler (on its own stack): it records the error, marks the thread done and
// switches straight to the scheduler, which ends the launch. A crash outside any fiber is left to the
// previous handler (Python's faulthandler), restored at once.
struct CrashGuard {
    struct sigaction old_segv, old_bus;
    stack_t old_stack;
    CrashGuard();
    ~CrashGuard() {
        sigaction(SIGSEGV, &old_segv, nullptr);
        sigaction(SIGBUS, &old_bus, nullptr);
        sigaltstack(&old_stack, nullptr);
    }
};

inline CrashGuard*& crash_guard() {
    static CrashGuard* g = nullptr;
    return g;
}

inline void on_crash(int sig, siginfo_t* info, void*) {
    Machine& m = M();
    if (!m.cur || !crash_guard()) {          // not in a fiber: let the previous handler see it
        if (crash_guard()) {
            sigaction(SIGSEGV, &crash_guard()->old_segv, nullptr);
            sigaction(SIGBUS, &crash_guard()->old_bus, nullptr);
        } else {
            signal(sig, SIG_DFL);
        }
        return;                              // the faulting instruction runs again and crashes for real
    }
    Fiber* f = m.cur;
    const char* addr = (const char*)info->si_addr;
    const char* stack = m.stacks + (size_t)f->linear * m.stack_bytes;
    char buf[300];
    if (addr >= stack - 65536 && addr < stack + 4096)   // in (or just below) the guard page
        snprintf(buf, sizeof buf, "stack overflow: the thread used more than its %zu KB of stack (deep recursion "
                 "or a huge local array?)", (m.stack_bytes - 4096) / 1024);
    else
        snprintf(buf, sizeof buf, "%s at address %p: an unchecked pointer (into local memory, or made from a "
                 "plain address) went wild", sig == SIGBUS ? "bus error" : "segmentation fault", (void*)addr);
    if (m.error.empty()) m.error = std::string(buf) + " [" + where() + "]";
    f->state = DONE;
    context_switch(f->ctx, m.scheduler);     // never resumed
}

inline CrashGuard::CrashGuard() {
    stack_t ss{};
    ss.ss_sp = M().signal_stack;
    ss.ss_size = sizeof M().signal_stack;
    sigaltstack(&ss, &old_stack);
    struct sigaction sa{};
    sa.sa_sigaction = on_crash;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;   // NODEFER: the handler never returns to unblock it
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
}

// Checks the launch limits, then runs the grid block by block. Returns 0, or 1 with the message in `error`.
inline int run(const Launch* L, unsigned max_threads, std::function<void()> body) {
    Machine& m = M();
    m.L = L;
    m.error.clear();
    m.body = std::move(body);
    m.blockDim = {L->block[0], L->block[1], L->block[2]};
    m.gridDim = {L->grid[0], L->grid[1], L->grid[2]};
    m.cur = nullptr;
    m.blockIdx = {0, 0, 0};
    unsigned long long n = (unsigned long long)L->block[0] * L->block[1] * L->block[2];
    char buf[256];
    if (n < 1 || n > 1024 || L->block[0] > 1024 || L->block[1] > 1024 || L->block[2] > 64) {
        snprintf(buf, sizeof buf, "bad block (%u,%u,%u): at most 1024 threads (x, y <= 1024, z <= 64)",
                 L->block[0], L->block[1], L->block[2]);
        m.error = buf;
        return 1;
    }
    if (n > max_threads) {
        snprintf(buf, sizeof buf, "block of %llu threads exceeds the kernel's __launch_bounds__(%u)", n, max_threads);
        m.error = buf;
        return 1;
    }
    if (L->grid[0] < 1 || L->grid[1] < 1 || L->grid[2] < 1 || L->grid[0] > 2147483647u || L->grid[1] > 65535 ||
        L->grid[2] > 65535) {
        snprintf(buf, sizeof buf, "bad grid (%u,%u,%u): x < 2^31, y and z <= 65535, none 0", L->grid[0],
                 L->grid[1], L->grid[2]);
        m.error = buf;
        return 1;
    }
    if (L->dynamic_smem > 48 * 1024) {
        snprintf(buf, sizeof buf, "dynamic shared memory %llu bytes exceeds 48 KB without opt-in",
                 (unsigned long long)L->dynamic_smem);
        m.error = buf;
        return 1;
    }
    m.nthreads = (int)n;
    m.nwarps = (int)((n + 31) / 32);
    m.fibers.assign(n, Fiber{});
    m.ready.assign(m.nwarps, 0u);
    m.warp_order.resize(m.nwarps);
    for (int w = 0; w < m.nwarps; w++) m.warp_order[w] = w;
    m.rng.seed(L->seed);
    ensure_stacks(n);
    // blocks in order, or reversed / shuffled with the schedule (blocks must not depend on each other)
    unsigned long long nblocks = (unsigned long long)L->grid[0] * L->grid[1] * L->grid[2];
    std::vector<unsigned long long> order(nblocks);
    for (unsigned long long b = 0; b < nblocks; b++) order[b] = b;
    if (L->schedule == 1) std::reverse(order.begin(), order.end());
    if (L->schedule == 2 || L->schedule == 3) std::shuffle(order.begin(), order.end(), m.rng);
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);                // flush denormals to zero (FTZ + DAZ), like nvcc -ftz=true
    {
        CrashGuard guard;
        crash_guard() = &guard;
        for (unsigned long long b : order) {
            m.blockIdx = {(unsigned)(b % L->grid[0]), (unsigned)(b / L->grid[0] % L->grid[1]),
                          (unsigned)(b / ((unsigned long long)L->grid[0] * L->grid[1]))};
            run_block();
            if (!m.error.empty()) break;
        }
        crash_guard() = nullptr;
    }
    _mm_setcsr(csr);
    fflush(stdout);                          // the kernel's printf output before Python prints anything else
    return m.error.empty() ? 0 : 1;
}

}  // namespace emu

extern "C" const char* emu_error() { return emu::M().error.c_str(); }

// ------------------------------------------------------------------------------ built-in variables
#define threadIdx (emu::M().cur->tid)
#define blockIdx (emu::M().blockIdx)
#define blockDim (emu::M().blockDim)
#define gridDim (emu::M().gridDim)
#define warpSize 32

#define __syncthreads() emu::syncthreads(__LINE__)
#define __shfl_xor_sync(mask, v, off) emu::shuffle(emu::SHFL_XOR, (mask), (v), (off), __LINE__)
#define __shfl_sync(mask, v, src) emu::shuffle(emu::SHFL_IDX, (mask), (v), (src), __LINE__)
#define __shfl_down_sync(mask, v, d) emu::shuffle(emu::SHFL_DOWN, (mask), (v), (d), __LINE__)
#define __shfl_up_sync(mask, v, d) emu::shuffle(emu::SHFL_UP, (mask), (v), (d), __LINE__)
#define __syncwarp(...) emu::syncwarp(__LINE__, ##__VA_ARGS__)
#define __ballot_sync(mask, p) emu::ballot((mask), (p), __LINE__)
#define __any_sync(mask, p) (emu::ballot((mask), (p), __LINE__) != 0u)
#define __all_sync(mask, p) (emu::ballot((mask), (p), __LINE__) == (mask))

// Atomics: the threads of a launch take turns on one CPU thread and never switch inside a call, so a plain
// read-modify-write is atomic here. (`&out[i]` was bounds-checked when out[i] was formed.)
template <class T> using same_t = typename std::enable_if<true, T>::type;   // v converts to *p's type, as in CUDA
template <class T> T atomicAdd(T* p, same_t<T> v) { T old = *p; *p = old + v; return old; }
template <class T> T atomicAdd(emu::ptr<T> p, same_t<T> v) { return atomicAdd(&*p, v); }
template <class T> T atomicMax(T* p, same_t<T> v) { T old = *p; *p = old > v ? old : v; return old; }
template <class T> T atomicMin(T* p, same_t<T> v) { T old = *p; *p = old < v ? old : v; return old; }

// ------------------------------------------------------------------------------- math intrinsics
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <class T> T __ldg(emu::ptr<T> p) { return *p; }
template <class T> size_t __cvta_generic_to_shared(emu::ptr<T> p) {
    emu::Machine& m = emu::M();
    const char* c = (const char*)p.p;
    if (c < m.arena || c >= m.arena + sizeof m.arena)
        emu::fault("__cvta_generic_to_shared: the pointer is not in shared memory (%s)",
                   emu::region_name(p.region, p.lo).c_str());
    return (size_t)(c - m.arena);
}
template <class T> T __ldg(emu::ptr<const T> p) { return *p; }
// CUDA's integer min/max: mixed int/unsigned arguments compare as unsigned, as in C
template <class A, class B, class = std::enable_if_t<std::is_integral<A>::value && std::is_integral<B>::value>>
std::common_type_t<A, B> min(A a, B b) { return (std::common_type_t<A, B>)a < (std::common_type_t<A, B>)b ? a : b; }
template <class A, class B, class = std::enable_if_t<std::is_integral<A>::value && std::is_integral<B>::value>>
std::common_type_t<A, B> max(A a, B b) { return (std::common_type_t<A, B>)a > (std::common_type_t<A, B>)b ? a : b; }

#include "ptx_models.h"
