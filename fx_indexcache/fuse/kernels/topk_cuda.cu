// Row-wise top-k of fp32 logits in CUDA C++ (compiled at first use by NVRTC: topk_cuda.py).
//
// The algorithm and its output are those of topk.py (the Triton kernels): a sampled threshold L, a filtering
// pass that keeps the keys above L in index order (and the first k keys equal to L), an exact select among
// them, and the exact search over the row in memory when the sample misled. What CUDA adds is what Triton
// cannot say: a 4096-key step of the filter costs one barrier (warps scan their counts with shuffles); the
// k-th key comes from 256-bin histograms built with shared-memory atomics (up to four passes, not sixteen counting
// ones: the Triton select's instruction count); the candidates stay in shared memory for the select; split
// rows write to per-split regions and the row's last block to finish gathers them: one launch.
//
// Two block shapes (the code is templated on the threads a block, NT): 256 threads and several blocks an SM
// for many rows (prefill), or split rows; 1024 threads, one block an SM ("wide", decode): a row of a few rows'
// batch is read by one SM with 16K keys a step in flight, and nothing crosses blocks unless the caller asks for
// splits. The sampled threshold's search stops short of an exact key (SAMPLE_COARSE) and the candidates' k-th
// key search counts the keys above it: fewer dependent passes, which is what a decode row's time goes to. For the
// same reason one block a contiguous row counts its candidates into a histogram as the filter writes them
// (CountingSink), and ranks the few keys of the k-th key's bin among themselves (rank_in_bin) instead of narrowing
// the bin pass by pass. A wide block's filter keeps no key in registers past its flags: it reads each kept key
// again from the row (an L1 hit), where holding every key for a predicated write cost 1.1 us at 1 x 32K.
//
// Keys: the float's bits with the magnitude bits of negatives flipped, -0.0 as +0.0 (topk.py's int32 key),
// here offset by 2^31 to compare as unsigned. Paths (recorded when `path` is given): 0 the whole row is the
// candidate set, 1 the k-th key lies above L, 2 L is the k-th key (the ties fill up), 3 the exact fallback; path 1
// where the filter counted the candidates (one block a contiguous row) and the k-th key's bin lies below the sample's
// largest key is recorded as 4 when that bin's keys were ranked among themselves, 5 when it was searched by passes.

typedef unsigned int u32;
typedef unsigned long long u64;

#define BLOCK 256       // threads a block of the many-row kernels
#define MIN_BLOCKS 4    // blocks an SM keeps of those (64 registers a thread): enough bytes in flight
#define WIDE 1024       // threads a block of the wide kernels (one block an SM, 64 registers a thread)
#define ROW_GROUPS 4    // a row is read 4 x NT keys a step (four 16-byte loads a thread, one barrier)
#define BINS 256        // a histogram's bins (equal ranges of key values: kth_largest)
#define FULL 0xffffffffu
#define SAMPLE_COARSE (1u << 16)  // the key range at which the sampled threshold's search stops
#define BIN_RANK_MAX BINS  // rank_in_bin takes bins of at most this many keys (gathered into a histogram slot)
#define ROW_BINS 4096   // binned rows: a row's keys counted by key >> ROW_BIN_SHIFT (sign, exponent, 3 mantissa bits)
#define ROW_BIN_SHIFT 20
#ifdef TOPK_NO_BIN_RANK  // (a build variant, for timing: a counted bin is always searched by histogram passes)
#define BIN_RANK false
#else
#define BIN_RANK true
#endif
#ifdef TOPK_NO_REREAD_GLOBAL  // (a build variant, for timing: a wide block's filter writes every key predicated from
#define REREAD_GLOBAL false  // the registers that loaded it, instead of reading its kept keys again from the row)
#else
#define REREAD_GLOBAL true
#endif
#ifdef TOPK_COUNT_ROW  // (a build variant, for timing: the binned entries count their row's bins themselves, in
#define COUNT_ROW true    // shared memory, in place of a sample, and ignore p.bins)
#else
#define COUNT_ROW false
#endif
#ifdef TOPK_REREAD_BLOCKS  // (a build variant, for timing: the 256-thread blocks' filter rereads its kept keys too)
#define REREAD_BLOCKS true
#else
#define REREAD_BLOCKS false
#endif
#ifdef TOPK_NO_FILTER_COUNTS  // (a build variant, for timing: the select histograms its candidates itself)
#define FILTER_COUNTS false
#else
#define FILTER_COUNTS true
#endif

struct Params {  // one launch's shapes (topk_cuda.py fills the same fields in this order)
    const float *x;
    int *out;
    int *path;     // null: not recorded
    u32 *reg_key;  // split rows: per-split candidate regions (REG entries each)
    int *reg_idx;
    int *reg_tie;  // per-split (one split: per-row) tie regions (TREG entries each)
    u32 *counts;   // split rows: [rows, nsplit, 2] keys above / equal to L
    u32 *done;     // split rows: [rows] splits finished (zeroed before the launch)
    long long sxr, sxt, sor, sok;
    int T, K, nb, sb, r_sample, cap, kp, nsplit, seg, reg, treg, direct;
    const u32 *bins;  // binned rows (topk_wide_vec_binned): [rows, ROW_BINS] counts of their keys; else null
};

// Phase stamps, for finding where a block's time goes (a build with -DTOPK_STAMPS, which
// benchmarks/bench_topk_phases.py --sections stamps makes through FX_INDEXCACHE_NVRTC_FLAGS): thread 0 of block 0
// writes the SM clock into p.path, read as u64[STAMP_SLOTS]: slots 0-7 at the phase boundaries (STAMP), 14 and 15
// the global timer at the end and the start (ns), and from slot 16 on, in order, the steps inside the phases
// (STAMP_STEP: each histogram pass of a k-th key search after its atomics and after its bin search, each chunk of a
// compaction after its loads, its scan and its writes). The paths are not recorded. Every other build compiles
// them away.
#define STAMP_SLOTS 128
#ifdef TOPK_STAMPS
__device__ unsigned long long *stamp_buf;  // this launch's p.path (block 0, thread 0 only)
__device__ int stamp_next;
#define STAMP_BEGIN(p)                                                                  \
    do {                                                                                \
        if (blockIdx.x == 0 && threadIdx.x == 0) {                                      \
            stamp_buf = reinterpret_cast<unsigned long long *>((p).path);               \
            stamp_next = 16;                                                            \
        }                                                                               \
    } while (0)
