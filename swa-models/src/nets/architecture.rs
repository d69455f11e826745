//! Network names and their parsing.

use std::fmt;
use std::str::FromStr;

use swa_core::backend::{Backend, BackendError};

use super::preresnet::blocks_per_stage;
use super::{Network, NetworkConfig};
use crate::module::Module;

/// The names [`Architecture::from_str`] accepts beyond [`Architecture::NAMED`]: every depth of the two
/// residual families.
const GENERAL_NAMES: &str = "preresnet<depth> (depth = 6n+2 below 44, 9n+2 from 44), \
     wrn<depth>x<k> (depth = 6n+4), shakeshake<depth>-2x<width>d (depth = 6n+2, width even), \
     pyramidnet<depth>a<alpha> (basic blocks, depth = 6n+2) and pyramidnet<depth>a<alpha>-bottleneck \
     (depth = 9n+2) (pyramidnet110 and pyramidnet272: the published α = 48 and α = 200 bottleneck \
     networks), resnet<depth> (50, 101, 152, or 12n+2 with n blocks a stage) with an optional \
     -w<width> (the first stage's width, 64 by default), densenet<depth> (121, 161, 169, 201, or 8n+5 \
     with n layers a block) with an optional -k<growth> (the growth rate, 48 for 161 and 32 otherwise)";

/// Errors building a network.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A name that is not one of the known networks.
    #[error("unknown network {name:?}: valid names are {valid}")]
    UnknownArchitecture {
        /// The name that was given.
        name: String,
        /// The valid names ([`Architecture::valid_names`]).
        valid: String,
    },
    /// A known family with an impossible configuration (a PreResNet depth that is not 6n+2, …).
    #[error("invalid {architecture}: {message}")]
    InvalidConfig {
        /// The network.
        architecture: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// The backend failed while creating the network's tensors.
    #[error("creating the network's tensors: {0}")]
    Backend(#[from] BackendError),
}

/// One of the paper's architectures.
///
/// Parsed from and displayed as the names of the original code's command line: `vgg16`, `vgg16bn`,
/// `preresnet<depth>`, `wrn<depth>x<k>` (WideResNet without dropout; set
/// [`Architecture::WideResNet::dropout_rate`] to use it), and the Shake-Shake paper's
/// `shakeshake<depth>-2x<width>d` (also accepted without the `-2`: `shakeshake26x64d`), and PyramidNet's
/// `pyramidnet<depth>a<alpha>` (basic blocks) and `pyramidnet<depth>a<alpha>-bottleneck`; `pyramidnet110` and
/// `pyramidnet272` name the published α = 48 basic and α = 200 bottleneck networks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Architecture {
    /// VGG-16 without BatchNorm.
    Vgg16,
    /// VGG-16 with BatchNorm after every convolution.
    Vgg16Bn,
    /// Pre-activation ResNet of the given depth.
    PreResNet {
        /// Total depth: 6n+2 (basic blocks) below 44, 9n+2 (bottleneck blocks) from 44.
        depth: usize,
    },
    /// Wide ResNet.
    WideResNet {
        /// Total depth, 6n+4.
        depth: usize,
        /// Width multiplier `k`.
        widen_factor: usize,
        /// Dropout probability between the two convolutions of each block (0 leaves the layer out).
        dropout_rate: f32,
    },
    /// Shake-Shake (Gastaldi 2017) with two branches per block, mixed Shake-Shake-Image.
    ShakeShake {
        /// Total depth, 6n+2.
        depth: usize,
        /// Width of the first stage (the second and third are twice and four times as wide); even.
        width: usize,
    },
    /// PyramidNet (Han et al. 2017): widths growing by `alpha` over all blocks, zero-padded shortcuts.
    PyramidNet {
        /// Total depth: 6n+2 with basic blocks, 9n+2 with bottlenecks.
        depth: usize,
        /// The total growth of the width over the network's blocks.
        alpha: usize,
        /// Bottleneck blocks (three convolutions, output four times the width) rather than basic ones.
        bottleneck: bool,
    },
    /// torchvision's ResNet with bottleneck blocks, for ImageNet-sized inputs (any square input of at
    /// least 32 pixels): a 7×7 strided stem and max pooling, four stages, global average pooling.
    ResNet {
        /// 50, 101 or 152 (torchvision's stage sizes), or 12n+2 for n blocks in every stage.
        depth: usize,
        /// Width of the stem and of the first stage's bottlenecks (torchvision: 64); the later stages are
        /// 2, 4 and 8 times as wide, and blocks put out four times their width.
        width: usize,
    },
    /// torchvision's DenseNet-BC, for ImageNet-sized inputs (any square input of at least 32 pixels): a
    /// 7×7 strided stem and max pooling, four dense blocks with transitions between them, global
    /// average pooling.
    DenseNet {
        /// 121, 161, 169 or 201 (torchvision's block sizes), or 8n+5 for n layers in every block.
        depth: usize,
        /// Channels each dense layer adds (torchvision: 48 for DenseNet-161, 32 for the others); the
        /// stem is twice as wide and each layer's bottleneck four times.
        growth: usize,
    },
}

