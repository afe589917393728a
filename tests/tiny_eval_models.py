"""Tiny random CLIP and I3D files for evaluation tests (imported by test modules; no downloads).

``build_tiny_clip(folder)`` writes what ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained``
write for a real CLIP: a 2-layer, 32-wide text and vision tower, a byte-level BPE tokenizer with no
merges (every byte is a token, so any prompt encodes offline) and OpenAI CLIP's image preprocessing
at 32 px. ``save_tiny_i3d_torchscript(path)`` writes a TorchScript file with the call signature of
StyleGAN-V's ``i3d_torchscript.pt`` around a narrow :class:`InceptionI3d`. The scores mean nothing;
they exercise the real loading, tokenizing and preprocessing code.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from opensora_plan.models.i3d import InceptionI3d

IMAGE_SIZE = 32


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = Path(folder)
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


class StyleGANVInterface(torch.nn.Module):
    """``forward(x, rescale, resize, return_features)`` like StyleGAN-V's TorchScript I3D."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False):
        if rescale:
            x = x * 2 - 1
        if resize:
            x = torch.nn.functional.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        logits = self.net(x)
        return logits if return_features else torch.softmax(logits, dim=1)


def random_i3d(seed: int = 0, width_divisor: int = 16) -> InceptionI3d:
    """An I3D whose random weights keep the signal alive through its 60 layers (He-normal convs),
    so different clips get different logits; PyTorch's default init fades to a constant output."""
    generator = torch.Generator().manual_seed(seed)
    net = InceptionI3d(width_divisor=width_divisor)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("conv3d.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * (2.0 / param[0].numel()) ** 0.5)
            elif name.endswith("bn.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return net


def save_tiny_i3d_torchscript(path: str | Path, seed: int = 0, num_frames: int = 16) -> InceptionI3d:
    """Write the TorchScript file; returns the eager network it wraps (for computing expected values)."""
    net = random_i3d(seed)
    example = torch.zeros(1, 3, num_frames, 224, 224)
    with warnings.catch_warnings():  # the input checks and SAME padding are constants for one input size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(net, example, check_trace=False)
    torch.jit.save(torch.jit.script(StyleGANVInterface(traced)), str(path))
    return net
