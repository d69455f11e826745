//! # swa-data
//!
//! CIFAR-10 and CIFAR-100 from their official files: readers, download with checksums, augmentation, batches.