#define STAMP(i)                                                                        \
    do {                                                                                \
        if (blockIdx.x == 0 && threadIdx.x == 0 && stamp_buf != nullptr) stamp_buf[i] = clock64(); \
    } while (0)
#define STAMP_STEP()                                                                    \
    do {                                                                                \
        if (blockIdx.x == 0 && threadIdx.x == 0 && stamp_buf != nullptr && stamp_next < STAMP_SLOTS) \
            stamp_buf[stamp_next++] = clock64();                                        \
    } while (0)
#define STAMP_NS(i)                                                                     \
    do {                                                                                \
        if (blockIdx.x == 0 && threadIdx.x == 0 && stamp_buf != nullptr) {              \
            unsigned long long t;                                                       \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));                      \
            stamp_buf[i] = t;                                                           \
        }                                                                               \
    } while (0)
#else
#define STAMP_BEGIN(p) do {} while (0)
#define STAMP(i) do {} while (0)
#define STAMP_STEP() do {} while (0)
#define STAMP_NS(i) do {} while (0)
#endif

static_assert(sizeof(Params) == 152, "Params: keep topk_cuda._Params in step");
static_assert(BLOCK >= BINS && WIDE >= BINS, "the k-th key's histogram has a bin a thread (the first BINS)");

template <int NT>
struct Shared {  // the block's reduction and scan slots (two of each: one barrier per use), histograms (three)
    static const int NW = NT / 32;
    __align__(16) u32 hist[3][BINS];
    u32 sum[2][NW];
    u64 scan[2][2][NW];
    int last;
    u32 cluster_count[2];  // cluster rows: this block's candidates and ties (read by block 0 of the cluster)
    u32 bin_count, bin_kth, bin_above;  // rank_in_bin: the bin's keys gathered, its answer
};

__device__ __forceinline__ u32 ukey(float x) {
    // x + 0.0f: -0.0 becomes +0.0 (one key for both zeros; a NaN stays a NaN, positive ones above +inf); then
    // the sign bit flipped for positives, every bit for negatives.
    const int b = __float_as_int(x + 0.0f);
    return (u32)b ^ ((u32)(b >> 31) | 0x80000000u);
}

__device__ __forceinline__ u32 warp_sum(u32 v) {
#if __CUDA_ARCH__ >= 800
    return __reduce_add_sync(FULL, v);
#else
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
#endif
}

__device__ __forceinline__ u32 warp_max(u32 v) {
#if __CUDA_ARCH__ >= 800
    return __reduce_max_sync(FULL, v);
#else
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(FULL, v, o));
    return v;
#endif
}

// The block's total (MAX: largest) of a value, in every thread (one barrier: the slots alternate). Across
// warps, lane i of every warp reads warp i's value and the warp reduces them: one load a thread, not NW.
template <bool MAX, int NT>
__device__ __forceinline__ u32 block_reduce(u32 a, Shared<NT> &sh, int &buf) {
    const int lane = threadIdx.x & 31;
    a = MAX ? warp_max(a) : warp_sum(a);
    if (lane == 0) sh.sum[buf][threadIdx.x >> 5] = a;
    __syncthreads();
    a = lane < Shared<NT>::NW ? sh.sum[buf][lane] : 0u;
    buf ^= 1;
    return MAX ? warp_max(a) : warp_sum(a);
}

// The block's smallest and largest of two values, in every thread (one barrier: the scan's slots, which alternate
// like the others; the smallest as the largest of the complements).
template <int NT>
__device__ __forceinline__ void block_minmax(u32 &least, u32 &most, Shared<NT> &sh, int &buf) {
    const int lane = threadIdx.x & 31;
    const u32 a = warp_max(most), b = warp_max(~least);
    if (lane == 0) sh.scan[buf][0][threadIdx.x >> 5] = ((u64)a << 32) | b;
    __syncthreads();
    const u64 v = lane < Shared<NT>::NW ? sh.scan[buf][0][lane] : 0;
    buf ^= 1;
    most = warp_max((u32)(v >> 32));
    least = ~warp_max((u32)v);
}

// Exclusive prefixes of two values over the block in thread order (in place), and the block's totals
// (one barrier). Values may pack several counts in 16-bit fields: the fields add independently.
template <int NT>
__device__ __forceinline__ void block_scan2(u64 &a, u64 &b, u64 &ta, u64 &tb, Shared<NT> &sh, int &buf) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    u64 ia = a, ib = b;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 ya = __shfl_up_sync(FULL, ia, o), yb = __shfl_up_sync(FULL, ib, o);
        if (lane >= o) {
            ia += ya;
            ib += yb;
        }
    }
    if (lane == 31) {
        sh.scan[buf][0][w] = ia;
        sh.scan[buf][1][w] = ib;
    }
    __syncthreads();
    // every warp scans the warps' totals (lane i: warp i's), so each thread loads two values, not 2 NW
    const int NW = Shared<NT>::NW;
    u64 ya = lane < NW ? sh.scan[buf][0][lane] : 0, yb = lane < NW ? sh.scan[buf][1][lane] : 0;
#pragma unroll
    for (int o = 1; o < NW; o <<= 1) {
        const u64 za = __shfl_up_sync(FULL, ya, o), zb = __shfl_up_sync(FULL, yb, o);
        if (lane >= o) {
            ya += za;
            yb += zb;
        }
    }
    ta = __shfl_sync(FULL, ya, NW - 1);
    tb = __shfl_sync(FULL, yb, NW - 1);
    const u64 pa = __shfl_sync(FULL, ya, (w + 31) & 31), pb = __shfl_sync(FULL, yb, (w + 31) & 31);
    const u64 ba = w ? pa : 0, bb = w ? pb : 0;  // lane w - 1's inclusive total: the warps before this one
    buf ^= 1;
    a = ba + ia - a;
    b = bb + ib - b;
}

__device__ __forceinline__ u32 field16(u64 v, int g) { return (u32)(v >> (16 * g)) & 0xffffu; }

