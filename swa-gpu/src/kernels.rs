//! The WGSL kernels: sources, entry points and the storage bindings each entry point uses.

/// How a kernel uses one storage binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    Read(u32),
    Write(u32),
}

impl Access {
    pub(crate) fn binding(self) -> u32 {
        match self {
            Access::Read(b) | Access::Write(b) => b,
        }
    }
}

/// One compute entry point. Binding 0 is always the uniform parameter block; `storage` lists the
/// storage bindings in the order buffers are passed to a dispatch.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub family: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub storage: &'static [Access],
}

const ELEMENTWISE: &str = include_str!("shaders/elementwise.wgsl");
const NARROW: &str = include_str!("shaders/narrow.wgsl");
const GEMM: &str = include_str!("shaders/gemm.wgsl");
const BATCHNORM: &str = include_str!("shaders/batchnorm.wgsl");
const POOL: &str = include_str!("shaders/pool.wgsl");
const LOSS: &str = include_str!("shaders/loss.wgsl");
const LERP_MANY: &str = include_str!("shaders/lerp_many.wgsl");
const PEAK: &str = include_str!("shaders/peak.wgsl");

use Access::{Read as R, Write as W};

macro_rules! kernel {
    ($name:ident, $family:literal, $source:ident, $entry:literal, [$($access:expr),*]) => {
        pub(crate) const $name: Kernel = Kernel {
            family: $family,
            source: $source,
            entry: $entry,
            storage: &[$($access),*],
        };
    };
}

// Element-wise: 1 = dst (rw), 2 = src, 3 = aux (rw), 4 = src2.
kernel!(FILL, "elementwise", ELEMENTWISE, "fill", [W(1)]);
kernel!(SCALE, "elementwise", ELEMENTWISE, "scale", [W(1)]);
kernel!(AXPY, "elementwise", ELEMENTWISE, "axpy", [W(1), R(2)]);
kernel!(SGD, "elementwise", ELEMENTWISE, "sgd", [W(1), R(2), W(3)]);
kernel!(ADD, "elementwise", ELEMENTWISE, "add", [W(1), R(2), R(4)]);
kernel!(MUL, "elementwise", ELEMENTWISE, "mul", [W(1), R(2), R(4)]);
kernel!(
    SCALE_PER_IMAGE,
    "elementwise",
    ELEMENTWISE,
    "scale_per_image",
    [W(1), R(2), R(4)]
);
kernel!(RELU, "elementwise", ELEMENTWISE, "relu", [W(1), R(2)]);
kernel!(
    RELU_IN_PLACE,
    "elementwise",
    ELEMENTWISE,
    "relu_in_place",
    [W(1)]
);
kernel!(
    RELU_BACKWARD,
    "elementwise",
    ELEMENTWISE,
    "relu_backward",
    [W(1), R(2), R(4)]
);
kernel!(
    DROPOUT_MASK,
    "elementwise",
    ELEMENTWISE,
    "dropout_mask",
    [W(1)]
);
kernel!(
    ADD_ROW_BIAS,
    "elementwise",
    ELEMENTWISE,
    "add_row_bias",
    [W(1), R(2)]
);
kernel!(
    SUM_ROWS,
    "elementwise",
    ELEMENTWISE,
    "sum_rows",
    [W(1), R(2)]
);

// Slices along an axis: 1 = dst (rw), 2 = src.
kernel!(COPY_SLICE, "narrow", NARROW, "copy_slice", [W(1), R(2)]);

// GEMM: 1 = A source, 2 = B source, 3 = output, 4 = bias.
kernel!(GEMM_KERNEL, "gemm", GEMM, "main", [R(1), R(2), W(3), R(4)]);

