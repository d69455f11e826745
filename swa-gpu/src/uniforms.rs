//! The kernels' uniform parameter blocks: one `#[repr(C)]` struct per WGSL `Params` struct, with the
//! same fields in the same order, so that a dispatch names every value it passes and two values of the
//! same type cannot be swapped silently. Each is 32-bit fields only (and, for the averaging kernel, an
//! array of `vec4<u32>`), so the Rust layout is the WGSL uniform layout.

use bytemuck::{Pod, Zeroable};
use swa_core::backend::BackendResult;

use crate::backend::u32_extent;

/// Declares a uniform block and the list of its field names, which a test compares with the shader's.
macro_rules! uniform {
    ($(#[$meta:meta])* $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
        pub(crate) struct $name {
            $(pub $field: $ty,)*
        }

        impl $name {
            /// The fields in declaration order, as the shader's `Params` must declare them.
            #[cfg(test)]
            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];
        }
    };
}

uniform! {
    /// `Params` of `elementwise.wgsl`: the element count, four scalar operands, a flag, a 64-bit seed in two
    /// halves and an inner extent (row length or row count), each kernel reading the ones it needs.
    ElementwiseParams {
        n: u32,
        a: f32,
        b: f32,
        c: f32,
        d: f32,
        flag: u32,
        seed_lo: u32,
        seed_hi: u32,
        inner: u32,
    }
}

impl ElementwiseParams {
    /// `n` elements, every other field zero; `op` names the operation when `n` does not fit 32 bits.
    pub fn count(op: &'static str, n: usize) -> BackendResult<Self> {
        Ok(Self {
            n: u32_extent(op, "element count", n)?,
            ..Self::default()
        })
    }
}

uniform! {
    /// `Params` of `narrow.wgsl`: the slice's element count and length along the axis, the extent after
    /// the axis, each side's extent along the axis and the slice's start in it, and whether the
    /// destination accumulates (1) or is overwritten (0).
    NarrowParams {
        total: u32,
        len: u32,
        inner: u32,
        src_extent: u32,
        src_start: u32,
        dst_extent: u32,
        dst_start: u32,
        accumulate: u32,
    }
}

uniform! {
    /// `Params` of `batchnorm.wgsl`.
    BatchNormParams {
        batch: u32,
        channels: u32,
        hw: u32,
        momentum: f32,
        eps: f32,
        total: u32,
    }
}

uniform! {
    /// `Params` of `gemm.wgsl`: the product's sizes, the operands' strides and, for the convolution modes,
    /// the convolution's geometry.
    GemmParams {
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
}

uniform! {
    /// `Params` of `pool.wgsl`.
    PoolParams {
        total: u32,
        channels: u32,
        h: u32,
        w: u32,
        oh: u32,
        ow: u32,
        kernel: u32,
        stride: u32,
        padding: u32,
    }
}

uniform! {
    /// `Params` of `loss.wgsl`.
    LossParams {
        rows: u32,
        classes: u32,
    }
}

uniform! {
    /// `Params` of `lerp_many.wgsl`: the weight, the concatenated element count, the number of pairs and the
    /// end of each pair's range in the concatenation (`ends[i / 4][i % 4]` for pair `i`).
    LerpManyParams {
        weight: f32,
        total: u32,
        pairs: u32,
        unused: u32,
        ends: [[u32; 4]; 4],
    }
}

// Every pair of the largest averaging dispatch has its entry in `ends`.
const _: () = assert!(crate::kernels::LERP_MANY_MAX_PAIRS <= 16);

uniform! {
    /// `Params` of `peak.wgsl`.
    PeakParams {
        threads: u32,
        iterations: u32,
        c: f32,
        unused: u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each struct's size is what the WGSL struct of the same fields occupies before its uniform
    /// padding: four bytes a field, and the averaging kernel's `ends` at offset 16.
    #[test]
    fn the_structs_have_the_shaders_field_layout() {
        assert_eq!(std::mem::size_of::<ElementwiseParams>(), 9 * 4);
        assert_eq!(std::mem::size_of::<NarrowParams>(), 8 * 4);
        assert_eq!(std::mem::size_of::<BatchNormParams>(), 6 * 4);
        assert_eq!(std::mem::size_of::<GemmParams>(), 19 * 4);
        assert_eq!(std::mem::size_of::<PoolParams>(), 9 * 4);
        assert_eq!(std::mem::size_of::<LossParams>(), 2 * 4);
        assert_eq!(std::mem::size_of::<LerpManyParams>(), 4 * 4 + 16 * 4);
        assert_eq!(std::mem::offset_of!(LerpManyParams, ends), 16);
        assert_eq!(std::mem::size_of::<PeakParams>(), 4 * 4);
    }

    #[test]
    fn the_shaders_declare_the_same_fields_in_the_same_order() {
        let fields = |source: &str| -> Vec<String> {
            let start = source.find("struct Params {").expect("a Params struct") + 15;
            let end = start + source[start..].find('}').expect("its end");
            // One `name: type,` a line (a type may hold commas: `array<vec4<u32>, 4>`).
            source[start..end]
                .lines()
                .filter_map(|line| line.split_once(':'))
                .map(|(name, _)| name.trim().to_string())
                .collect()
        };
        let shaders = [
            (
                include_str!("shaders/elementwise.wgsl"),
                ElementwiseParams::FIELDS,
            ),
            (include_str!("shaders/narrow.wgsl"), NarrowParams::FIELDS),
            (
                include_str!("shaders/batchnorm.wgsl"),
                BatchNormParams::FIELDS,
            ),
            (include_str!("shaders/gemm.wgsl"), GemmParams::FIELDS),
            (include_str!("shaders/pool.wgsl"), PoolParams::FIELDS),
            (include_str!("shaders/loss.wgsl"), LossParams::FIELDS),
            (
                include_str!("shaders/lerp_many.wgsl"),
                LerpManyParams::FIELDS,
            ),
            (include_str!("shaders/peak.wgsl"), PeakParams::FIELDS),
        ];
        for (source, expected) in shaders {
            assert_eq!(fields(source), expected);
        }
    }
}