// A row of the logits, read in chunks of GROUPS x 4NT keys: group g of a chunk is 4NT contiguous keys, four a thread
// (coalesced 16-byte loads when VEC: contiguous, 16-byte aligned rows). REREAD: a kept key is read again by its
// index (an L1 hit, the chunk's lines having just been loaded), so chunk_place writes only the kept keys, in a loop
// over their bits, and no key stays in a register past its flags; else every key's write is predicated from the
// registers that loaded it.
template <bool VEC, int NT, bool REREAD_ = false>
struct RowSrc {
    static const int GROUPS = ROW_GROUPS;
    static const bool REREAD = REREAD_;
    const float *row;
    long long sxt;
    __device__ __forceinline__ u32 get(int i) const { return ukey(row[(long long)i * sxt]); }
    template <bool TAIL>
    __device__ __forceinline__ void load(int base, int hi, u32 (&key)[GROUPS][4], int (&)[GROUPS][4]) const {
#pragma unroll
        for (int g = 0; g < GROUPS; ++g) {
            const int first = base + g * 4 * NT + 4 * (int)threadIdx.x;
            if (VEC && (!TAIL || first + 4 <= hi)) {
                const float4 f = *reinterpret_cast<const float4 *>(row + first);
                key[g][0] = ukey(f.x);
                key[g][1] = ukey(f.y);
                key[g][2] = ukey(f.z);
                key[g][3] = ukey(f.w);
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) key[g][j] = first + j < hi ? get(first + j) : 0u;
            }
        }
    }
    __device__ __forceinline__ int index(const int (&)[GROUPS][4], int base, int g, int j) const {
        return base + g * 4 * NT + 4 * (int)threadIdx.x + j;
    }
};

// Keys (and their row indices) in shared memory, 16-byte aligned, readable up to the next multiple of 4NT.
template <int NT>
struct SmemSrc {
    static const int GROUPS = 1;
    static const bool REREAD = false;
    const u32 *key;
    const int *idx;
    __device__ __forceinline__ u32 get(int i) const { return key[i]; }
    template <bool TAIL>
    __device__ __forceinline__ void load(int base, int, u32 (&k)[1][4], int (&ix)[1][4]) const {
        const int first = base + 4 * (int)threadIdx.x;
        const uint4 a = *reinterpret_cast<const uint4 *>(key + first);
        const int4 b = *reinterpret_cast<const int4 *>(idx + first);
        k[0][0] = a.x; k[0][1] = a.y; k[0][2] = a.z; k[0][3] = a.w;
        ix[0][0] = b.x; ix[0][1] = b.y; ix[0][2] = b.z; ix[0][3] = b.w;
    }
    __device__ __forceinline__ int index(const int (&ix)[1][4], int, int g, int j) const { return ix[g][j]; }
};

// The bin of a histogram holding the K-th largest of its keys (counting from the top bin), and the keys in the
// bins above it. Every warp scans the whole histogram itself (BINS / 32 bins a lane, two 16-byte loads), so no
// barrier is needed to hand the answer to the other warps.
__device__ __forceinline__ void find_bin(const u32 *hist, u32 K, u32 &bin, u32 &above) {
    static_assert(BINS == 256, "find_bin reads eight bins a lane");
    const int PER = BINS / 32, lane = threadIdx.x & 31;
    const uint4 *v = reinterpret_cast<const uint4 *>(hist + BINS - (lane + 1) * PER);  // this lane's bins
    const uint4 a = v[0], b = v[1];
    const u32 h[PER] = {b.w, b.z, b.y, b.x, a.w, a.z, a.y, a.x};  // from the top down
    u32 mine = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) mine += h[j];
    u32 incl = mine;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 y = __shfl_up_sync(FULL, incl, o);
        if (lane >= o) incl += y;
    }
    const int l = __ffs(__ballot_sync(FULL, incl >= K)) - 1;  // the lane holding the bin (the keys number >= K)
    u32 c = incl - mine;
    int j = 0;
    bool below = true;  // every lane walks its own bins; lane l's answer is the one broadcast
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        below = below && c + h[i] < K;
        if (below) {
            c += h[i];
            ++j;
        }
    }
    bin = (u32)(BINS - 1 - lane * PER - j);
    bin = __shfl_sync(FULL, bin, l);
    above = __shfl_sync(FULL, c, l);
}

// The K-th largest of src's first n keys, where no key lies above hi and at least K keys lie in [lo, hi] (keys
// below lo may exist: they are never counted). A pass histograms the keys in [lo, hi] into BINS equal ranges of
// key values (bin (u - lo) >> shift, shift the fewest bits that fit hi - lo into BINS bins), finds the bin holding
// the K-th key from the top and narrows [lo, hi] to it, until one key value is left. Equal ranges, not bytes of
// the key: a narrow range (the candidates above a sampled threshold) straddling a power of two spreads over all
// the bins, where its top byte would pile every key into one or two of them (shared-memory atomics on one
// address serialise). One barrier a pass: the histograms rotate over three slots (a pass zeroes the next one; a
// slot is zeroed again two barriers after its last read), and find_bin needs none. A barrier must separate two
// calls (the callers' reductions, scans and syncs do). *n_above, when given, receives the keys above the K-th.
// With coarse > 0 the search stops once its range is narrower than coarse key values: it returns the range's lower
// edge and *range_hi its upper one (equal where the range closed on the K-th key).
template <int NT, class Src>
__device__ u32 kth_largest(const Src &src, int n, u32 K, u32 lo, u32 hi, Shared<NT> &sh, u32 *n_above = nullptr,
                           u32 coarse = 0, u32 *range_hi = nullptr) {
    const u32 K0 = K;
    int h = 0;
    if (threadIdx.x < BINS) sh.hist[0][threadIdx.x] = 0;
    __syncthreads();
#pragma unroll 1
    while (lo < hi && hi - lo >= coarse) {
        const int shift = max(0, 32 - __clz(hi - lo) - 8);  // (hi - lo) >> shift < BINS
        u32 *hist = sh.hist[h];
        h = h == 2 ? 0 : h + 1;
        if (threadIdx.x < BINS) sh.hist[h][threadIdx.x] = 0;
        for (int i = threadIdx.x; i < n; i += NT) {
            const u32 u = src.get(i);
            if (u >= lo && u <= hi) atomicAdd(&hist[(u - lo) >> shift], 1u);
        }
        __syncthreads();
        STAMP_STEP();
        u32 bin, above;
        find_bin(hist, K, bin, above);
        STAMP_STEP();
        K -= above;
        lo += bin << shift;
        const u32 width = (1u << shift) - 1u;
        hi = hi - lo > width ? lo + width : hi;
    }
    if (n_above != nullptr) *n_above = K0 - K;
    if (range_hi != nullptr) *range_hi = hi;
    return lo;
}

