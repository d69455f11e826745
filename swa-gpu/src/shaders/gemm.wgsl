// Tiled, register-blocked matrix product C[M, N] = A[M, K] · B[K, N] with pluggable operand loaders:
//
//   MODE 0: dense matmul; A and B are read through (row, column) strides, so transposes cost nothing;
//   MODE 1: convolution forward as implicit GEMM: A = weight [Cout, Cin·K·K], B = input patches
//           [Cin·K·K, N·OH·OW] gathered on the fly (no im2col buffer), C scattered to NCHW (+ bias);
//   MODE 2: convolution input gradient: A = weightᵀ [Cin, Cout·K·K], B = output-gradient taps
//           [Cout·K·K, N·H·W], C scattered to NCHW;
//   MODE 3: convolution weight gradient: A = dy [Cout, N·OH·OW], B = input patches [N·OH·OW, Cin·K·K].
//
// A workgroup computes a BM × BN tile; each thread accumulates TM × TN outputs in registers, rows strided
// by the workgroup's height and columns by its width so that neighbouring threads store neighbouring
// columns. The accumulators, their update and their stores are unrolled for the tile shape when the
// pipeline is created (see tiles.rs). The K loop runs in order inside one thread, so results are deterministic. With split-K
// (workgroup z), each z slice writes its partial product to its own [M, N] block; the host sums the
// blocks in order afterwards. Placeholders {{…}} are filled when the pipeline is created.
//
// Where rows of A (dense, or convolution weights) or of B (dense) are contiguous and a multiple of four
// long, the variant binds that operand as vec4 and loads its tile four values at a time (VEC_A / VEC_B);
// `lhs_at` / `rhs_at` read single values under either binding.

const BM: u32 = {{BM}}u;
const BN: u32 = {{BN}}u;
const BK: u32 = {{BK}}u;
const TM: u32 = {{TM}}u;
const TN: u32 = {{TN}}u;
const MODE: u32 = {{MODE}}u;
// The convolution's kernel size (1 for dense products) is a constant of the pipeline, so that the
// divisions that split a reduction index into channel and tap compile to multiplications.
const KSIZE: u32 = {{KSIZE}}u;
const TAPS: u32 = KSIZE * KSIZE;
const VEC_A: bool = {{VEC_A}};
const VEC_B: bool = {{VEC_B}};
const THREADS_N: u32 = BN / TN;
const THREADS_M: u32 = BM / TM;
const THREADS: u32 = THREADS_M * THREADS_N;
// Whether each thread's column in the B-tile loads stays the same (thread i takes column i mod BN).
const SAME_COLUMN: bool = THREADS % BN == 0u;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    k_chunk: u32,
    a_row_stride: u32,
    a_col_stride: u32,
    b_row_stride: u32,
    b_col_stride: u32,
    batch: u32,
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    oh: u32,
    ow: u32,
    ksize: u32,
    stride: u32,
    pad: u32,
    has_bias: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> lhs: array<{{LHS_ELEM}}>;
@group(0) @binding(2) var<storage, read> rhs: array<{{RHS_ELEM}}>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

{{ACCESSORS}}

var<workgroup> a_tile: array<f32, BK * BM>;
var<workgroup> b_tile: array<f32, BK * BN>;

// Input pixel of image `n`, channel `c` at padded coordinates (y, x), or 0 in the padding.
fn input_at(n: u32, c: u32, y: i32, x: i32) -> f32 {
    if (y < 0 || x < 0 || y >= i32(p.h) || x >= i32(p.w)) {
        return 0.0;
    }
    return rhs_at(((n * p.cin + c) * p.h + u32(y)) * p.w + u32(x));
}

fn load_a(row: u32, kk: u32) -> f32 {
    if (MODE == 0u) {
        return lhs_at(row * p.a_row_stride + kk * p.a_col_stride);
    } else if (MODE == 1u) {
        return lhs_at(row * p.k + kk);
    } else if (MODE == 2u) {
        // row = ci, kk = (co, tap)
        let co = kk / TAPS;
        let tap = kk % TAPS;
        return lhs_at((co * p.cin + row) * TAPS + tap);
    } else {
        // row = co, kk = (n, pixel)
        let pixels = p.oh * p.ow;
        let n = kk / pixels;
        let pixel = kk % pixels;
        return lhs_at((n * p.cout + row) * pixels + pixel);
    }
}

// What a column of B decomposes into, computed once per column: the divisions it takes cost more than
// the loads themselves. MODE 0: the column; MODE 1: image and the top-left input position of its output
// pixel's window; MODE 2: image and the input pixel shifted by the padding; MODE 3: input channel and the
// tap's offset from an output pixel's top-left input position.
struct Column {
    index: u32,
    y: i32,
    x: i32,
}

fn column(col: u32) -> Column {
    if (MODE == 0u) {
        return Column(col, 0, 0);
    } else if (MODE == 1u) {
        // col = (n, oy, ox)
        let pixels = p.oh * p.ow;
        let pixel = col % pixels;
        let y = i32((pixel / p.ow) * p.stride) - i32(p.pad);
        let x = i32((pixel % p.ow) * p.stride) - i32(p.pad);
        return Column(col / pixels, y, x);
    } else if (MODE == 2u) {
        // col = (n, iy, ix)
        let pixels = p.h * p.w;
        let pixel = col % pixels;
        return Column(col / pixels, i32(pixel / p.w) + i32(p.pad), i32(pixel % p.w) + i32(p.pad));
    } else {
        // col = (ci, ky, kx)
        let tap = col % TAPS;
        return Column(col / TAPS, i32(tap / KSIZE) - i32(p.pad), i32(tap % KSIZE) - i32(p.pad));
    }
}

