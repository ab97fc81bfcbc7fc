// Row-wise top-k of fp32 logits in CUDA C++ (compiled at first use by NVRTC: topk_cuda.py).
//
// The algorithm and its output are those of topk.py (the Triton kernels): a sampled threshold L, a filtering
// pass that keeps the keys above L in index order (and the first k keys equal to L), an exact select among
// them, and the exact search over the row in memory when the sample misled. What CUDA adds is what Triton
// cannot say: a thread owns 16 contiguous keys, a warp scans its counts with shuffles, and a 4096-key chunk
// costs one barrier; the candidates stay in shared memory for the select; split rows (decode) write to
// per-split regions and the row's last CTA to finish gathers them, so one launch does the whole row.
//
// Keys: the float's bits with the magnitude bits of negatives flipped, -0.0 as +0.0 (topk.py's int32 key),
// here offset by 2^31 to compare as unsigned. Paths (recorded when `path` is given): 0 the whole row is the
// candidate set, 1 the k-th key lies above L, 2 L is the k-th key (the ties fill up), 3 the exact fallback.

typedef unsigned int u32;
typedef unsigned long long u64;

#define BLOCK 256
#define NWARPS (BLOCK / 32)
#define ROW_ITEMS 16  // contiguous keys a thread, per chunk of a row (four 16-byte loads)
#define SMEM_ITEMS 4  // contiguous entries a thread, per chunk of a shared-memory array (one 16-byte load)
#define MIN_BLOCKS 4  // blocks an SM keeps (64 registers a thread): enough bytes in flight to stream a row
#define FULL 0xffffffffu

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
};

static_assert(sizeof(Params) == 144, "Params: keep topk_cuda._Params in step");

struct Shared {  // the block's reduction and scan slots (two of each: one barrier per use)
    u32 sum[2][3][NWARPS];
    u64 scan[2][NWARPS];
    int last;
};

__device__ __forceinline__ u32 ukey(float x) {
    int b = __float_as_int(x);
    int key = b < 0 ? (b ^ 0x7fffffff) : b;
    return x == 0.0f ? 0x80000000u : ((u32)key ^ 0x80000000u);
}

__device__ __forceinline__ u32 warp_sum(u32 v) {
#if __CUDA_ARCH__ >= 800
    return __reduce_add_sync(FULL, v);
#else
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
#endif
}

// Block totals of three counts, in every thread (one barrier: the slots alternate).
__device__ __forceinline__ void block_sum3(u32 &a, u32 &b, u32 &c, Shared &sh, int &buf) {
    a = warp_sum(a);
    b = warp_sum(b);
    c = warp_sum(c);
    const int w = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
        sh.sum[buf][0][w] = a;
        sh.sum[buf][1][w] = b;
        sh.sum[buf][2][w] = c;
    }
    __syncthreads();
    a = b = c = 0;
#pragma unroll
    for (int i = 0; i < NWARPS; ++i) {
        a += sh.sum[buf][0][i];
        b += sh.sum[buf][1][i];
        c += sh.sum[buf][2][i];
    }
    buf ^= 1;
}

// Exclusive prefix of v over the block in thread order, and the block's total (one barrier).
__device__ __forceinline__ u64 block_scan(u64 v, u64 &total, Shared &sh, int &buf) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    u64 incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u64 y = __shfl_up_sync(FULL, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) sh.scan[buf][w] = incl;
    __syncthreads();
    u64 before = 0;
    total = 0;
#pragma unroll
    for (int i = 0; i < NWARPS; ++i) {
        u64 y = sh.scan[buf][i];
        before += i < w ? y : 0;
        total += y;
    }
    buf ^= 1;
    return before + incl - v;
}

// A row of the logits in global memory. VEC: contiguous and 16-byte aligned (float4 loads).
template <bool VEC>
struct RowSrc {
    const float *row;
    long long sxt;
    static const int ITEMS = ROW_ITEMS;
    __device__ __forceinline__ u32 get(int i) const { return ukey(row[(long long)i * sxt]); }
    __device__ __forceinline__ void load(int first, int hi, u32 (&key)[ITEMS], int (&idx)[ITEMS]) const {
        if (VEC && first + ITEMS <= hi) {
            const float4 *p = reinterpret_cast<const float4 *>(row + first);
#pragma unroll
            for (int v = 0; v < ITEMS / 4; ++v) {
                float4 f = p[v];
                key[4 * v] = ukey(f.x);
                key[4 * v + 1] = ukey(f.y);
                key[4 * v + 2] = ukey(f.z);
                key[4 * v + 3] = ukey(f.w);
            }
        } else {
#pragma unroll
            for (int j = 0; j < ITEMS; ++j) key[j] = first + j < hi ? get(first + j) : 0u;
        }
#pragma unroll
        for (int j = 0; j < ITEMS; ++j) idx[j] = first + j;
    }
};