// The Kb-th largest key of the m (<= BIN_RANK_MAX) candidates in [lo, hi] and how many of them lie above it, where
// a histogram pass would need several more passes over every candidate to narrow [lo, hi] to one key: the m keys are
// gathered into `list` (any order), and each ranks itself among them; the first of the k-th key's copies answers.
// Two barriers. sh.bin_count must be zero on entry, with a barrier between.
template <int NT>
__device__ u32 rank_in_bin(const u32 *ck, u32 n, u32 lo, u32 hi, u32 m, u32 Kb, u32 *list, Shared<NT> &sh,
                           u32 &above) {
    for (u32 i = threadIdx.x; i < n; i += NT) {
        const u32 u = ck[i];
        if (u >= lo && u <= hi) list[atomicAdd(&sh.bin_count, 1u)] = u;
    }
    __syncthreads();
    if (threadIdx.x < m) {
        const u32 key = list[threadIdx.x];
        u32 gt = 0, eq = 0, eq_before = 0;
        for (u32 j = 0; j < m; ++j) {
            const u32 v = list[j];
            gt += v > key;
            eq += v == key;
            eq_before += v == key && j < threadIdx.x;
        }
        if (gt < Kb && Kb <= gt + eq && eq_before == 0) {
            sh.bin_kth = key;
            sh.bin_above = gt;
        }
    }
    __syncthreads();
    above = sh.bin_above;
    return sh.bin_kth;
}

// Keys of src's first n above thr (block total).
template <int NT, class Src>
__device__ u32 count_above(const Src &src, int n, u32 thr, Shared<NT> &sh, int &buf) {
    u32 a = 0;
    for (int i = threadIdx.x; i < n; i += NT) a += src.get(i) > thr;
    return block_reduce<false>(a, sh, buf);
}

// A chunk's flags (bit j of fg[g] / fe[g]: key j of group g above / equal to thr) and this thread's counts (a 16-bit
// field a group); TAIL: the chunk may end past hi (bounds checked key by key).
template <bool TAIL, int NT, int G>
__device__ __forceinline__ void chunk_flags(const u32 (&key)[G][4], int base, int hi, u32 thr, u32 (&fg)[G],
                                            u32 (&fe)[G], u64 &cg, u64 &ce) {
    cg = ce = 0;
#pragma unroll
    for (int g = 0; g < G; ++g) {
        fg[g] = fe[g] = 0;
        const int first = base + g * 4 * NT + 4 * (int)threadIdx.x;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const bool ok = !TAIL || first + j < hi;
            fg[g] |= (u32)(ok && key[g][j] > thr) << j;
            fe[g] |= (u32)(ok && key[g][j] == thr) << j;
        }
        cg |= (u64)__popc(fg[g]) << (16 * g);
        ce |= (u64)__popc(fe[g]) << (16 * g);
    }
}

// A chunk's kept keys to the sink at their ranks (the block's scan of the counts: one barrier); the counts grow by
// the chunk's. A REREAD source's kept keys are read again by index (key unused), else taken from key / idx.
template <int NT, int G, class Src, class Sink>
__device__ __forceinline__ void chunk_place(const Src &src, const u32 (&key)[G][4], const int (&idx)[G][4], int base,
                                            const u32 (&fg)[G], const u32 (&fe)[G], u64 cg, u64 ce, Sink &sink,
                                            u32 &n_gt, u32 &n_eq, Shared<NT> &sh, int &buf) {
    u64 tg, te;
    block_scan2(cg, ce, tg, te, sh, buf);
    STAMP_STEP();
    if constexpr (Src::REREAD) {  // only the kept keys: a loop over their bits (bit 4g + j: key j of group g)
        u32 mg = 0, me = 0;
#pragma unroll
        for (int g = 0; g < G; ++g) {
            mg |= fg[g] << (4 * g);
            me |= fe[g] << (4 * g);
        }
        // group g's keys follow every thread's keys of the groups before it: field g of gs / es is this thread's
        // first position in group g (its prefix there, plus the block's totals of groups 0 .. g-1; at most 4 G NT)
        u64 gs = cg, es = ce;
#pragma unroll
        for (int g = 1; g < G; ++g) {
            gs += tg << (16 * g);
            es += te << (16 * g);
        }
        const int first = base + 4 * (int)threadIdx.x;
        for (u32 rest = mg; rest != 0; rest &= rest - 1) {
            const int b = __ffs(rest) - 1, g = b >> 2, i = first + g * 4 * NT + (b & 3);
            sink.gt(n_gt + field16(gs, g) + __popc(mg & ((1u << b) - 1) & (0xfu << (4 * g))), src.get(i), i);
        }
        for (u32 rest = me; rest != 0; rest &= rest - 1) {
            const int b = __ffs(rest) - 1, g = b >> 2;
            sink.eq(n_eq + field16(es, g) + __popc(me & ((1u << b) - 1) & (0xfu << (4 * g))),
                    first + g * 4 * NT + (b & 3));
        }
#pragma unroll
        for (int g = 0; g < G; ++g) {
            n_gt += field16(tg, g);
            n_eq += field16(te, g);
        }
    } else {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            u32 pg = n_gt + field16(cg, g), pe = n_eq + field16(ce, g);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if ((fg[g] >> j) & 1u) sink.gt(pg++, key[g][j], src.index(idx, base, g, j));
                if ((fe[g] >> j) & 1u) sink.eq(pe++, src.index(idx, base, g, j));
            }
            n_gt += field16(tg, g);
            n_eq += field16(te, g);
        }
    }
    STAMP_STEP();
}

// Entries [lo, hi) of src in index order: each key above thr goes to sink.gt at its rank among them
// (from n_gt on), each key equal to thr to sink.eq (from n_eq on); the counts grow by what was seen.
template <int NT, class Src, class Sink>
__device__ void compact(const Src &src, int lo, int hi, u32 thr, Sink &sink, u32 &n_gt, u32 &n_eq, Shared<NT> &sh,
                        int &buf) {
    const int G = Src::GROUPS, step = G * 4 * NT;
    u32 key[G][4], fg[G], fe[G];
    int idx[G][4];
    u64 cg, ce;
    int base = lo;
    for (; base + step <= hi; base += step) {
        src.template load<false>(base, hi, key, idx);
        STAMP_STEP();  // (the loads are issued here; their first use below waits for them)
        chunk_flags<false, NT>(key, base, hi, thr, fg, fe, cg, ce);
        chunk_place(src, key, idx, base, fg, fe, cg, ce, sink, n_gt, n_eq, sh, buf);
    }
    if (base < hi) {
        src.template load<true>(base, hi, key, idx);
        STAMP_STEP();
        chunk_flags<true, NT>(key, base, hi, thr, fg, fe, cg, ce);
        chunk_place(src, key, idx, base, fg, fe, cg, ce, sink, n_gt, n_eq, sh, buf);
    }
}

