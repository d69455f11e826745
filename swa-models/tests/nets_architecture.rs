//! Network names: parsing, display, and the errors for names and configurations that do not exist.

use swa_core::CpuBackend;
use swa_models::{Architecture, ModelError, Network, NetworkConfig};

#[test]
fn known_names_parse_and_display_back() {
    let named: Vec<String> = Architecture::NAMED
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        named,
        [
            "vgg16",
            "vgg16bn",
            "preresnet20",
            "preresnet56",
            "preresnet110",
            "preresnet164",
            "wrn16x4",
            "wrn28x10",
            "shakeshake26-2x32d",
            "shakeshake26-2x64d",
            "pyramidnet110a48",
            "pyramidnet272a200-bottleneck",
            "resnet50",
            "resnet152",
            "densenet161"
        ]
    );
    for name in named.iter().map(String::as_str).chain([
        "preresnet8",
        "preresnet47",
        "wrn10x1",
        "shakeshake14-2x4d",
        "pyramidnet20a8-bottleneck",
        "resnet101",
        "resnet14-w8",
        "densenet121",
        "densenet201",
        "densenet29-k8",
        "densenet161-k32",
    ]) {
        let architecture: Architecture = name.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(architecture.to_string(), name);
    }
    assert_eq!(
        "PreResNet164".parse::<Architecture>().unwrap(),
        Architecture::PreResNet { depth: 164 }
    );
    assert_eq!(
        "shakeshake26x64d".parse::<Architecture>().unwrap(),
        Architecture::ShakeShake {
            depth: 26,
            width: 64
        }
    );
    // The SWA paper's "PyramidNet-272" is Han et al.'s α = 200 bottleneck network.
    assert_eq!(
        "pyramidnet272".parse::<Architecture>().unwrap(),
        Architecture::PyramidNet {
            depth: 272,
            alpha: 200,
            bottleneck: true
        }
    );
    assert_eq!(
        "pyramidnet110".parse::<Architecture>().unwrap(),
        Architecture::PyramidNet {
            depth: 110,
            alpha: 48,
            bottleneck: false
        }
    );
    assert_eq!(
        "wrn28x10".parse::<Architecture>().unwrap(),
        Architecture::WideResNet {
            depth: 28,
            widen_factor: 10,
            dropout_rate: 0.0
        }
    );
}

#[test]
fn unknown_names_list_the_valid_ones() {
    for name in [
        "resnext50",
        "vgg19",
        "wrn28",
        "preresnetX",
        "",
        "pyramidnet164",
        "pyramidnet272-bottleneck",
    ] {
        match name.parse::<Architecture>() {
            Err(ModelError::UnknownArchitecture { name: got, valid }) => {
                assert_eq!(got, name);
                assert!(valid.contains("preresnet164") && valid.contains("wrn28x10"));
            }
            other => panic!("{name:?} gave {other:?}"),
        }
    }
    let message = "resnext50".parse::<Architecture>().unwrap_err().to_string();
    assert!(
        message.contains("resnext50")
            && message.contains("vgg16bn")
            && message.contains("resnet152")
            && message.contains("densenet161"),
        "{message}"
    );
}

#[test]
fn impossible_configurations_are_rejected() {
    // 21 is not 6n+2; 50 is not 9n+2; 2 has no blocks; 27 is not 6n+4; k = 0 has no channels.
    for name in [
        "preresnet21",
        "preresnet50",
        "preresnet2",
        "wrn27x2",
        "wrn28x0",
        // 27 is not 6n+2; an odd width cannot be split into the shortcut's two halves.
        "shakeshake27-2x64d",
        "shakeshake26-2x33d",
        // 111 is not 6n+2; 12 is not 9n+2.
        "pyramidnet111a48",
        "pyramidnet12a48-bottleneck",
        // 160 is neither torchvision's nor 8n+5; no channels grow with k = 0.
        "densenet160",
        "densenet21-k0",
    ] {
        assert!(
            matches!(
                name.parse::<Architecture>(),
                Err(ModelError::InvalidConfig { .. })
            ),
            "{name} was accepted"
        );
    }
    let backend = CpuBackend::with_threads(1);
    let config = NetworkConfig {
        architecture: Architecture::WideResNet {
            depth: 16,
            widen_factor: 1,
            dropout_rate: 1.5,
        },
        classes: 10,
    };
    assert!(matches!(
        Network::new(&backend, &config, 0),
        Err(ModelError::InvalidConfig { .. })
    ));
    let config = NetworkConfig {
        architecture: Architecture::Vgg16,
        classes: 0,
    };
    assert!(matches!(
        Network::new(&backend, &config, 0),
        Err(ModelError::InvalidConfig { .. })
    ));
}
