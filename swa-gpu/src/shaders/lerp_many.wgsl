// The SWA update over many tensors in one dispatch: dst_i += weight · (src_i − dst_i) for up to
// {{PAIRS}} (destination, source) pairs bound side by side, as if their elements were concatenated.
//
// One thread per element of the concatenation; `ends` holds the running element counts, so a thread
// finds its pair with at most {{PAIRS}} comparisons (uniform across a workgroup except at boundaries).
// The binding declarations and the pair selection are generated for the pair count when the pipeline
// is created (see kernels.rs).

struct Params {
    weight: f32,
    total: u32,
    pairs: u32,
    unused: u32,
    ends: array<vec4<u32>, 4>,
}

@group(0) @binding(0) var<uniform> p: Params;
{{BINDINGS}}

const WG: u32 = 256u;

fn end_of(pair: u32) -> u32 {
    return p.ends[pair / 4u][pair % 4u];
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.y * nwg.x * WG + gid.x;
    if (i >= p.total) { return; }
    let w = p.weight;
{{SELECT}}
}