struct BufferSink {  // the filter's: candidates (key, index) up to cap, the first tcap ties
    u32 *key;
    int *idx;
    int *tie;
    u32 cap, tcap;
    __device__ __forceinline__ void gt(u32 p, u32 k, int i) {
        if (p < cap) {
            key[p] = k;
            idx[p] = i;
        }
    }
    __device__ __forceinline__ void eq(u32 p, int i) {
        if (p < tcap) tie[p] = i;
    }
};

// The filter's sink for one block a row: BufferSink, and each candidate counted in a histogram of BINS equal ranges
// of key values from lo (the threshold + 1) up, bin (u - lo) >> shift, keys past the last bin in it: the select's
// first histogram pass, built while the candidates are written (no pass over them, no reduction for their largest).
struct CountingSink : BufferSink {
    u32 *hist;
    u32 lo, shift;
    __device__ __forceinline__ void gt(u32 p, u32 k, int i) {
        BufferSink::gt(p, k, i);
        atomicAdd(&hist[min((k - lo) >> shift, (u32)BINS - 1)], 1u);
    }
};

struct OutSink {  // the result's: every key above the k-th, then the first ties after them
    int *out;
    long long sok;
    u32 n_above, K;
    __device__ __forceinline__ void gt(u32 p, u32, int i) { out[(long long)p * sok] = i; }
    __device__ __forceinline__ void eq(u32 p, int i) {
        if (p < K - n_above) out[(long long)(n_above + p) * sok] = i;
    }
};

// The threshold from a row's binned counts (made by whoever wrote the row), where the sample would have to be
// loaded and searched: one below the lowest key of the bin holding the K-th largest key, so the keys above it are
// that bin's and the bins' above it; top receives the bin's highest key (the counted filter's range). Each thread
// holds four bins, thread 0 the top four; one scan finds the bin. False where no bin holds the K-th key (counts
// that do not add up to the row), the lowest one does (no key below its edge), or the keys it would keep exceed the
// capacity (a bin of many equal scores, which the sample's threshold would take as its ties): the caller samples
// instead. The counts only steer: the select counts the keys the filter keeps, so wrong counts cost time, never
// exactness.
template <int NT>
__device__ bool binned_threshold(const u32 *bins, u32 K, u32 cap, Shared<NT> &sh, int &buf, u32 &L, u32 &top) {
    static_assert(ROW_BINS == 4 * NT, "four bins a thread");
    const uint4 v = reinterpret_cast<const uint4 *>(bins)[NT - 1 - threadIdx.x];
    const u32 c[4] = {v.w, v.z, v.y, v.x};  // this thread's bins from the top down
    u64 above = (u64)c[0] + c[1] + c[2] + c[3], none = 0, total, unused;
    if (threadIdx.x == 0) sh.bin_kth = FULL;  // (the scan's barrier orders it before the answer's write)
    block_scan2(above, none, total, unused, sh, buf);  // above: the keys in the bins above this thread's
    if (above < K && K <= above + c[0] + c[1] + c[2] + c[3]) {
        u32 j = 0;
        bool below = true;  // (a static index: c stays in registers)
#pragma unroll
        for (int i = 0; i < 3; ++i) {
            below = below && above + c[i] < K;
            if (below) {
                above += c[i];
                ++j;
            }
        }
        sh.bin_kth = ROW_BINS - 1 - 4 * threadIdx.x - j;
        sh.bin_above = (u32)above + (j == 0 ? c[0] : j == 1 ? c[1] : j == 2 ? c[2] : c[3]);  // the keys it keeps
    }
    __syncthreads();
    const u32 bin = sh.bin_kth;
    if (bin == FULL || bin == 0 || sh.bin_above > cap) return false;
    L = (bin << ROW_BIN_SHIFT) - 1u;
    top = L + (1u << ROW_BIN_SHIFT);
    return true;
}

// The row's keys counted into hist[ROW_BINS] (shared memory) by key >> ROW_BIN_SHIFT, as topk_cuda.row_bins counts
// them: one pass over a contiguous, 16-byte aligned row with shared-memory atomics (COUNT_ROW builds: the binned
// threshold from the block's own counts, against a sample's search).
template <int NT>
__device__ void count_row(const float *row, int T, u32 *hist) {
    for (int i = threadIdx.x; i < ROW_BINS; i += NT) hist[i] = 0;
    __syncthreads();
#pragma unroll 4
    for (int i = 4 * (int)threadIdx.x; i < T; i += 4 * NT) {
        if (i + 4 <= T) {
            const float4 f = *reinterpret_cast<const float4 *>(row + i);
            atomicAdd(&hist[ukey(f.x) >> ROW_BIN_SHIFT], 1u);
            atomicAdd(&hist[ukey(f.y) >> ROW_BIN_SHIFT], 1u);
            atomicAdd(&hist[ukey(f.z) >> ROW_BIN_SHIFT], 1u);
            atomicAdd(&hist[ukey(f.w) >> ROW_BIN_SHIFT], 1u);
        } else {
            for (int j = i; j < T; ++j) atomicAdd(&hist[ukey(row[j]) >> ROW_BIN_SHIFT], 1u);
        }
    }
    __syncthreads();
}

// The r-th largest key of nb blocks of sb contiguous keys spread evenly over the row (staged in s, four
// loads in flight a thread). nb and sb are powers of two (topk.plan): block b starts at b T / nb, by shifts.
template <bool VEC, int NT, bool RR>
__device__ u32 sampled_threshold(const Params &p, const RowSrc<VEC, NT, RR> &row, u32 *s, Shared<NT> &sh, int &buf,
                                 u32 &sample_top) {
    const int ns = p.nb * p.sb, log_sb = __ffs(p.sb) - 1, log_nb = __ffs(p.nb) - 1;
    u32 most = 0, least = FULL;  // the sample's largest and smallest keys: the search's first range
    for (int i0 = threadIdx.x; i0 < ns; i0 += 4 * NT) {
        u32 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int i = i0 + u * NT;
            v[u] = i < ns ? row.get((int)((((long long)(i >> log_sb)) * p.T) >> log_nb) + (i & (p.sb - 1))) : 0u;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
            if (i0 + u * NT < ns) {
                s[i0 + u * NT] = v[u];
                most = max(most, v[u]);
                least = min(least, v[u]);
            }
    }
    block_minmax(least, most, sh, buf);  // (its barrier also hands the sample's slots to every thread)
    sample_top = most;
    STAMP(1);
    SmemSrc<NT> src{s, nullptr};
    // The threshold needs no exact key, so the search stops at a range of fewer than SAMPLE_COARSE key values (two
    // passes of four; 9.1K -> 5.6K cycles at 1 x 32K on an H100); the threshold is then the sampled key there when
    // the sample has one value in that range (the ties path needs it), else one below the range (a few more
    // candidates).
    u32 hi;
    const u32 lo = kth_largest(src, ns, (u32)p.r_sample, least, most, sh, nullptr, SAMPLE_COARSE, &hi);
    u32 L = lo;
    if (lo < hi) {
        least = FULL;
        most = 0;
        for (int i = threadIdx.x; i < ns; i += NT) {
            const u32 u = src.get(i);
            if (u >= lo && u <= hi) {
                least = min(least, u);
                most = max(most, u);
            }
        }
        block_minmax(least, most, sh, buf);
        L = least == most ? least : (lo > 0 ? lo - 1 : 0);
    }
    __syncthreads();  // the sample's slots are the candidates' next
    return L;
}