fn load_b(kk: u32, c: Column) -> f32 {
    if (MODE == 0u) {
        return rhs_at(kk * p.b_row_stride + c.index * p.b_col_stride);
    } else if (MODE == 1u) {
        // kk = (ci, ky, kx)
        let tap = kk % TAPS;
        return input_at(c.index, kk / TAPS, c.y + i32(tap / KSIZE), c.x + i32(tap % KSIZE));
    } else if (MODE == 2u) {
        // kk = (co, ky, kx): the output position whose tap (ky, kx) lands on the column's input pixel.
        let co = kk / TAPS;
        let tap = kk % TAPS;
        let ty = c.y - i32(tap / KSIZE);
        let tx = c.x - i32(tap % KSIZE);
        let s = i32(p.stride);
        if (ty < 0 || tx < 0 || ty % s != 0 || tx % s != 0) {
            return 0.0;
        }
        let oy = u32(ty / s);
        let ox = u32(tx / s);
        if (oy >= p.oh || ox >= p.ow) {
            return 0.0;
        }
        return rhs_at(((c.index * p.cout + co) * p.oh + oy) * p.ow + ox);
    } else {
        // kk = (n, oy, ox)
        let pixels = p.oh * p.ow;
        let pixel = kk % pixels;
        let y = i32((pixel / p.ow) * p.stride) + c.y;
        let x = i32((pixel % p.ow) * p.stride) + c.x;
        return input_at(kk / pixels, c.index, y, x);
    }
}

fn store(split: u32, row: u32, col: u32, value: f32) {
    if (MODE == 1u) {
        let pixels = p.oh * p.ow;
        let n = col / pixels;
        var v = value;
        if (p.has_bias != 0u) {
            v = v + bias[row];
        }
        out[(n * p.cout + row) * pixels + col % pixels] = v;
    } else if (MODE == 2u) {
        let pixels = p.h * p.w;
        let n = col / pixels;
        out[(n * p.cin + row) * pixels + col % pixels] = value;
    } else {
        out[(split * p.m + row) * p.n + col] = value;
    }
}

@compute @workgroup_size({{THREADS_N}}, {{THREADS_M}}, 1)
fn main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let tid = lid.y * THREADS_N + lid.x;
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    let k_begin = wid.z * p.k_chunk;
    let k_end = min(p.k, k_begin + p.k_chunk);
    // With SAME_COLUMN a thread loads the same column of B at every step: decompose it once.
    let own_column = column(col0 + tid % BN);

    // The TM × TN accumulators are named scalars (generated for the tile shape), not an array, so that
    // every compiler keeps them in registers: some drivers place a function-local array in memory.
{{ACC_DECL}}

    for (var k0 = k_begin; k0 < k_end; k0 = k0 + BK) {
        // Neighbouring threads take neighbouring k for A (contiguous along a row-major A's rows)
        // and neighbouring columns for B (contiguous along a row-major B's rows).
        if (VEC_A) {
            // Rows of A are contiguous with length K, a multiple of 4, and k0 is too: whole vec4s.
            for (var i = tid; i < BK * BM / 4u; i = i + THREADS) {
                let m = i / (BK / 4u);
                let kk = (i % (BK / 4u)) * 4u;
                var v = vec4<f32>(0.0);
                if (row0 + m < p.m && k0 + kk < k_end) {
                    v = lhs_vec4(((row0 + m) * p.k + k0 + kk) / 4u);
                }
                a_tile[kk * BM + m] = v.x;
                a_tile[(kk + 1u) * BM + m] = v.y;
                a_tile[(kk + 2u) * BM + m] = v.z;
                a_tile[(kk + 3u) * BM + m] = v.w;
            }
        } else {
            for (var i = tid; i < BK * BM; i = i + THREADS) {
                let m = i / BK;
                let kk = i % BK;
                var v = 0.0;
                if (row0 + m < p.m && k0 + kk < k_end) {
                    v = load_a(row0 + m, k0 + kk);
                }
                a_tile[kk * BM + m] = v;
            }
        }
        if (VEC_B) {
            // Rows of B are contiguous with length N, a multiple of 4: whole vec4s along the columns.
            for (var i = tid; i < BK * BN / 4u; i = i + THREADS) {
                let kk = i / (BN / 4u);
                let c = (i % (BN / 4u)) * 4u;
                var v = vec4<f32>(0.0);
                if (col0 + c < p.n && k0 + kk < k_end) {
                    v = rhs_vec4(((k0 + kk) * p.n + col0 + c) / 4u);
                }
                b_tile[kk * BN + c] = v.x;
                b_tile[kk * BN + c + 1u] = v.y;
                b_tile[kk * BN + c + 2u] = v.z;
                b_tile[kk * BN + c + 3u] = v.w;
            }
        } else {
            for (var i = tid; i < BK * BN; i = i + THREADS) {
                let kk = i / BN;
                let c = i % BN;
                var v = 0.0;
                if (col0 + c < p.n && k0 + kk < k_end) {
                    var decomposed = own_column;
                    if (!SAME_COLUMN) {
                        decomposed = column(col0 + c);
                    }
                    v = load_b(k0 + kk, decomposed);
                }
                b_tile[kk * BN + c] = v;
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk = kk + 1u) {
            let a_base = kk * BM + lid.y;
            let b_base = kk * BN + lid.x;
{{ACC_UPDATE}}
        }
        workgroupBarrier();
    }

{{ACC_STORE}}
}

// Stores one accumulator when it lies inside the output.
fn store_inside(split: u32, row: u32, col: u32, value: f32) {
    if (row < p.m && col < p.n) {
        store(split, row, col, value);
    }
}
