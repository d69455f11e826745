"""Full-size check of PyTorch checkpoints in both directions against torchvision's ResNet-50 (too large
for a committed fixture; the committed golden tests use reduced networks of the same block classes).

    python swa-models/tools/torchvision_pth_check.py write DIR
        writes DIR/torchvision_resnet50.pth (torch.save of a random-weight torchvision resnet50 state_dict,
        BatchNorm statistics randomised) and DIR/resnet50_io.safetensors (one 224x224 image and
        torchvision's eval-mode logits for it);
    SWA_TORCHVISION_CHECK_DIR=DIR cargo test -p swa-models --release --test checkpoint_roundtrip \
        -- --ignored torchvision_resnet50
        loads the .pth into our resnet50, compares the logits, and writes DIR/ours_resnet50.pth;
    python swa-models/tools/torchvision_pth_check.py check DIR
        loads DIR/ours_resnet50.pth with torch.load and load_state_dict(strict=True) into torchvision's
        resnet50 and compares its logits with the stored ones.
"""
import os
import sys

import torch
import torchvision
from safetensors.torch import load_file, save_file


def write(out):
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(11)
    model.eval()
    image = torch.rand(1, 3, 224, 224) * 4.0 - 2.0
    with torch.no_grad():
        logits = model(image)
    torch.save(model.state_dict(), os.path.join(out, 'torchvision_resnet50.pth'))
    save_file({'input': image.contiguous(), 'logits': logits.contiguous()},
              os.path.join(out, 'resnet50_io.safetensors'))
    print(f'wrote {out}/torchvision_resnet50.pth; logits[:3] {logits[0, :3].tolist()}')


def check(out):
    io = load_file(os.path.join(out, 'resnet50_io.safetensors'))
    model = torchvision.models.resnet50()
    state = torch.load(os.path.join(out, 'ours_resnet50.pth'), weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(io['input'])
    scale = io['logits'].abs().max().item()
    error = (logits - io['logits']).abs().max().item() / scale
    print(f'ours_resnet50.pth: torch.load + load_state_dict(strict=True) accepted {len(state)} tensors; '
          f'largest logit difference {error:.2e} of the largest logit')
    if error > 1e-4:
        sys.exit(f'logits differ by {error:.2e} relative, expected at most 1e-4')


if __name__ == '__main__':
    if len(sys.argv) != 3 or sys.argv[1] not in ('write', 'check'):
        sys.exit(__doc__)
    {'write': write, 'check': check}[sys.argv[1]](sys.argv[2])