// Thread-block clusters (sm_90): a row cut over CLUSTER blocks of one cluster, each filtering its segment into its own
// shared memory; block 0 reads the others' candidates through distributed shared memory (no global round trip, no
// count to zero before the launch, no block left to find out that it is last). PTX, so NVRTC needs no headers.
#define CLUSTER 8
#if __CUDA_ARCH__ >= 900
// The shared::cluster address of `p` (this block's shared memory) in block `rank` of the cluster.
__device__ __forceinline__ u32 cluster_address(const void *p, u32 rank) {
    u32 a;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"((u32)__cvta_generic_to_shared(p)), "r"(rank));
    return a;
}
__device__ __forceinline__ u32 load_cluster(const void *p, u32 rank) {
    u32 v;
    asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(v) : "r"(cluster_address(p, rank)) : "memory");
    return v;
}
// Every thread of every block of the cluster: what each wrote before is visible to all after (release/acquire).
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
#endif

// The split s of a row holding entry q of the splits' concatenation: off (nsplit + 1 offsets, one 32-bit half of
// each u64: low = candidates, high = ties) has off[s] <= q < off[s + 1].
__device__ __forceinline__ int split_of(const u64 *off, int nsplit, u32 q, int half) {
    int lo = 0, hi = nsplit - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if ((u32)(off[mid] >> (32 * half)) <= q) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Where split rows' candidates wait for the gather: per-split regions of p.reg entries in global memory, their
// counts in p.counts (the row's last block to finish gathers them).
struct GlobalRegions {
    static const bool OWN_FIRST = false;  // the gathering block's own candidates are in a region like the others'
    const Params &p;
    long long reg0;  // the row's first region
    __device__ __forceinline__ u32 capacity() const { return (u32)p.reg; }
    __device__ __forceinline__ u32 count(int s, int half) const { return __ldcg(p.counts + (reg0 + s) * 2 + half); }
    __device__ __forceinline__ u32 key(int s, u32 at) const { return __ldcg(p.reg_key + (reg0 + s) * p.reg + at); }
    __device__ __forceinline__ int idx(int s, u32 at) const { return __ldcg(p.reg_idx + (reg0 + s) * p.reg + at); }
};

// Split rows, in the gathering block: every split's counts (capped at its region's capacity), their offsets in off
// (low halves candidates, high halves ties), and every split's candidates copied into ck / ci in split order (index
// order), from `regions` (GlobalRegions, or a cluster's shared memory); overflow when some split kept more than its
// region holds.
template <int NT, class Regions>
__device__ void gather_splits(const Params &p, const Regions &regions, u32 *ck, int *ci, u64 *off, u32 &n_gt,
                              u32 &n_eq, bool &overflow, Shared<NT> &sh, int &buf) {
    u64 run_g = 0, run_e = 0;
    int over = 0;
    for (int base = 0; base < p.nsplit; base += NT) {
        const int s = base + threadIdx.x;
        u64 g = 0, e = 0, tg, te;
        if (s < p.nsplit) {
            g = regions.count(s, 0);
            e = regions.count(s, 1);
            over |= g > (u64)regions.capacity();
            g = min(g, (u64)regions.capacity());
            e = min(e, (u64)p.treg);
        }
        block_scan2(g, e, tg, te, sh, buf);
        if (s < p.nsplit) off[s] = (run_g + g) | ((run_e + e) << 32);
        run_g += tg;
        run_e += te;
    }
    if (threadIdx.x == 0) off[p.nsplit] = run_g | (run_e << 32);
    overflow = __syncthreads_or(over) != 0;
    n_gt = (u32)run_g;
    n_eq = (u32)run_e;
    if (overflow || n_gt > (u32)p.cap) return;
    const u32 first = Regions::OWN_FIRST ? (u32)off[1] : 0u;  // (a cluster's block 0: its own sit at the front)
    for (u32 q0 = first + threadIdx.x; q0 < n_gt; q0 += 4 * NT) {  // four loads in flight a thread
        u32 kv[4];
        int iv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const u32 q = q0 + u * NT;
            if (q < n_gt) {
                const int s = split_of(off, p.nsplit, q, 0);
                kv[u] = regions.key(s, q - (u32)off[s]);
                iv[u] = regions.idx(s, q - (u32)off[s]);
            }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const u32 q = q0 + u * NT;
            if (q < n_gt) {
                ck[q] = kv[u];
                ci[q] = iv[u];
            }
        }
    }
    __syncthreads();
}

#if __CUDA_ARCH__ >= 900
// Cluster rows: each block's candidates in its own ck / ci (the same addresses in every block), its counts in
// sh.cluster_count, read by block 0 through the cluster.
template <int NT>
struct ClusterRegions {
    static const bool OWN_FIRST = true;  // block 0's own candidates already sit at the front of its ck / ci
    const u32 *ck;
    const int *ci;
    const Shared<NT> &sh;
    u32 cap;
    __device__ __forceinline__ u32 capacity() const { return cap; }
    __device__ __forceinline__ u32 count(int s, int half) const { return load_cluster(&sh.cluster_count[half], s); }
    __device__ __forceinline__ u32 key(int s, u32 at) const { return load_cluster(ck + at, s); }
    __device__ __forceinline__ int idx(int s, u32 at) const { return (int)load_cluster(ci + at, s); }
};
#endif