// Batch norm.
kernel!(
    BN_STATS,
    "batchnorm",
    BATCHNORM,
    "stats",
    [R(1), R(3), R(4), W(5), W(6), W(7), W(8), W(9)]
);
kernel!(
    BN_EVAL_COEFF,
    "batchnorm",
    BATCHNORM,
    "eval_coeff",
    [R(3), R(4), R(16), R(17), W(9)]
);
kernel!(
    BN_APPLY,
    "batchnorm",
    BATCHNORM,
    "apply",
    [R(1), R(11), W(10)]
);
kernel!(
    BN_APPLY_RELU,
    "batchnorm",
    BATCHNORM,
    "apply_relu",
    [R(1), R(11), W(10)]
);
kernel!(
    BN_BACKWARD_REDUCE_RELU,
    "batchnorm",
    BATCHNORM,
    "backward_reduce_relu",
    [R(1), R(2), R(3), R(4), R(12), R(13), W(14), W(15)]
);
kernel!(
    BN_BACKWARD_APPLY_RELU,
    "batchnorm",
    BATCHNORM,
    "backward_apply_relu",
    [R(1), R(2), R(3), R(4), R(12), R(13), W(14), W(15), W(10)]
);
kernel!(
    BN_BACKWARD_REDUCE,
    "batchnorm",
    BATCHNORM,
    "backward_reduce",
    [R(1), R(2), R(12), R(13), W(14), W(15)]
);
kernel!(
    BN_BACKWARD_APPLY,
    "batchnorm",
    BATCHNORM,
    "backward_apply",
    [R(1), R(2), R(3), R(12), R(13), W(14), W(15), W(10)]
);
kernel!(
    CHANNEL_SUM,
    "batchnorm",
    BATCHNORM,
    "channel_sum",
    [R(2), W(15)]
);

// Pooling: 1 = x, 2 = dy, 3 = out.
kernel!(MAX_POOL, "pool", POOL, "max_forward", [R(1), W(3)]);
kernel!(
    MAX_POOL_BACKWARD,
    "pool",
    POOL,
    "max_backward",
    [R(1), R(2), W(3)]
);
kernel!(AVG_POOL, "pool", POOL, "avg_forward", [R(1), W(3)]);
kernel!(
    AVG_POOL_BACKWARD,
    "pool",
    POOL,
    "avg_backward",
    [R(2), W(3)]
);

// Losses: 1 = logits, 2 = labels, 3 = out, 4 = per-row loss, 5 = mean loss.
kernel!(SOFTMAX, "loss", LOSS, "softmax", [R(1), W(3)]);
kernel!(
    CROSS_ENTROPY_ROWS,
    "loss",
    LOSS,
    "cross_entropy_rows",
    [R(1), R(2), W(3), W(4)]
);
kernel!(MEAN_LOSS, "loss", LOSS, "mean_loss", [W(4), W(5)]);

// Throughput probe: 1 = one value per thread.
kernel!(FMA_CHAINS, "peak", PEAK, "fma_chains", [W(1)]);

/// The most (destination, source) pairs one fused averaging dispatch binds (`ends` holds 16 counts).
pub(crate) const LERP_MANY_MAX_PAIRS: usize = 8;

const LERP_MANY_ACCESS: [Access; 2 * LERP_MANY_MAX_PAIRS] = [
    W(1),
    R(2),
    W(3),
    R(4),
    W(5),
    R(6),
    W(7),
    R(8),
    W(9),
    R(10),
    W(11),
    R(12),
    W(13),
    R(14),
    W(15),
    R(16),
];

const fn lerp_many(pairs: usize) -> Kernel {
    Kernel {
        family: "lerp_many",
        source: LERP_MANY,
        entry: "main",
        storage: LERP_MANY_ACCESS.split_at(2 * pairs).0,
    }
}

/// `LERP_MANY_KERNELS[k - 1]` fuses `k` pairs.
pub(crate) static LERP_MANY_KERNELS: [Kernel; LERP_MANY_MAX_PAIRS] = [
    lerp_many(1),
    lerp_many(2),
    lerp_many(3),
    lerp_many(4),
    lerp_many(5),
    lerp_many(6),
    lerp_many(7),
    lerp_many(8),
];

/// The generated declarations and pair selection of the fused averaging kernel for `pairs` pairs.
pub(crate) fn lerp_many_variant(pairs: usize) -> Vec<(&'static str, String)> {
    let mut bindings = String::new();
    let mut select = String::new();
    for k in 0..pairs {
        bindings.push_str(&format!(
            "@group(0) @binding({}) var<storage, read_write> dst{k}: array<f32>;\n\
             @group(0) @binding({}) var<storage, read> src{k}: array<f32>;\n",
            2 * k + 1,
            2 * k + 2
        ));
        let start = if k == 0 {
            "0u".to_string()
        } else {
            format!("end_of({}u)", k - 1)
        };
        let keyword = if k == 0 { "if" } else { "} else if" };
        select.push_str(&format!(
            "    {keyword} (i < end_of({k}u)) {{\n\
             \x20       let j = i - {start};\n\
             \x20       let d = dst{k}[j];\n\
             \x20       dst{k}[j] = d + w * (src{k}[j] - d);\n"
        ));
    }
    select.push_str("    }\n");
    vec![
        ("{{PAIRS}}", pairs.to_string()),
        ("{{BINDINGS}}", bindings),
        ("{{SELECT}}", select),
    ]
}
