"""A toy training task for the generic trainer's tests (no LatteT2V / VAE needed), runnable as a script.

``python tests/train_helpers.py --output_dir D --max_train_steps N [...]`` trains it; under
``torchrun --nproc_per_node 2`` every process writes ``D/weights_rank<r>.sha256`` at the end so tests
can check that the replicas hold identical weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from opensora_plan.train.trainer import Phase, TrainConfig, TrainTask, train


class ToyRegressor(ModelMixin, ConfigMixin):
    """Two-layer MLP with dropout, so per-step RNG seeding matters for exact resume."""

    @register_to_config
    def __init__(self, dim: int = 8, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class ToyData(torch.utils.data.Dataset):
    """Fixed random pairs; each read adds random "augmentation" noise from the global torch RNG."""

    def __init__(self, n: int = 24, dim: int = 8):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(dim, dim, generator=g))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i] + 0.05 * torch.randn_like(self.x[i]), "y": self.y[i]}


class ToyTask(TrainTask):
    """Regression with noise drawn in the loss; ``two_phase`` adds a second model/optimizer (VAE-like).

    ``nan_calls``: indices of ``loss`` calls (counted over all phases and micro-batches) that return NaN.
    """

    def __init__(self, dim=8, lr=1e-2, two_phase=False, nan_calls=(), sleep=0.0, **data):
        torch.manual_seed(0)
        self.models = {"model": ToyRegressor(dim=dim)}
        if two_phase:
            self.models["critic"] = ToyRegressor(dim=dim, hidden=8)
        self.dataset = ToyData(dim=dim, **data)
        self.lr = lr
        self.nan_calls = set(nan_calls)  # indices of loss() calls that return NaN
        self.sleep = sleep
        self.calls = 0

    def phases(self):
        phases = []
        for name in self.models:
            params = [p for p in self.models[name].parameters()]
            opt = torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.999), weight_decay=1e-2)
            phases.append(Phase(name, opt, params, max_grad_norm=1.0, models=(name,)))
        return phases

    def loss(self, phase, batch, step, models, micro=0):
        call = self.calls
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        x = batch["x"] + 0.1 * torch.randn_like(batch["x"])
        if phase == "model":
            pred = models["model"](x)
            loss = ((pred - batch["y"]) ** 2).mean()
        else:
            with torch.no_grad():
                pred = models["model"](x)
            loss = ((models["critic"](pred) - batch["y"]) ** 2).mean()
        if call in self.nan_calls:
            loss = loss * float("nan")
        return loss, {f"{phase}_abs_pred": float(pred.detach().abs().mean())}

    def batch_size(self, batch):
        return len(batch["x"])


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_log(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_train_steps", type=int, required=True)
    parser.add_argument("--checkpointing_steps", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", default=None)
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--sharding", default="ddp")
    parser.add_argument("--deepspeed_config", default=None)
    parser.add_argument("--two_phase", action="store_true")
    parser.add_argument("--use_ema", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--num_samples", type=int, default=24)
    args = parser.parse_args(argv)
    task = ToyTask(two_phase=args.two_phase, sleep=args.sleep, n=args.num_samples)
    config = TrainConfig(
        output_dir=args.output_dir,
        max_train_steps=args.max_train_steps,
        train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        checkpointing_steps=args.checkpointing_steps,
        resume_from_checkpoint=args.resume_from_checkpoint,
        mixed_precision=args.mixed_precision,
        sharding=args.sharding,
        **({"deepspeed_config": args.deepspeed_config} if args.deepspeed_config else {}),
        use_ema=args.use_ema,
        report_to="none",
    )
    train(task, config)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if args.sharding == "fsdp2":
        from opensora_plan.train.sharding import full_model_state

        state = full_model_state(task.models["model"])
        digest = hashlib.sha256(b"".join(state[k].float().numpy().tobytes() for k in sorted(state))).hexdigest() if state else ""
        shard = hashlib.sha256(
            b"".join(p.to_local().detach().float().numpy().tobytes() for p in task.models["model"].parameters())
        ).hexdigest()
        (Path(args.output_dir) / f"weights_rank{rank}.sha256").write_text(f"{digest}\n{shard}\n")
    else:
        (Path(args.output_dir) / f"weights_rank{rank}.sha256").write_text(weights_hash(task.models["model"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
