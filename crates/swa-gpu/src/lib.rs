//! # swa-gpu
//!
//! A WGSL compute backend that implements swa-core's `Backend` trait through wgpu, so that the networks of
//! swa-models train unchanged on any GPU wgpu reaches (Vulkan, Metal, DX12).
