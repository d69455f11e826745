//! Copies of slices along one axis, for [`ElementwiseOps::narrow`] and the writes into a slice
//! ([`ElementwiseOps::narrow_assign_`], [`ElementwiseOps::narrow_add_`]).
//!
//! [`ElementwiseOps::narrow`]: swa_core::backend::ElementwiseOps::narrow
//! [`ElementwiseOps::narrow_assign_`]: swa_core::backend::ElementwiseOps::narrow_assign_
//! [`ElementwiseOps::narrow_add_`]: swa_core::backend::ElementwiseOps::narrow_add_

use swa_core::backend::{AxisSlice, BackendResult, HasShape};

use crate::backend::{u32_extent, GpuBackend};
use crate::context::{Dispatch, GpuTensor, Params};
use crate::kernels;
use crate::uniforms::NarrowParams;

/// Which side of the copy holds the slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SliceSide {
    /// `dst = src[slice]`: `dst` is exactly the slice.
    Source,
    /// `dst[slice] = src` (or `+=`): `src` is exactly the slice.
    Destination { accumulate: bool },
}

impl GpuBackend {
    /// Encodes the copy of the `slice` of one side (the other side is the slice's size).
    pub(crate) fn copy_slice(
        &self,
        op: &'static str,
        dst: &GpuTensor,
        src: &GpuTensor,
        slice: AxisSlice,
        side: SliceSide,
    ) -> BackendResult<()> {
        let total = slice.numel();
        if total == 0 {
            return Ok(());
        }
        let extent = u32_extent(op, "extent along the axis", slice.extent)?;
        let start = u32_extent(op, "start along the axis", slice.start)?;
        let len = u32_extent(op, "slice length", slice.len)?;
        // The largest flat index either side reaches must fit the kernel's 32-bit indexing.
        u32_extent(
            op,
            "element count",
            slice.outer * slice.extent * slice.inner,
        )?;
        let (src_extent, src_start, dst_extent, dst_start, accumulate) = match side {
            SliceSide::Source => (extent, start, len, 0, false),
            SliceSide::Destination { accumulate } => (len, 0, extent, start, accumulate),
        };
        let params = Params::of(&NarrowParams {
            total: u32_extent(op, "element count", total)?,
            len,
            inner: u32_extent(op, "inner extent", slice.inner)?,
            src_extent,
            src_start,
            dst_extent,
            dst_start,
            accumulate: u32::from(accumulate),
        });
        self.ctx.encode(&[Dispatch::new(
            &kernels::COPY_SLICE,
            params,
            vec![dst, src],
            self.ctx.grid_1d(total),
        )])
    }

    /// `x[slice]` as a new tensor.
    pub(crate) fn narrow_into_new(
        &self,
        x: &GpuTensor,
        axis: usize,
        start: usize,
        len: usize,
    ) -> BackendResult<GpuTensor> {
        let slice = AxisSlice::new("narrow", x.dims(), axis, start, len)?;
        let mut dims = x.dims().to_vec();
        dims[axis] = len;
        let out = self.ctx.alloc("narrow", &dims)?;
        self.copy_slice("narrow", &out, x, slice, SliceSide::Source)?;
        Ok(out)
    }

    /// `dst[slice] = src` or `dst[slice] += src`.
    pub(crate) fn write_slice(
        &self,
        op: &'static str,
        dst: &GpuTensor,
        axis: usize,
        start: usize,
        src: &GpuTensor,
        accumulate: bool,
    ) -> BackendResult<()> {
        let slice = AxisSlice::filled_by(op, dst.dims(), axis, start, src.dims())?;
        self.copy_slice(op, dst, src, slice, SliceSide::Destination { accumulate })
    }
}
