"""The training loop behind `python -m training.train`: set-up, steps, progress, checkpoints, and
the final save + evaluation + report."""
from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from medusa_vllm.bundled import bundled_model_path
from training.dataset import label_offsets
from training.distributed import (all_reduce_, init_distributed, no_grad_module, shutdown,
                                  wrap_model)
from training.model import LossConfig, MedusaTrainModel, StepOutput, load_base, new_heads
from training.sources import CachedRows, SequenceBatches
from training.state import load_state, save_state, state_path
from training.train import TrainConfig, load_splits, lr_lambdas


class Meter:
    """Sums over one log interval (per label column), reduced across ranks when read."""

    def __init__(self, groups: int, device: torch.device) -> None:
        self.groups, self.device = groups, device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros(self.groups, dtype=torch.float64, device=self.device)
        self.correct = torch.zeros(self.groups, dtype=torch.int64, device=self.device)
        self.valid = torch.zeros(self.groups, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros((), dtype=torch.int64, device=self.device)
        self.start = time.perf_counter()

    def add(self, out: StepOutput) -> None:
        self.loss += out.group_loss.detach().double() * out.num_valid
        self.correct += out.correct[:, 0]
        self.valid += out.num_valid
        self.positions += out.positions

    def read(self, info) -> dict:
        for t in (self.loss, self.correct, self.valid, self.positions):
            all_reduce_(t, info)
        n = self.valid.clamp(min=1)
        stats = {"loss": (self.loss / n).tolist(), "top1": (self.correct.double() / n).tolist(),
                 "positions": int(self.positions),
                 "tokens_per_s": int(self.positions) / max(time.perf_counter() - self.start, 1e-9)}
        self.reset()
        return stats


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.info = cfg, init_distributed(cfg.device)
        torch.manual_seed(cfg.seed)
        cfg.model = cfg.model or str(bundled_model_path())
        self.dtype = cfg.compute_dtype(self.info.device)
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        base = load_base(cfg.model, dtype=self.dtype, device=self.info.device, trainable=cfg.medusa2,
                         gradient_checkpointing=cfg.gradient_checkpointing)
        heads = new_heads(base, cfg.model, cfg.medusa_num_heads, cfg.medusa_num_layers,
                          cfg.own_lm_heads, self.info.device)
        loss = LossConfig(cfg.head_decay, cfg.heads_coefficient, cfg.base_loss_weight if cfg.medusa2 else 0.0,
                          cfg.ce_chunk_size, cfg.ce_backend)
        self.model = MedusaTrainModel(base, heads, loss, self.dtype)
        self.train_ex, self.held_ex, self.dropped = load_splits(cfg, heads.config.vocab_size)
        self.wrapped = wrap_model(self.model, self.info, fsdp=cfg.fsdp, find_unused=cfg.medusa2,
                                  param_dtype=self.dtype)
        self.nograd = no_grad_module(self.model, self.wrapped, cfg.fsdp)
        self.optimizer = self._optimizer()  # before any forward: FSDP swaps shards in and out
        offsets = label_offsets(cfg.medusa_num_heads, with_base=cfg.medusa2)
        start = time.perf_counter()
        if cfg.cache_hidden:
            self.source = CachedRows(self.nograd, self.train_ex, offsets, cfg.batch_tokens, cfg.seed,
                                     self.info, self.dtype)
        else:
            self.source = SequenceBatches(self.train_ex, offsets, cfg.batch_tokens, cfg.seed, self.info)
        self.cache_seconds = time.perf_counter() - start
        self.total = self._total_steps()
        self.warmup_heads = (self.total // 4 if cfg.warmup_heads_steps is None else cfg.warmup_heads_steps) \
            if cfg.medusa2 else 0
        self.scheduler = self._scheduler()
        self.meter = Meter(len(offsets), self.info.device)
        self.log_rows: list[dict] = []
        self.train_seconds, self.train_positions = 0.0, 0

    # ------------------------------------------------------------------ set-up
    def _total_steps(self) -> int:
        if self.source.steps_in_epoch(0) <= 0:
            raise ValueError(f"an epoch has no step on {self.info.world} process(es): more data or a "
                             "smaller --batch-tokens")
        full, frac = int(self.cfg.epochs), self.cfg.epochs - int(self.cfg.epochs)
        total = sum(self.source.steps_in_epoch(e) for e in range(full))
        total += int(frac * self.source.steps_in_epoch(full))
        if self.cfg.max_steps:
            total = min(total, self.cfg.max_steps) if self.cfg.epochs > 0 else self.cfg.max_steps
        if total <= 0:
            raise ValueError("the run has no steps: more data, more --epochs or a smaller --batch-tokens")
        return total

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW: heads at --lr; in Medusa-2 the base at --base-lr (param group 1)."""
        cfg = self.cfg
        groups = [{"params": [p for p in self.model.heads.parameters() if p.requires_grad], "lr": cfg.lr}]
        if cfg.medusa2:
            base = [p for p in self.model.base.parameters() if p.requires_grad]
            groups.append({"params": base, "lr": cfg.base_lr})
        fused = self.info.device.type == "cuda" and not cfg.fsdp
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                 fused=fused or None)

    def _scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        """Warm-up + cosine for the heads; the base's schedule starts after the heads' warm-up."""
        cfg = self.cfg
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, self.total // 20)
        lambdas = [lr_lambdas(self.total, warmup, cfg.min_lr_ratio)]
        if cfg.medusa2:
            lambdas.append(lr_lambdas(self.total, warmup, cfg.min_lr_ratio, delay=self.warmup_heads))
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)

    def _schedule(self, start: int) -> Iterator[tuple[int, int, int]]:
        """(global step, epoch, step in epoch) from `start` on."""
        step, epoch = 0, 0
        while step < self.total:
            for i in range(self.source.steps_in_epoch(epoch)):
                if step >= self.total:
                    return
                if step >= start:
                    yield step, epoch, i
                step += 1
            epoch += 1

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict | None:
        cfg, path = self.cfg, state_path(self.out)
        start = 0
        if cfg.resume and path.exists():
            start = load_state(path, config=self.config_dict(), model=self.model,
                               optimizer=self.optimizer, scheduler=self.scheduler)
            self._print(f"resumed from {path} at step {start}/{self.total}")
        elif cfg.resume:
            self._print(f"no checkpoint at {path}: starting from step 0")
        if not self.held_ex:
            self._print("warning: no held-out examples: no accuracy, calibrated tree or tau at the end")
        if start == 0 and self.info.is_main:
            (self.out / "train_log.jsonl").unlink(missing_ok=True)
        self._print(self._describe())
        bar = tqdm(total=self.total, initial=start, disable=not (cfg.progress and self.info.is_main),
                   desc="medusa-2" if cfg.medusa2 else "medusa-1", dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        self.meter.reset()
        for step, epoch, i in self._schedule(start):
            self._step(step, self.source.batch(epoch, i))
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == self.total:
                self._log(done, epoch, bar)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < self.total:
                self._quick_eval(done)
            if done % cfg.save_every == 0 and done < self.total:
                save_state(path, step=done, config=self.config_dict(), model=self.model,
                           optimizer=self.optimizer, scheduler=self.scheduler, is_main=self.info.is_main)
        bar.close()
        save_state(path, step=self.total, config=self.config_dict(), model=self.model,
                   optimizer=self.optimizer, scheduler=self.scheduler, is_main=self.info.is_main)
        from training.finish import finish

        summary = finish(self)
        # DDP's reducer and FSDP's sharded parameters hold the process group: free them while
        # every rank is alive (a gloo group destroyed late, in a destructor, can hang at exit)
        self.wrapped = self.nograd = self.model = self.optimizer = self.scheduler = None
        gc.collect()
        shutdown()
        return summary

    def _step(self, step: int, batch: dict) -> None:
        t0 = time.perf_counter()
        train_base = self.cfg.medusa2 and step >= self.warmup_heads
        out = self.wrapped(**batch, train_base=train_base)
        out.loss.backward()
        if self.cfg.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.step_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.add(out)
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        self.train_seconds += time.perf_counter() - t0
        self.train_positions += int(out.positions) * self.info.world

    def _log(self, step: int, epoch: int, bar: tqdm) -> None:
        stats = self.meter.read(self.info)
        lrs = self.step_lrs  # the LRs the last step used
        row = {"step": step, "epoch": epoch, "lr": lrs[0], **({"lr_base": lrs[1]} if len(lrs) > 1 else {}),
               **stats}
        self.log_rows.append(row)
        if not self.info.is_main:
            return
        base = 1 if self.cfg.medusa2 else 0
        heads = " ".join(f"h{k}:{stats['loss'][k + base]:.2f}/{100 * stats['top1'][k + base]:.0f}%"
                         for k in range(self.cfg.medusa_num_heads))
        if base:
            heads = f"base:{stats['loss'][0]:.2f}/{100 * stats['top1'][0]:.0f}% " + heads
        bar.set_postfix_str(f"{heads} {stats['tokens_per_s']:.0f} tok/s", refresh=False)
        if not (self.cfg.progress and sys.stderr.isatty()):
            print(f"step {step}/{self.total} loss/top1 {heads} | {stats['tokens_per_s']:.0f} tok/s",
                  flush=True)
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _quick_eval(self, step: int) -> None:
        from training.evaluate import measure_accuracy

        held = self.held_ex[: self.cfg.eval_max_examples]
        if not held:
            return
        rep = measure_accuracy(self.nograd, self.cfg.medusa_num_heads, held, self.info,
                               batch_tokens=self.cfg.batch_tokens, topk=1)
        self._print(f"step {step}: held-out top-1 per head " + " ".join(f"{a:.3f}" for a in rep.top1))

    # ------------------------------------------------------------------ helpers
    def config_dict(self) -> dict:
        return asdict(self.cfg)

    def _describe(self) -> str:
        kind = "Medusa-2 (base + heads)" if self.cfg.medusa2 else "Medusa-1 (heads only)"
        rows = f", {self.source.num_rows} cached rows/rank" if self.cfg.cache_hidden else ""
        return (f"{kind}: {len(self.train_ex)} train / {len(self.held_ex)} held-out examples"
                f"{rows}, {self.total} steps, world {self.info.world}, {self.dtype}, "
                f"device {self.info.device}")

    def _print(self, text: str) -> None:
        if self.info.is_main:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