// The first `need` ties in index order to out[n_gt ...]: from the row's tie region (one split) or from every
// split's (their offsets in off's high halves).
template <int NT>
__device__ void write_ties(const Params &p, long long row, const u64 *off, int *o_row, u32 n_gt, u32 need) {
    for (u32 q = threadIdx.x; q < need; q += NT) {
        long long at;
        if (p.nsplit == 1) {
            at = row * p.treg + q;
        } else {
            const int s = split_of(off, p.nsplit, q, 1);
            at = (row * p.nsplit + s) * p.treg + (q - (u32)(off[s] >> 32));
        }
        o_row[(long long)(n_gt + q) * p.sok] = __ldcg(p.reg_tie + at);
    }
}

// One block a row: the filter over the whole row (the sink a temporary: counting or not), its writes then visible.
template <int NT, class Src, class Sink>
__device__ __forceinline__ void filter_row(const Src &src, int T, u32 L, Sink &&sink, u32 &n_gt, u32 &n_eq,
                                           Shared<NT> &sh, int &buf) {
    compact(src, 0, T, L, sink, n_gt, n_eq, sh, buf);
    __syncthreads();
}

// The top k of a whole row in index order, the first ties last.
template <int NT, class Src>
__device__ void exact_search(const Params &p, const Src &src, int *o_row, Shared<NT> &sh, int &buf) {
    const u32 K = (u32)p.K;
    const u32 kth = kth_largest(src, p.T, K, 0u, 0xffffffffu, sh);
    OutSink sink{o_row, p.sok, count_above(src, p.T, kth, sh, buf), K};
    u32 a = 0, e = 0;
    compact(src, 0, p.T, kth, sink, a, e, sh, buf);
}

// Sorted output: descending score, equal scores by ascending index (a bitonic sort of (key, ~index) pairs).
template <int NT>
__device__ void sort_selected(const Params &p, const RowSrc<false, NT> &row, int *o_row, u64 *sb) {
    __syncthreads();  // the indices just written are read back by other threads
    for (int i = threadIdx.x; i < p.kp; i += NT) {
        u64 v = 0;  // below every real pair (a real pair's low half is ~index != 0)
        if (i < p.K) {
            const int ix = o_row[(long long)i * p.sok];
            v = ((u64)row.get(ix) << 32) | (u64)(0xffffffffu - (u32)ix);
        }
        sb[i] = v;
    }
    __syncthreads();
    for (int size = 2; size <= p.kp; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < p.kp / 2; i += NT) {
                const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
                const u64 a = sb[lo], b = sb[hi];
                if ((a < b) == ((lo & size) == 0)) {
                    sb[lo] = b;
                    sb[hi] = a;
                }
            }
            __syncthreads();
        }
    }
    for (int i = threadIdx.x; i < p.K; i += NT) o_row[(long long)i * p.sok] = (int)(0xffffffffu - (u32)sb[i]);
}

// Programmatic dependent launch (sm_90 on): a launch that allows it (topk_cuda.launch on such a device) may be
// scheduled while the kernel before it on the stream still runs, so the launch's latency hides under that kernel's
// tail. The grid then waits here, before its first access to global memory, until that kernel has finished and its
// writes are visible. Without the launch attribute the wait returns at once.
__device__ __forceinline__ void wait_for_prior_grid() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