impl Architecture {
    /// The paper's networks (VGG-16, PreResNet-164, WRN-28-10), the variants the original code also
    /// names, the CPU-sized members of the residual families, Shake-Shake 26 2×64d with its CPU-sized
    /// 2×32d, PyramidNet-272 (α = 200, bottleneck) with its CPU-sized PyramidNet-110 (α = 48), and the
    /// paper's ImageNet ResNets and DenseNet-161: the one list that command lines, help texts and
    /// listings use.
    pub const NAMED: [Architecture; 15] = [
        Architecture::Vgg16,
        Architecture::Vgg16Bn,
        Architecture::PreResNet { depth: 20 },
        Architecture::PreResNet { depth: 56 },
        Architecture::PreResNet { depth: 110 },
        Architecture::PreResNet { depth: 164 },
        Architecture::WideResNet {
            depth: 16,
            widen_factor: 4,
            dropout_rate: 0.0,
        },
        Architecture::WideResNet {
            depth: 28,
            widen_factor: 10,
            dropout_rate: 0.0,
        },
        Architecture::ShakeShake {
            depth: 26,
            width: 32,
        },
        Architecture::ShakeShake {
            depth: 26,
            width: 64,
        },
        Architecture::PyramidNet {
            depth: 110,
            alpha: 48,
            bottleneck: false,
        },
        Architecture::PyramidNet {
            depth: 272,
            alpha: 200,
            bottleneck: true,
        },
        Architecture::RESNET50,
        Architecture::RESNET152,
        Architecture::DENSENET161,
    ];

    /// torchvision's ResNet-50.
    pub const RESNET50: Architecture = Architecture::ResNet {
        depth: 50,
        width: 64,
    };

    /// torchvision's ResNet-152.
    pub const RESNET152: Architecture = Architecture::ResNet {
        depth: 152,
        width: 64,
    };

    /// torchvision's DenseNet-161.
    pub const DENSENET161: Architecture = Architecture::DenseNet {
        depth: 161,
        growth: 48,
    };

    /// Whether the network is built for ImageNet (1000 classes, images of 224 pixels and more, any square
    /// size from 32 on) rather than for 32×32 CIFAR images.
    pub fn is_imagenet(&self) -> bool {
        matches!(
            self,
            Architecture::ResNet { .. } | Architecture::DenseNet { .. }
        )
    }

    /// The names [`Architecture::from_str`] accepts, for error messages and help texts: the named
    /// networks, then the general forms.
    pub fn valid_names() -> String {
        let named: Vec<String> = Self::NAMED.iter().map(ToString::to_string).collect();
        format!("{}, or in general {GENERAL_NAMES}", named.join(", "))
    }

