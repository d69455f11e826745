// Copies between a tensor and a slice of another along one axis: `narrow` (slice → new tensor),
// `narrow_assign_` and `narrow_add_` (tensor → slice of a destination). Both tensors are seen as
// [outer, extent, inner] around the axis; the slice is `len` long along it.
//
// One thread per element of the slice over a 2-D grid of 256-wide workgroups. Element `i` of the slice
// sits at `(o, c, k)` with `o = i / (len·inner)`, `c` the index within the slice, `k` the inner offset;
// it is read from `src` at `(o, src_start + c, k)` of `src_extent` and written to `dst` at
// `(o, dst_start + c, k)` of `dst_extent`, replacing or (flag `accumulate`) adding to what is there.

struct Params {
    total: u32,
    len: u32,
    inner: u32,
    src_extent: u32,
    src_start: u32,
    dst_extent: u32,
    dst_start: u32,
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn copy_slice(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.y * nwg.x * WG + gid.x;
    if (i >= p.total) { return; }
    let row = p.len * p.inner;
    let o = i / row;
    let r = i - o * row;
    let c = r / p.inner;
    let k = r - c * p.inner;
    let s = (o * p.src_extent + p.src_start + c) * p.inner + k;
    let d = (o * p.dst_extent + p.dst_start + c) * p.inner + k;
    if (p.accumulate != 0u) {
        dst[d] = dst[d] + src[s];
    } else {
        dst[d] = src[s];
    }
}