template <int NT, bool VEC, bool SORTED, int CL = 0, bool BINNED = false>
__device__ void topk_row(const Params &p) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ Shared<NT> sh;
    int buf = 0;  // which of each pair of shared slots the next reduction or scan takes
    const long long row = blockIdx.x / p.nsplit;
    const int split = blockIdx.x % p.nsplit;
    const RowSrc<VEC, NT, REREAD_GLOBAL && VEC && (NT == WIDE || REREAD_BLOCKS)> src{p.x + row * p.sxr, p.sxt};
    int *o_row = p.out + row * p.sor;
    const int ns = p.nb * p.sb;
    const int base_bytes = max(p.cap * 8, ns * 4);
    u32 *ck = reinterpret_cast<u32 *>(smem);
    int *ci = reinterpret_cast<int *>(ck + p.cap);
    u64 *sb = reinterpret_cast<u64 *>(smem + base_bytes);
    u64 *off = sb + (SORTED ? p.kp : 0);

    wait_for_prior_grid();
    STAMP_BEGIN(p);
    STAMP_NS(15);
    STAMP(0);
    u32 sample_top = 0, L = 0;
    bool binned = false;
    if constexpr (BINNED) {
        const u32 *bins = p.bins + row * ROW_BINS;
        if constexpr (COUNT_ROW) {
            __shared__ __align__(16) u32 row_hist[ROW_BINS];
            count_row<NT>(src.row, p.T, row_hist);
            bins = row_hist;
        }
        binned = binned_threshold<NT>(bins, (u32)p.K, (u32)p.cap, sh, buf, L, sample_top);
    }
    if (binned) STAMP(1);  // (the stamps' "sample loaded": the bins read and searched; the sample's search takes none)
    if (!binned && !p.direct) L = sampled_threshold(p, src, ck, sh, buf, sample_top);
    STAMP(2);
    u32 n_gt = 0, n_eq = 0;
    bool overflow = false;
    // One block a contiguous row, sampled: the filter histograms its candidates over (L, sample_top] (the select's
    // first pass) in the histogram slot the select's own passes reach last. (Not on strided rows: their loads' registers
    // and the count's would spill.)
    const bool counted = FILTER_COUNTS && VEC && p.nsplit == 1 && !p.direct && sample_top > L;
    const u32 count_shift = counted ? max(0, 32 - __clz(sample_top - L) - 8) : 0u;
    u32 *filter_hist = sh.hist[2];
    if (counted && threadIdx.x < BINS) filter_hist[threadIdx.x] = 0;  // (compact's first barrier precedes the counts)
    if (counted && threadIdx.x == 0) sh.bin_count = 0;
    if (p.nsplit == 1) {
        const BufferSink row_sink{ck, ci, p.reg_tie + row * p.treg, (u32)p.cap, (u32)p.treg};
        if (counted)
            filter_row(src, p.T, L, CountingSink{row_sink, filter_hist, L + 1, count_shift}, n_gt, n_eq, sh, buf);
        else
            filter_row(src, p.T, L, BufferSink{row_sink}, n_gt, n_eq, sh, buf);
        STAMP(3);
    } else if (CL > 0) {  // a cluster's row: p.nsplit == CL blocks, block s filtering segment s
#if __CUDA_ARCH__ >= 900
        const long long reg = row * p.nsplit + split;
        const int lo = split * p.seg, hi = min(lo + p.seg, p.T);
        BufferSink sink{ck, ci, p.reg_tie + reg * p.treg, (u32)p.cap, (u32)p.treg};
        compact(src, lo, hi, L, sink, n_gt, n_eq, sh, buf);
        if (threadIdx.x == 0) {
            sh.cluster_count[0] = n_gt;
            sh.cluster_count[1] = n_eq;
        }
        __threadfence();  // the ties went to global memory: ordered before the barrier's release
        cluster_sync();
        if (split == 0)
            gather_splits(p, ClusterRegions<NT>{ck, ci, sh, (u32)p.cap}, ck, ci, off, n_gt, n_eq, overflow, sh, buf);
        cluster_sync();  // the other blocks keep their shared memory until block 0 has read it
        if (split != 0) return;
        STAMP(3);
#endif
    } else {
        const long long reg = row * p.nsplit + split;
        const int lo = split * p.seg, hi = min(lo + p.seg, p.T);
        BufferSink sink{p.reg_key + reg * p.reg, p.reg_idx + reg * p.reg, p.reg_tie + reg * p.treg, (u32)p.reg,
                        (u32)p.treg};
        compact(src, lo, hi, L, sink, n_gt, n_eq, sh, buf);
        if (threadIdx.x == 0) {
            p.counts[2 * reg] = n_gt;
            p.counts[2 * reg + 1] = n_eq;
        }
        __syncthreads();  // the block's writes precede thread 0's fence: released with it, card-wide
        if (threadIdx.x == 0) {
            __threadfence();
            sh.last = atomicAdd(p.done + row, 1u) == (u32)p.nsplit - 1;
            __threadfence();  // the last block's reads of the other splits' writes come after their counts
        }
        __syncthreads();
        if (!sh.last) return;
        gather_splits(p, GlobalRegions{p, row * p.nsplit}, ck, ci, off, n_gt, n_eq, overflow, sh, buf);
    }

    const u32 K = (u32)p.K;
    int path;
    if (!overflow && n_gt <= (u32)p.cap && n_gt >= K) {  // the k-th key lies among the candidates
        SmemSrc<NT> cand{ck, ci};
        u32 above, kth;  // the candidates above the k-th key: its search counts them (no count pass)
        u32 bin = BINS - 1, over = 0;
        path = p.direct ? 0 : 1;
        if (counted) find_bin(filter_hist, K, bin, over);  // (every warp: the filter's last barrier is behind)
        if (bin < BINS - 1) {  // the k-th key lies in a bin below the sample's largest key: search it
            const u32 lo = L + 1 + (bin << count_shift), width = (1u << count_shift) - 1u;
            const u32 hi = FULL - lo > width ? lo + width : FULL, m = filter_hist[bin];
            if (BIN_RANK && m <= BIN_RANK_MAX) {
                kth = rank_in_bin(ck, n_gt, lo, hi, m, K - over, sh.hist[0], sh, above);
                path = 4;
            } else {
                kth = kth_largest(cand, (int)n_gt, K - over, lo, hi, sh, &above);
                path = 5;
            }
            above += over;
        } else {
            u32 top = 0;
            for (u32 i = threadIdx.x; i < n_gt; i += NT) top = max(top, ck[i]);
            kth = kth_largest(cand, (int)n_gt, K, L + 1, block_reduce<true>(top, sh, buf), sh, &above);
        }
        STAMP(4);
        STAMP(5);
        OutSink sink{o_row, p.sok, above, K};
        u32 a = 0, e = 0;
        compact(cand, 0, (int)n_gt, kth, sink, a, e, sh, buf);
        STAMP(6);
    } else if (!overflow && n_gt <= (u32)p.cap && n_gt + n_eq >= K) {  // L is the k-th key: the ties fill up
        for (u32 q = threadIdx.x; q < n_gt; q += NT) o_row[(long long)q * p.sok] = ci[q];
        write_ties<NT>(p, row, off, o_row, n_gt, K - n_gt);
        path = p.direct ? 0 : 2;
    } else {  // the sample misled: the exact search over the row in memory
        exact_search(p, src, o_row, sh, buf);
        path = 3;
    }
#ifndef TOPK_STAMPS
    if (p.path != nullptr && threadIdx.x == 0) p.path[row] = path;
#else
    (void)path;
#endif
    if (SORTED) sort_selected(p, RowSrc<false, NT>{p.x + row * p.sxr, p.sxt}, o_row, sb);
    STAMP(7);
    STAMP_NS(14);
}

#define ENTRY(name, nt, blocks, vec, sorted) \
    extern "C" __global__ void __launch_bounds__(nt, blocks) name(const Params p) { topk_row<nt, vec, sorted>(p); }
ENTRY(topk_vec, BLOCK, MIN_BLOCKS, true, false)
ENTRY(topk_vec_sorted, BLOCK, MIN_BLOCKS, true, true)
ENTRY(topk_any, BLOCK, MIN_BLOCKS, false, false)
ENTRY(topk_any_sorted, BLOCK, MIN_BLOCKS, false, true)
ENTRY(topk_wide_vec, WIDE, 1, true, false)
ENTRY(topk_wide_vec_sorted, WIDE, 1, true, true)
ENTRY(topk_wide_any, WIDE, 1, false, false)
ENTRY(topk_wide_any_sorted, WIDE, 1, false, true)
// One contiguous sampled row a wide block, its threshold from the row's binned counts (p.bins; topk_cuda.launch's bins)
#define BINNED_ENTRY(name, sorted)                                                 \
    extern "C" __global__ void __launch_bounds__(WIDE, 1) name(const Params p) { \
        topk_row<WIDE, true, sorted, 0, true>(p);                                \
    }
BINNED_ENTRY(topk_wide_vec_binned, false)
BINNED_ENTRY(topk_wide_vec_binned_sorted, true)
#if __CUDA_ARCH__ >= 900
#define CLUSTER_ENTRY(name, vec, sorted)                                                             \
    extern "C" __global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(WIDE, 1) name(const Params p) { \
        topk_row<WIDE, vec, sorted, CLUSTER>(p);                                                     \
    }
CLUSTER_ENTRY(topk_cluster_vec, true, false)
CLUSTER_ENTRY(topk_cluster_vec_sorted, true, true)
CLUSTER_ENTRY(topk_cluster_any, false, false)
CLUSTER_ENTRY(topk_cluster_any_sorted, false, true)
#endif