    /// Checks that the configuration describes a network the original code builds exactly.
    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |message: String| ModelError::InvalidConfig {
            architecture: self.to_string(),
            message,
        };
        match *self {
            Architecture::Vgg16 | Architecture::Vgg16Bn => Ok(()),
            Architecture::PreResNet { depth } => {
                let (bottleneck, blocks) = blocks_per_stage(depth);
                let per_block = if bottleneck { 9 } else { 6 };
                if blocks == 0 || (depth - 2) % per_block != 0 {
                    Err(invalid(format!(
                        "depth {depth} must be 6n+2 below 44 (basic blocks) or 9n+2 from 44 \
                         (bottleneck blocks), with n ≥ 1"
                    )))
                } else {
                    Ok(())
                }
            }
            Architecture::WideResNet {
                depth,
                widen_factor,
                dropout_rate,
            } => {
                if depth < 10 || (depth - 4) % 6 != 0 {
                    Err(invalid(format!("depth {depth} must be 6n+4 with n ≥ 1")))
                } else if widen_factor == 0 {
                    Err(invalid("the widen factor must be positive".into()))
                } else if !(0.0..1.0).contains(&dropout_rate) {
                    Err(invalid(format!(
                        "dropout rate {dropout_rate} is outside [0, 1)"
                    )))
                } else {
                    Ok(())
                }
            }
            Architecture::ShakeShake { depth, width } => {
                if depth < 8 || (depth - 2) % 6 != 0 {
                    Err(invalid(format!("depth {depth} must be 6n+2 with n ≥ 1")))
                } else if width == 0 || width % 2 != 0 {
                    Err(invalid(format!(
                        "width {width} must be even and positive (the shortcut concatenates two \
                         halves)"
                    )))
                } else {
                    Ok(())
                }
            }
            Architecture::PyramidNet {
                depth, bottleneck, ..
            } => {
                let per_block = if bottleneck { 9 } else { 6 };
                if depth < per_block + 2 || (depth - 2) % per_block != 0 {
                    Err(invalid(format!(
                        "depth {depth} must be {per_block}n+2 with n ≥ 1 for {} blocks",
                        if bottleneck { "bottleneck" } else { "basic" }
                    )))
                } else {
                    Ok(())
                }
            }
            Architecture::ResNet { depth, width } => {
                if super::resnet::blocks_per_stage(depth).is_none() {
                    Err(invalid(format!(
                        "depth {depth} must be 50, 101, 152 or 12n+2 with n ≥ 1"
                    )))
                } else if width == 0 {
                    Err(invalid("the width must be positive".into()))
                } else {
                    Ok(())
                }
            }
            Architecture::DenseNet { depth, growth } => {
                if super::densenet::blocks_per_depth(depth).is_none() {
                    Err(invalid(format!(
                        "depth {depth} must be 121, 161, 169, 201 or 8n+5 with n ≥ 1"
                    )))
                } else if growth == 0 {
                    Err(invalid("the growth rate must be positive".into()))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Builds the network for `classes` classes, initialised from `seed`, as a boxed [`Module`].
    pub fn build<B: Backend>(
        &self,
        backend: &B,
        classes: usize,
        seed: u64,
    ) -> Result<Box<dyn Module<B>>, ModelError> {
        let config = NetworkConfig {
            architecture: *self,
            classes,
        };
        Ok(Box::new(Network::new(backend, &config, seed)?))
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Architecture::Vgg16 => write!(f, "vgg16"),
            Architecture::Vgg16Bn => write!(f, "vgg16bn"),
            Architecture::PreResNet { depth } => write!(f, "preresnet{depth}"),
            Architecture::WideResNet {
                depth,
                widen_factor,
                dropout_rate,
            } => {
                write!(f, "wrn{depth}x{widen_factor}")?;
                if *dropout_rate > 0.0 {
                    write!(f, " (dropout {dropout_rate})")?;
                }
                Ok(())
            }
            Architecture::ShakeShake { depth, width } => write!(f, "shakeshake{depth}-2x{width}d"),
            Architecture::PyramidNet {
                depth,
                alpha,
                bottleneck,
            } => {
                write!(f, "pyramidnet{depth}a{alpha}")?;
                if *bottleneck {
                    write!(f, "-bottleneck")?;
                }
                Ok(())
            }
            Architecture::ResNet { depth, width } => {
                write!(f, "resnet{depth}")?;
                if *width != 64 {
                    write!(f, "-w{width}")?;
                }
                Ok(())
            }
            Architecture::DenseNet { depth, growth } => {
                write!(f, "densenet{depth}")?;
                if *growth != super::densenet::default_growth(*depth) {
                    write!(f, "-k{growth}")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for Architecture {
    type Err = ModelError;

    fn from_str(name: &str) -> Result<Self, ModelError> {
        let unknown = || ModelError::UnknownArchitecture {
            name: name.to_string(),
            valid: Architecture::valid_names(),
        };
        let lower = name.trim().to_ascii_lowercase();
        let architecture = if lower == "vgg16" {
            Architecture::Vgg16
        } else if lower == "vgg16bn" {
            Architecture::Vgg16Bn
        } else if let Some(depth) = lower.strip_prefix("preresnet") {
            Architecture::PreResNet {
                depth: depth.parse().map_err(|_| unknown())?,
            }
        } else if let Some(rest) = lower.strip_prefix("wrn") {
            let (depth, widen) = rest.split_once('x').ok_or_else(unknown)?;
            Architecture::WideResNet {
                depth: depth.parse().map_err(|_| unknown())?,
                widen_factor: widen.parse().map_err(|_| unknown())?,
                dropout_rate: 0.0,
            }
        } else if let Some(rest) = lower.strip_prefix("shakeshake") {
            // shakeshake<depth>-2x<width>d, or shakeshake<depth>x<width>d.
            let rest = rest.strip_suffix('d').ok_or_else(unknown)?;
            let (depth, width) = rest
                .split_once("-2x")
                .or_else(|| rest.split_once('x'))
                .ok_or_else(unknown)?;
            Architecture::ShakeShake {
                depth: depth.parse().map_err(|_| unknown())?,
                width: width.parse().map_err(|_| unknown())?,
            }
        } else if let Some(rest) = lower.strip_prefix("pyramidnet") {
            // pyramidnet<depth>a<alpha>, optionally -bottleneck.
            let (rest, bottleneck) = match rest.strip_suffix("-bottleneck") {
                Some(rest) => (rest, true),
                None => (rest, false),
            };
            match rest.split_once('a') {
                Some((depth, alpha)) => Architecture::PyramidNet {
                    depth: depth.parse().map_err(|_| unknown())?,
                    alpha: alpha.parse().map_err(|_| unknown())?,
                    bottleneck,
                },
                // The depth alone names the configuration Han et al. published for it, as the SWA paper
                // names "PyramidNet-272".
                None if !bottleneck => match rest {
                    "110" => Architecture::PyramidNet {
                        depth: 110,
                        alpha: 48,
                        bottleneck: false,
                    },
                    "272" => Architecture::PyramidNet {
                        depth: 272,
                        alpha: 200,
                        bottleneck: true,
                    },
                    _ => return Err(unknown()),
                },
                None => return Err(unknown()),
            }
        } else if let Some(rest) = lower.strip_prefix("resnet") {
            // resnet<depth>, optionally -w<width>.
            let (depth, width) = match rest.split_once("-w") {
                Some((depth, width)) => (depth, width.parse().map_err(|_| unknown())?),
                None => (rest, 64),
            };
            Architecture::ResNet {
                depth: depth.parse().map_err(|_| unknown())?,
                width,
            }
        } else if let Some(rest) = lower.strip_prefix("densenet") {
            // densenet<depth>, optionally -k<growth>.
            let (depth, growth) = match rest.split_once("-k") {
                Some((depth, growth)) => (depth, Some(growth.parse().map_err(|_| unknown())?)),
                None => (rest, None),
            };
            let depth = depth.parse().map_err(|_| unknown())?;
            Architecture::DenseNet {
                depth,
                growth: growth.unwrap_or_else(|| super::densenet::default_growth(depth)),
            }
        } else {
            return Err(unknown());
        };
        architecture.validate()?;
        Ok(architecture)
    }
}
