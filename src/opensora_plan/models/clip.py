"""CLIP image-text scoring from a local ``transformers`` CLIP folder (the CLIP score of T2V papers).

The folder is what ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained`` write (for
example a local copy of ``openai/clip-vit-base-patch16`` or ``openai/clip-vit-large-patch14``):
``config.json``, the weights, the tokenizer files and ``preprocessor_config.json``. Nothing is
downloaded.

Preprocessing is the folder's own CLIP image processor with the PIL backend, i.e. OpenAI CLIP's:
short side resized to the model's input size (bicubic), center crop, CLIP mean/std. The PIL backend
is forced so the numbers do not depend on whether torchvision happens to be installed. Prompts are
tokenized with truncation at the text model's length (77 tokens for OpenAI CLIP), keeping the
end-of-text token CLIP pools from.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..metrics import clip_score_from_embeddings

logger = logging.getLogger(__name__)


def _projected(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScorer:
    """Frame-wise CLIP score of videos against their prompts (see :func:`clip_score_from_embeddings`)."""

    def __init__(self, model, processor, device: torch.device | str = "cpu", batch_size: int = 32):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_text_tokens = model.config.text_config.max_position_embeddings

    @classmethod
    def from_folder(cls, path: str | os.PathLike, device: torch.device | str = "cpu", batch_size: int = 32) -> "CLIPScorer":
        """Load ``CLIPModel`` and ``CLIPProcessor`` from a local folder (float32).

        Raises FileNotFoundError when the folder or its ``config.json`` is missing.
        """
        from transformers import CLIPModel, CLIPProcessor

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIP folder {path} has no config.json; pass --clip_model with a local CLIP folder (CLIPModel + "
                "CLIPProcessor files, e.g. a copy of openai/clip-vit-base-patch16, docs/evaluation.md)."
            )
        model = CLIPModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True, backend="pil")
        return cls(model, processor, device=device, batch_size=batch_size)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected text features ``(N, D)`` float32 on the CPU."""
        tokens = self.processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return _projected(features).float().cpu()

    @torch.no_grad()
    def image_embeddings(self, frames) -> torch.Tensor:
        """Projected image features ``(T, D)`` float32 on the CPU, for uint8 frames ``(T, H, W, 3)``."""
        frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"CLIP scoring expects uint8 RGB frames (T, H, W, 3), got {frames.dtype} {frames.shape}.")
        out = []
        for start in range(0, len(frames), self.batch_size):
            pixels = self.processor.image_processor(images=list(frames[start : start + self.batch_size]),
                                                    return_tensors="pt")["pixel_values"]
            out.append(_projected(self.model.get_image_features(pixel_values=pixels.to(self.device))).float().cpu())
        return torch.cat(out)

    def frame_scores(self, frames, prompt: str) -> torch.Tensor:
        """CLIP score of every frame against ``prompt``: ``(T,)`` in [0, 100]."""
        return clip_score_from_embeddings(self.image_embeddings(frames), self.text_embeddings([prompt]))