// Keys (and their row indices) in shared memory, 16-byte aligned, entries past the end readable.
struct SmemSrc {
    const u32 *key;
    const int *idx;
    static const int ITEMS = SMEM_ITEMS;
    __device__ __forceinline__ u32 get(int i) const { return key[i]; }
    __device__ __forceinline__ void load(int first, int, u32 (&k)[ITEMS], int (&ix)[ITEMS]) const {
        uint4 a = *reinterpret_cast<const uint4 *>(key + first);
        int4 b = *reinterpret_cast<const int4 *>(idx + first);
        k[0] = a.x; k[1] = a.y; k[2] = a.z; k[3] = a.w;
        ix[0] = b.x; ix[1] = b.y; ix[2] = b.z; ix[3] = b.w;
    }
};

// The K-th largest of src's first n keys (n >= K): 16 steps of two bits, three counts a step.
template <class Src>
__device__ u32 kth_largest(const Src &src, int n, u32 K, Shared &sh, int &buf) {
    u32 thr = 0;
    for (int b = 30; b >= 0; b -= 2) {
        const u32 c1 = thr | (1u << b), c2 = thr | (2u << b), c3 = thr | (3u << b);
        u32 n1 = 0, n2 = 0, n3 = 0;
        for (int i = threadIdx.x; i < n; i += BLOCK) {
            const u32 u = src.get(i);
            n1 += u >= c1;
            n2 += u >= c2;
            n3 += u >= c3;
        }
        block_sum3(n1, n2, n3, sh, buf);
        thr = n3 >= K ? c3 : n2 >= K ? c2 : n1 >= K ? c1 : thr;
    }
    return thr;
}

// Keys of src's first n above thr (block total).
template <class Src>
__device__ u32 count_above(const Src &src, int n, u32 thr, Shared &sh, int &buf) {
    u32 a = 0, b = 0, c = 0;
    for (int i = threadIdx.x; i < n; i += BLOCK) a += src.get(i) > thr;
    block_sum3(a, b, c, sh, buf);
    return a;
}

