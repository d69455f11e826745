// Arithmetic throughput probe: the fp32 rate that the matrix-product kernels are compared with.
//
// Each thread runs eight independent chains of vec4 fused multiply-adds, x ← x·m + c, so that neither
// memory nor the latency of one chain limits the rate, only the device's FMA units. With m = 1 − c the
// chains converge to 1 and stay finite for any number of iterations. The final sum is written out so
// that the compiler cannot drop the work.

struct Params {
    threads: u32,
    iterations: u32,
    c: f32,
    unused: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn fma_chains(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.threads) { return; }
    let m = vec4<f32>(1.0 - p.c);
    let c = vec4<f32>(p.c);
    let start = f32(i % 1024u) / 1024.0;
    var x0 = vec4<f32>(start, start + 0.1, start + 0.2, start + 0.3);
    var x1 = x0 + vec4<f32>(0.01);
    var x2 = x0 + vec4<f32>(0.02);
    var x3 = x0 + vec4<f32>(0.03);
    var x4 = x0 + vec4<f32>(0.04);
    var x5 = x0 + vec4<f32>(0.05);
    var x6 = x0 + vec4<f32>(0.06);
    var x7 = x0 + vec4<f32>(0.07);
    for (var it = 0u; it < p.iterations; it = it + 1u) {
        x0 = fma(x0, m, c);
        x1 = fma(x1, m, c);
        x2 = fma(x2, m, c);
        x3 = fma(x3, m, c);
        x4 = fma(x4, m, c);
        x5 = fma(x5, m, c);
        x6 = fma(x6, m, c);
        x7 = fma(x7, m, c);
    }
    let total = (x0 + x1) + (x2 + x3) + ((x4 + x5) + (x6 + x7));
    out[i] = (total.x + total.y) + (total.z + total.w);
}