// Entries [lo, hi) of src in index order: each key above thr goes to sink.gt at its rank among them
// (from n_gt on), each key equal to thr to sink.eq (from n_eq on); the counts grow by what was seen.
template <class Src, class Sink>
__device__ void compact(const Src &src, int lo, int hi, u32 thr, Sink &sink, u32 &n_gt, u32 &n_eq, Shared &sh,
                        int &buf) {
    const int ITEMS = Src::ITEMS;
    for (int base = lo; base < hi; base += BLOCK * ITEMS) {
        const int first = base + (int)threadIdx.x * ITEMS;
        u32 key[ITEMS];
        int idx[ITEMS];
        src.load(first, hi, key, idx);
        u32 fg = 0, fe = 0;
#pragma unroll
        for (int j = 0; j < ITEMS; ++j) {
            const bool ok = first + j < hi;
            fg |= (u32)(ok && key[j] > thr) << j;
            fe |= (u32)(ok && key[j] == thr) << j;
        }
        u64 total;
        const u64 ex = block_scan((u64)__popc(fg) | ((u64)__popc(fe) << 32), total, sh, buf);
        u32 pg = n_gt + (u32)ex, pe = n_eq + (u32)(ex >> 32);
#pragma unroll
        for (int j = 0; j < ITEMS; ++j) {
            if ((fg >> j) & 1u) sink.gt(pg++, key[j], idx[j]);
            if ((fe >> j) & 1u) sink.eq(pe++, idx[j]);
        }
        n_gt += (u32)total;
        n_eq += (u32)(total >> 32);
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

struct OutSink {  // the result's: every key above the k-th, then the first ties after them
    int *out;
    long long sok;
    u32 n_above, K;
    __device__ __forceinline__ void gt(u32 p, u32, int i) { out[(long long)p * sok] = i; }
    __device__ __forceinline__ void eq(u32 p, int i) {
        if (p < K - n_above) out[(long long)(n_above + p) * sok] = i;
    }
};

// The r-th largest key of nb blocks of sb contiguous keys spread evenly over the row (staged in s).
template <bool VEC>
__device__ u32 sampled_threshold(const Params &p, const RowSrc<VEC> &row, u32 *s, Shared &sh, int &buf) {
    const int ns = p.nb * p.sb;
    for (int i = threadIdx.x; i < ns; i += BLOCK) {
        const long long start = ((long long)(i / p.sb) * p.T) / p.nb;
        s[i] = row.get((int)(start + i % p.sb));
    }
    __syncthreads();
    SmemSrc src{s, nullptr};
    const u32 L = kth_largest(src, ns, (u32)p.r_sample, sh, buf);
    __syncthreads();  // the sample's slots are the candidates' next
    return L;
}

// Split rows: the last CTA copies every split's candidates (in split order: index order) into ck / ci and
// returns the counts; *overflow when some split kept more than its region holds.
__device__ void gather_splits(const Params &p, long long row, u32 *ck, int *ci, u64 *off, u32 &n_gt, u32 &n_eq,
                              bool &overflow, Shared &sh, int &buf) {
    const u32 *cnt = p.counts + row * p.nsplit * 2;
    u64 run = 0;
    int over = 0;
    for (int base = 0; base < p.nsplit; base += BLOCK) {
        const int s = base + threadIdx.x;
        u64 v = 0;
        if (s < p.nsplit) {
            const u32 g = __ldcg(cnt + 2 * s), e = __ldcg(cnt + 2 * s + 1);
            over |= g > (u32)p.reg;
            v = (u64)min(g, (u32)p.reg) | ((u64)min(e, (u32)p.treg) << 32);
        }
        u64 total;
        const u64 ex = block_scan(v, total, sh, buf);
        if (s < p.nsplit) off[s] = run + ex;
        run += total;
    }
    if (threadIdx.x == 0) off[p.nsplit] = run;
    overflow = __syncthreads_or(over) != 0;
    n_gt = (u32)run;
    n_eq = (u32)(run >> 32);
    if (overflow || n_gt > (u32)p.cap) return;
    const long long reg0 = row * p.nsplit;
    for (u32 q = threadIdx.x; q < n_gt; q += BLOCK) {
        int lo = 0, hi = p.nsplit - 1;  // the split s with off[s] <= q < off[s + 1] (candidates' half)
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if ((u32)off[mid] <= q) lo = mid; else hi = mid - 1;
        }
        const long long at = (reg0 + lo) * p.reg + (q - (u32)off[lo]);
        ck[q] = __ldcg(p.reg_key + at);
        ci[q] = __ldcg(p.reg_idx + at);
    }
    __syncthreads();
}

// The first `need` ties in index order to out[n_gt ...]: from the row's tie region (one split) or from every
// split's (their offsets in off's high halves).
__device__ void write_ties(const Params &p, long long row, const u64 *off, int *o_row, u32 n_gt, u32 need) {
    for (u32 q = threadIdx.x; q < need; q += BLOCK) {
        long long at;
        if (p.nsplit == 1) {
            at = row * p.treg + q;
        } else {
            int lo = 0, hi = p.nsplit - 1;
            while (lo < hi) {
                const int mid = (lo + hi + 1) >> 1;
                if ((u32)(off[mid] >> 32) <= q) lo = mid; else hi = mid - 1;
            }
            at = (row * p.nsplit + lo) * p.treg + (q - (u32)(off[lo] >> 32));
        }
        o_row[(long long)(n_gt + q) * p.sok] = __ldcg(p.reg_tie + at);
    }
}

// Sorted output: descending score, equal scores by ascending index (a bitonic sort of (key, ~index) pairs).
__device__ void sort_selected(const Params &p, const RowSrc<false> &row, int *o_row, u64 *sb) {
    __syncthreads();  // the indices just written are read back by other threads
    for (int i = threadIdx.x; i < p.kp; i += BLOCK) {
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
            for (int i = threadIdx.x; i < p.kp / 2; i += BLOCK) {
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
    for (int i = threadIdx.x; i < p.K; i += BLOCK) o_row[(long long)i * p.sok] = (int)(0xffffffffu - (u32)sb[i]);
}

template <bool VEC, bool SORTED>
__device__ void topk_row(const Params &p) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ Shared sh;
    int rbuf = 0, sbuf = 0;
    const long long row = blockIdx.x / p.nsplit;
    const int split = blockIdx.x % p.nsplit;
    const RowSrc<VEC> src{p.x + row * p.sxr, p.sxt};
    int *o_row = p.out + row * p.sor;
    const int ns = p.nb * p.sb;
    const int base_bytes = max(p.cap * 8, ns * 4);
    u32 *ck = reinterpret_cast<u32 *>(smem);
    int *ci = reinterpret_cast<int *>(ck + p.cap);
    u64 *sb = reinterpret_cast<u64 *>(smem + base_bytes);
    u64 *off = sb + (SORTED ? p.kp : 0);

    const u32 L = p.direct ? 0u : sampled_threshold(p, src, ck, sh, rbuf);
    u32 n_gt = 0, n_eq = 0;
    bool overflow = false;
    if (p.nsplit == 1) {
        BufferSink sink{ck, ci, p.reg_tie + row * p.treg, (u32)p.cap, (u32)p.treg};
        compact(src, 0, p.T, L, sink, n_gt, n_eq, sh, sbuf);
        __syncthreads();
    } else {
        const long long reg = row * p.nsplit + split;
        const int lo = split * p.seg, hi = min(lo + p.seg, p.T);
        BufferSink sink{p.reg_key + reg * p.reg, p.reg_idx + reg * p.reg, p.reg_tie + reg * p.treg, (u32)p.reg,
                        (u32)p.treg};
        compact(src, lo, hi, L, sink, n_gt, n_eq, sh, sbuf);
        if (threadIdx.x == 0) {
            p.counts[2 * reg] = n_gt;
            p.counts[2 * reg + 1] = n_eq;
        }
        __threadfence();  // this split's regions and counts, card-wide, before it counts itself done
        __syncthreads();
        if (threadIdx.x == 0) {
            sh.last = atomicAdd(p.done + row, 1u) == (u32)p.nsplit - 1;
            __threadfence();
        }
        __syncthreads();
        if (!sh.last) return;
        gather_splits(p, row, ck, ci, off, n_gt, n_eq, overflow, sh, sbuf);
    }

    const u32 K = (u32)p.K;
    int path;
    if (!overflow && n_gt <= (u32)p.cap && n_gt >= K) {  // the k-th key lies among the candidates
        SmemSrc cand{ck, ci};
        const u32 kth = kth_largest(cand, (int)n_gt, K, sh, rbuf);
        const u32 above = count_above(cand, (int)n_gt, kth, sh, rbuf);
        OutSink sink{o_row, p.sok, above, K};
        u32 a = 0, e = 0;
        compact(cand, 0, (int)n_gt, kth, sink, a, e, sh, sbuf);
        path = p.direct ? 0 : 1;
    } else if (!overflow && n_gt <= (u32)p.cap && n_gt + n_eq >= K) {  // L is the k-th key: the ties fill up
        for (u32 q = threadIdx.x; q < n_gt; q += BLOCK) o_row[(long long)q * p.sok] = ci[q];
        write_ties(p, row, off, o_row, n_gt, K - n_gt);
        path = p.direct ? 0 : 2;
    } else {  // the sample misled: the exact search over the row in memory
        const u32 kth = kth_largest(src, p.T, K, sh, rbuf);
        OutSink sink{o_row, p.sok, count_above(src, p.T, kth, sh, rbuf), K};
        u32 a = 0, e = 0;
        compact(src, 0, p.T, kth, sink, a, e, sh, sbuf);
        path = 3;
    }
    if (p.path != nullptr && threadIdx.x == 0) p.path[row] = path;
    if (SORTED) sort_selected(p, RowSrc<false>{p.x + row * p.sxr, p.sxt}, o_row, sb);
}

extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) topk_vec(const Params p) { topk_row<true, false>(p); }
extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) topk_vec_sorted(const Params p) { topk_row<true, true>(p); }
extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) topk_any(const Params p) { topk_row<false, false>(p); }
extern "C" __global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) topk_any_sorted(const Params p) { topk_row<false, true>(p); }
