"""Label-free clustering of long-tailed data with P²OT / SP²OT pseudo-labels: what `tools/cluster.py` trains, on the
run loop every recipe shares (`deit_lt.engine.fit`).

P²OT: Zhang*, Ren*, He, ICLR 2024 (arXiv 2401.09266), rhfeiyang/PPOT@bd6721c4b5f6581ae5cd896eba9cc9250c769997.
SP²OT: Zhang, Ren, He, arXiv 2404.03446, rhfeiyang/SPPOT@788a7a4670cc6c3205566cfda4d7fa502343daa8.

One training step (PPOT utils/train_utils.py `sk_train`, losses/losses.py:51-88): both augmented views of the batch
(`Batch.x` and `Batch.views[0]`) go through the model in one forward; per head, the detached logits of every
process are gathered and the OT pseudo-labeller solves on the head's memory bank (or on the batch before
`cluster.bank_start_epoch`): view 0 is enqueued and solved, view 1 overwrites the same slots and is solved again;
each view then learns the other's soft targets (`swapped_prediction_loss`); head losses are summed. rho follows
`rho_schedule` over optimizer updates. The bank is filled at the start of its first epoch from training batches of
that epoch (view 0, eval mode), as PPOT fills it from a fresh shuffle (train.py:176-178); the last batches of the
epoch are used, so the bank does not start with the very images of the first steps. SP²OT's k-NN graph is built
before training from the initial backbone's features of the training images (eval transform).

Labels are used only for evaluation. Each evaluated split gives, per predictor (`evaluate`):

- 'clusters': argmax of the head with the lowest loss of the epoch (PPOT's evaluated head); 'head<i>' for every
  head when there are several; 'kmeans_pixels' / 'kmeans_init' / 'kmeans_trained': scikit-learn k-means with K
  clusters on the split's images, on the initial backbone's features, on the evaluated backbone's features (the
  last only in the final evaluation: it is the slow part);
- after Hungarian matching of clusters to classes (`cluster_metrics`): **'top1' is the class-mean recall, the
  papers' ACC** (the same value as 'acc'; on the balanced test sets it equals the overall accuracy), 'top5' the
  class-mean recall of the 5 highest clusters mapped through the same matching, 'head' / 'mid' / 'tail' the mean
  recall inside the data's class groups, 'overall_acc' the sample-weighted accuracy, 'nmi', 'ari', 'f1' (macro),
  'per_class' and 'mapping' (cluster -> class).

The run loop evaluates 'test' and 'val' (when the data has one) after every `runtime.eval_every` epochs, into
report.json, the log and W&B. Label-free model selection (PPOT train.py:188-257): best.safetensors is the epoch with
the lowest (mean epoch loss of the best head) / rho at the epoch's last update. After training, `final_evaluation`
evaluates the last weights and that selected model on every split plus 'train_set' (the training images with the
eval transform, `cluster.eval_train`: clustering the collection itself is the task) into `clusters.json`.

Exact resume: the banks, the solvers' warm starts and the epoch's head losses are buffers of the model
(`deit_lt.cluster.model.OTState`), so every checkpoint holds them; rho is a function of (epoch, step); the k-NN graph
and the k-means baselines are recomputed from the initial weights, before the checkpoint is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

from einops import rearrange
import numpy as np
import torch
from torch import nn

from ..checkpoint import atomic_write_text, load_model_file
from ..data.pipeline import Batch, EvalBatches, TrainBatches, create_eval_batches
from ..engine import PlainUpdate, RunParts, fit, updates_per_epoch
from ..errors import ConfigError
from ..eval import compact_report
from ..metrics import split_accuracy
from ..models.factory import load_state_dict_checked, unwrap_model
from ..optim import create_optimizer, create_scheduler
from ..recipe import create_run_data, load_datasets, model_meta
from ..runtime import create_accelerator, gather_fn, want_compile
from ..seeding import seed_step
from .config import ClusterConfig, ClusterTrainConfig, validate_config
from .losses import pseudo_labels, selection_score, swapped_prediction_loss
from .metrics import UNMATCHED, cluster_metrics, kmeans_clusters
from .model import CLUSTER_ARCH, ClusterModel, OTState, create_backbone, set_trainable
from .ot import P2OTSolver, rho_schedule
from .sp2ot import KNNGraph, SP2OTSolver, knn_similarity

__all__ = ['IndexedBatch', 'IndexedTrainBatches', 'PseudoLabeller', 'cluster_report', 'cluster_parts',
           'train_cluster', 'TRAIN_SPLIT']

TRAIN_SPLIT = 'train_set'   # evaluation split of the training images ('train' is the run loop's training record)


# --------------------------------------------------------------------------------------------------------------
# Batches that know their dataset indices
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class IndexedBatch(Batch):
    """A `Batch` with the dataset index of each image and its place in the schedule."""
    ids: torch.Tensor | None = None
    epoch: int = 0
    step: int = 0


class IndexedTrainBatches:
    """`TrainBatches` whose micro-batches also carry their dataset indices (the bank stores them; SP²OT looks up
    the similarity graph with them). The indices are the sampler's order of the epoch, which is what the wrapped
    batches are drawn from."""

    def __init__(self, inner: TrainBatches):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        # everything else the run loop asks of its batches (batch_size, attach_run_dir, ...) is the wrapped one's
        if name == 'inner':
            raise AttributeError(name)
        return getattr(self.inner, name)

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[IndexedBatch]:
        order = torch.from_numpy(self.inner.epoch_indices(epoch))
        for step, b in enumerate(self.inner.iter_epoch(epoch, start_step), start=start_step):
            pos = self.inner.step_positions(step)
            ids = order[pos.start:pos.stop].to(b.y.device)
            yield IndexedBatch(b.x, b.y, b.x_clean, b.views, ids=ids, epoch=epoch, step=step)


@dataclasses.dataclass
class ClusterInputs:
    """A prepared micro-batch: both views stacked, and the OT targets once computed (so a second pass over the same
    micro-batch reuses them instead of enqueuing it again)."""
    x: torch.Tensor                     # (2B, C, H, W): view 0 then view 1
    ids: torch.Tensor                   # (B,) dataset indices
    epoch: int
    step: int
    targets: torch.Tensor | None = None  # (H, 2, B, K)


# --------------------------------------------------------------------------------------------------------------
# Pseudo-labels
# --------------------------------------------------------------------------------------------------------------

class PseudoLabeller:
    """The per-head OT solvers with the state they keep in the model (`OTState`), and the rho schedule.

    Args:
        cfg: the cluster section.
        state: the model's `OTState`.
        updates_per_epoch, epochs, accum_steps: the schedule (rho's t counts optimizer updates).
        graph: SP²OT's k-NN graph of the training set (None for P²OT).
        gather: concatenates a tensor over processes (identity in one process).
        rank: this process's index.
        world: the number of processes.
    """

    def __init__(self, cfg: ClusterConfig, state: OTState, *, updates_per_epoch: int, epochs: int, accum_steps: int,
                 graph: KNNGraph | None, gather: Callable[[torch.Tensor], torch.Tensor], rank: int = 0,
                 world: int = 1):
        self.cfg, self.state, self.graph, self.gather, self.rank, self.world = cfg, state, graph, gather, rank, world
        self.upe, self.total, self.accum = updates_per_epoch, updates_per_epoch * epochs, accum_steps
        self.solvers = [self._solver() for _ in range(len(state.warm))]

    def _solver(self) -> P2OTSolver | SP2OTSolver:
        c = self.cfg
        base = P2OTSolver(epsilon=c.epsilon, lam=c.lam, mode=c.mode, tol=c.tol, max_iter=c.max_iter,
                          warm_start=c.warm_start)
        if not c.sp2ot:
            return base
        return SP2OTSolver(base, mm_factor=c.mm_factor, mm_tol=c.mm_tol, mm_max_iter=c.mm_max_iter)

    def _base(self, h: int) -> P2OTSolver:
        s = self.solvers[h]
        return s.base if isinstance(s, SP2OTSolver) else s

    def rho_at(self, update: int) -> float:
        """Transported mass at optimizer update `update` (0-based over the whole run), after the mode's override."""
        c = self.cfg
        rho = rho_schedule(update, self.total, c.rho0, c.rho_max, c.rho_strategy)
        return self._base(0).effective_rho(rho)

    def rho(self, epoch: int, step: int) -> float:
        """rho of micro-step `step` of `epoch` (the update it belongs to)."""
        return self.rho_at(epoch * self.upe + step // self.accum)

    def rho_end(self, epoch: int) -> float:
        """rho of the last update of `epoch` (PPOT divides the epoch loss by it)."""
        return self.rho_at((epoch + 1) * self.upe - 1)

    def use_bank(self, epoch: int) -> bool:
        return len(self.state.banks) > 0 and epoch >= self.cfg.bank_start_epoch

    @torch.no_grad()
    def fill_banks(self, model: ClusterModel, batches: IndexedTrainBatches, epoch: int, autocast) -> None:
        """Fill empty banks at the start of their first epoch from the last batches of `epoch` (view 0, eval mode):
        as many micro-steps as the bank holds, all processes together."""
        if not self.use_bank(epoch) or len(self.state.banks[0]) > 0:
            return
        need = math.ceil(self.state.banks[0].size / (self.world * batches.inner.batch_size))
        was = model.training
        model.eval()
        try:
            for b in batches.iter_epoch(epoch, max(0, len(batches) - need)):
                with autocast():
                    z = model(b.x).float()                                 # (H, B, K)
                z = self.gather(rearrange(z, 'h b k -> b h k').contiguous())  # (world B, H, K)
                ids = self.gather(b.ids)
                for h, bank in enumerate(self.state.banks):
                    bank.enqueue(z[:, h], ids)
        finally:
            model.train(was)

    @torch.no_grad()
    def targets(self, logits: torch.Tensor, ids: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """OT targets of this process's rows.

        Args:
            logits: (H, 2B, K) logits of view 0 then view 1 (detached here).
            ids: (B,) dataset indices.

        Returns:
            (H, 2, B, K) float32 targets N * Q (N: rows solved), rows not renormalised.
        """
        h_, two_b, k = logits.shape
        b = two_b // 2
        z = rearrange(logits.detach().float(), 'h (v b) k -> b h v k', v=2).contiguous()   # (B, H, 2, K)
        z, gids = self.gather(z), self.gather(ids)
        rho = self.rho(epoch, step)
        use_bank = self.use_bank(epoch)
        rows = slice(self.rank * b, (self.rank + 1) * b)
        out = []
        for h, solver in enumerate(self.solvers):
            base = self._base(h)
            base.load_state_dict({'log_b': self.state.log_b[h].clone() if bool(self.state.warm[h]) else None})
            q = pseudo_labels(solver, [z[:, h, 0], z[:, h, 1]], rho, self.state.banks[h] if use_bank else None,
                              ids=gids, graph=self.graph)
            if base.log_b is not None:
                self.state.log_b[h].copy_(base.log_b)
                self.state.warm[h] = True
            out.append(torch.stack(q)[:, rows])
        return torch.stack(out)


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------

def _topk_class_mean(top: np.ndarray, mapping: np.ndarray, targets: np.ndarray, num_classes: int) -> float:
    hit = (mapping[top] == targets[:, None]).any(1)
    support = np.bincount(targets, minlength=num_classes)
    hits = np.bincount(targets[hit], minlength=num_classes)
    present = support > 0
    return float(np.mean(100.0 * hits[present] / support[present]))


def cluster_report(top: np.ndarray, targets: np.ndarray, groups: dict[str, list[int]], num_clusters: int,
                   num_classes: int) -> dict[str, Any]:
    """One predictor's metrics in the run loop's format (see the module docstring).

    Args:
        top: (N, k) cluster ids, highest first (k = 1 for hard assignments such as k-means: 'top5' is then None).
        targets: (N,) class ids.
        groups: {'head', 'mid', 'tail': class ids}.
        num_clusters: K.
        num_classes: C.
    """
    m = cluster_metrics(top[:, 0], targets, num_clusters=num_clusters, num_classes=num_classes)
    mapping = np.asarray(m['mapping'])
    class_acc = torch.tensor(m['class_acc'], dtype=torch.float64)
    out: dict[str, Any] = {'top1': m['acc'],
                           'top5': _topk_class_mean(top[:, :5], mapping, targets, num_classes)
                           if top.shape[1] > 1 else None}
    out.update({k: None if math.isnan(v) else v for k, v in split_accuracy(class_acc, groups).items()})
    out.update({k: m[k] for k in ('acc', 'overall_acc', 'nmi', 'ari', 'f1')})
    out['per_class'] = [None if math.isnan(v) else round(v, 4) for v in m['class_acc']]
    out['mapping'] = mapping.tolist()
    out['unmatched_clusters'] = int((mapping == UNMATCHED).sum())
    return out


@torch.no_grad()
def _collect(model: ClusterModel, batches: EvalBatches, gather, autocast, *, features: bool, pixels: bool
             ) -> dict[str, torch.Tensor]:
    """Top-5 clusters of every head, targets and (optionally) features / flattened images of a split, on the CPU in
    dataset order."""
    was = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    try:
        for x, y in batches:
            with autocast():
                f = model.forward_features(x)
                z = model.forward_heads(f).float()                            # (H, B, K)
            k = min(5, z.shape[-1])
            items = {'top': rearrange(z.topk(k, dim=-1).indices, 'h b k -> b h k'), 'y': y}
            if features:
                items['features'] = f.float()
            if pixels:
                items['pixels'] = x.float().flatten(1)
            for name, t in items.items():
                parts.setdefault(name, []).append(t)
    finally:
        model.train(was)
    n = batches.num_total
    return {name: gather(torch.cat(ts).contiguous())[:n].cpu() for name, ts in parts.items()}


class ClusterEvaluator:
    """The `evaluate` hook: heads and k-means baselines on one split (see the module docstring)."""

    def __init__(self, cfg: ClusterConfig, groups: dict[str, list[int]], num_classes: int, num_clusters: int,
                 seed: int, gather, autocast):
        self.cfg, self.groups, self.num_classes, self.num_clusters = cfg, groups, num_classes, num_clusters
        self.seed, self.gather, self.autocast = seed, gather, autocast
        self.fixed: dict[str, dict[str, np.ndarray]] = {}   # split -> {predictor: k-means ids} on fixed features
        self.final = False    # k-means on the evaluated features only in the final evaluation (it is the slow part)

    def _kmeans(self, x: torch.Tensor) -> np.ndarray:
        return kmeans_clusters(x, self.num_clusters, seed=self.seed, n_init=self.cfg.kmeans_n_init)

    def prepare_fixed(self, model: ClusterModel, eval_batches: dict[str, EvalBatches]) -> None:
        """k-means on the images and on the initial features (computed once, before training)."""
        want = [w for w in ('pixels', 'init') if w in self.cfg.kmeans]
        if not want:
            return
        for split, batches in eval_batches.items():
            data = _collect(model, batches, self.gather, self.autocast, features='init' in want,
                            pixels='pixels' in want)
            self.fixed[split] = {f'kmeans_{w}': self._kmeans(data['features' if w == 'init' else 'pixels'])
                                 for w in want}

    def __call__(self, model: nn.Module, split: str, batches: EvalBatches) -> dict[str, Any]:
        net: ClusterModel = unwrap_model(model)
        trained = self.final and 'trained' in self.cfg.kmeans
        data = _collect(net, batches, self.gather, self.autocast, features=trained, pixels=False)
        y = data['y'].numpy()
        top = data['top'].numpy()                                             # (N, H, k)
        best = net.ot_state.best_head()
        report: dict[str, Any] = {'clusters': self._report(top[:, best], y)}
        if top.shape[1] > 1:
            report.update({f'head{h}': self._report(top[:, h], y) for h in range(top.shape[1])})
        for name, ids in self.fixed.get(split, {}).items():
            report[name] = self._report(ids[:, None], y)
        if trained:
            report['kmeans_trained'] = self._report(self._kmeans(data['features'])[:, None], y)
        report['selected_head'] = best
        report['num_samples'] = int(len(y))
        return report

    def _report(self, top: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return cluster_report(top, y, self.groups, self.num_clusters, self.num_classes)


# --------------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def _build_graph(model: ClusterModel, batches: EvalBatches, cfg: ClusterConfig, gather, autocast) -> KNNGraph:
    feats = _collect(model, batches, gather, autocast, features=True, pixels=False)['features']
    return knn_similarity(feats.to(next(model.parameters()).device), k=cfg.knn, sigma=cfg.knn_sigma)


class ClusterStep:
    """What a clustering run does per epoch and micro-batch: fill the memory banks at an epoch start, solve the OT
    problem for the pseudo-labels of a micro-batch (once: SAM-style second passes reuse them), the swapped-prediction
    loss of every head, and the label-free selection score."""

    def __init__(self, model: ClusterModel, labeller: 'PseudoLabeller', batches: IndexedTrainBatches, c, gather,
                 autocast):
        self.model, self.labeller, self.batches, self.c, self.gather, self.autocast = (model, labeller, batches, c,
                                                                                      gather, autocast)

    def on_epoch(self, epoch: int) -> dict[str, Any]:
        self.labeller.fill_banks(self.model, self.batches, epoch, self.autocast)
        return {'rho_end': self.labeller.rho_end(epoch), 'bank': self.labeller.use_bank(epoch)}

    def prepare(self, batch: IndexedBatch) -> ClusterInputs:
        return ClusterInputs(torch.cat([batch.x, batch.views[0]]), batch.ids, batch.epoch, batch.step)

    def loss(self, net: nn.Module, inputs: ClusterInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = net(inputs.x)                                                # (H, 2B, K)
        b = inputs.ids.shape[0]
        first = inputs.targets is None
        if first:
            inputs.targets = self.labeller.targets(logits, inputs.ids, inputs.epoch, inputs.step)
        losses = torch.stack([swapped_prediction_loss([z[:b], z[b:]], [t[0], t[1]])
                              for z, t in zip(logits, inputs.targets)])
        if first:   # the epoch's head losses over all processes (the evaluated head is the lowest)
            self.model.ot_state.add_losses(self.gather(losses.detach()[None]).mean(0), inputs.epoch)
        mass = inputs.targets[:, 0].sum(-1).mean()                           # selected mass per sample, ~ rho
        stats = {f'loss_head{h}': v.detach() for h, v in enumerate(losses)}
        stats.update(rho=losses.new_tensor(self.labeller.rho(inputs.epoch, inputs.step)), mass=mass.detach())
        return losses.sum(), stats

    def selection(self, report: dict, record: dict) -> float:
        """Label-free: minus the lowest head's mean epoch loss / rho at the epoch's end (higher is better). The loss
        sums of `OTState` cover the whole epoch even when it was resumed inside (the run loop's training record then
        covers only the resumed part)."""
        state = self.model.ot_state
        if int(state.loss_epoch) == record['epoch']:
            mean_loss = float(state.loss_sum.min()) / len(self.batches)
        else:
            losses = [record.get('train', {}).get(f'loss_head{h}') for h in range(self.c.num_heads)]
            if any(v is None for v in losses):
                return -math.inf
            mean_loss = min(losses)
        return -selection_score(mean_loss, self.labeller.rho_end(record['epoch']))


def cluster_parts(cfg: ClusterTrainConfig, accelerator, return_train_split: bool = False
                  ) -> RunParts | tuple[RunParts, EvalBatches | None]:
    """Build the clustering run (backbone + heads, OT pseudo-labeller, Adam, schedule, two-view data, evaluation,
    label-free selection) for `deit_lt.engine.fit`.

    With `return_train_split`, also the evaluation batches of the training images (`cluster.eval_train`; None when
    off), which `final_evaluation` adds: the run loop evaluates 'test' and 'val' after every epoch.
    """
    validate_config(cfg)
    device = accelerator.device
    c = cfg.cluster
    sets = load_datasets(cfg.data)
    train = sets['train']
    num_classes, in_chans = train.num_classes, train.in_chans
    num_clusters = c.num_clusters or num_classes

    # backbone and heads from runtime.seed: identical on every rank and in every repeat
    seed_step(cfg.runtime.seed)
    backbone, arch, bb_kwargs, img_size = create_backbone(cfg.model, in_chans)
    trainable = set_trainable(backbone, cfg.model.train_blocks)
    feat_dim = int(getattr(backbone, 'head_hidden_size', None) or backbone.num_features)
    model = ClusterModel(backbone, feat_dim, num_clusters, c.num_heads, c.logit_scale, c.bank_size).to(device)

    data = create_run_data(sets, cfg.data, cfg.aug, cfg.optim, accelerator=accelerator, seed=cfg.runtime.seed,
                           img_size=img_size, eval_batch_size=cfg.runtime.eval_batch_size, drop_last=True,
                           extra_views=[cfg.aug2 if cfg.aug2 is not None else cfg.aug])
    global_batch = cfg.optim.batch_size // cfg.optim.accum_steps
    if c.bank_size and not global_batch <= c.bank_size <= len(data.train_batches) * global_batch:
        raise ConfigError(f'cluster.bank_size={c.bank_size} must hold at least one micro-batch of all processes '
                          f'({global_batch}) and at most an epoch ({len(data.train_batches)} micro-batches)')
    eval_batches = dict(data.eval_batches)
    gather, autocast = gather_fn(accelerator), accelerator.autocast
    train_eval = None
    if c.eval_train or c.sp2ot:
        train_eval = create_eval_batches(train, cfg.aug, img_size=img_size, batch_size=cfg.runtime.eval_batch_size,
                                         device=device, num_replicas=accelerator.num_processes,
                                         rank=accelerator.process_index, placement=data.placement)
    graph = _build_graph(model, train_eval, c, gather, autocast) if c.sp2ot else None
    groups = {k: list(v) for k, v in train.splits.groups.items()}
    evaluator = ClusterEvaluator(c, groups, num_classes, num_clusters, cfg.runtime.seed, gather, autocast)
    evaluator.prepare_fixed(model, dict(eval_batches, **({TRAIN_SPLIT: train_eval} if c.eval_train else {})))

    optimizer = create_optimizer(model, cfg.optim, device)
    upe = updates_per_epoch(len(data.train_batches), cfg.optim.accum_steps)
    scheduler = create_scheduler(optimizer, cfg.optim, upe)
    batches = IndexedTrainBatches(data.train_batches)
    labeller = PseudoLabeller(c, model.ot_state, updates_per_epoch=upe, epochs=cfg.optim.epochs,
                              accum_steps=cfg.optim.accum_steps, graph=graph, gather=gather,
                              rank=accelerator.process_index, world=accelerator.num_processes)

    step = ClusterStep(model, labeller, batches, c, gather, autocast)

    meta = model_meta(data, cfg.data, arch=CLUSTER_ARCH, model_kwargs={}, img_size=img_size, config=cfg,
                      kind='cluster', backbone={'arch': arch, 'model_kwargs': bb_kwargs}, feature_dim=feat_dim,
                      num_clusters=num_clusters, num_heads=c.num_heads, logit_scale=c.logit_scale,
                      bank_size=c.bank_size)
    method = 'SP²OT' if c.sp2ot else {'ppot': 'P²OT', 'uot': 'UOT (rho = 1)', 'pot': 'POT (exact sizes)'}[c.mode]
    source = cfg.model.checkpoint or cfg.model.pretrained_file or 'random init'
    blocks = {'all': 'all of it', 0: 'none of it'}.get(cfg.model.train_blocks,
                                                        f'its last {cfg.model.train_blocks} block(s)')
    description = (f'{method} clustering, {arch} ({source}; {blocks} trained, {trainable:,} parameters) + '
                   f'{c.num_heads} cosine head(s) x {num_clusters} clusters @ {img_size} px; {cfg.data.name}: '
                   f'{len(train)} train images, labels for evaluation only; bank '
                   f'{c.bank_size or "off"}, eps {c.epsilon:g}, lam {c.lam:g}, rho {c.rho0:g} -> {c.rho_max:g}; '
                   f'global batch {cfg.optim.batch_size}, {cfg.optim.opt} lr {cfg.optim.lr:g}')
    parts = RunParts(kind='cluster', model=model, optimizer=optimizer, scheduler=scheduler, train_batches=batches,
                     eval_batches=eval_batches, loss_fn=step.loss, meta=meta, train_counts=train.train_counts.tolist(),
                     groups=groups, class_names=train.class_names, prepare=step.prepare, on_epoch=step.on_epoch,
                     update=PlainUpdate(cfg.optim.clip_grad), accum_steps=cfg.optim.accum_steps,
                     description=description, compile=want_compile(cfg.runtime.compile, device),
                     files={'class_map': {'student_label_of_original_id': train.class_map.tolist()}}
                     if train.class_map is not None else {},
                     evaluate=evaluator, selection=step.selection, headline='clusters')
    return (parts, train_eval if c.eval_train else None) if return_train_split else parts


def final_evaluation(parts: RunParts, report: dict, output_dir: str | Path, accelerator,
                     train_split: EvalBatches | None = None) -> dict:
    """Evaluate the last weights and best.safetensors (the label-free selection) on every split, the training images
    (`train_split`) and k-means on the evaluated features included; written to `clusters.json`.

    Returns:
        {'last': {split: report}, 'selected': {'epoch', 'score', 'splits': {split: report}}} ('selected' only when the
        run selected an epoch).
    """
    out = Path(output_dir)
    evaluator: ClusterEvaluator = parts.evaluate
    splits = dict(parts.eval_batches, **({TRAIN_SPLIT: train_split} if train_split is not None else {}))
    model = parts.model
    evaluator.final = True
    try:
        def run() -> dict:
            return {split: compact_report(evaluator(model, split, batches)) for split, batches in splits.items()}
        result: dict[str, Any] = {'last': run()}
        if 'best' in report:
            state_dict, _ = load_model_file(out / 'best.safetensors')
            load_state_dict_checked(model, state_dict, str(out / 'best.safetensors'))
            result['selected'] = {'epoch': report['best']['epoch'], 'score': report['best'].get('score'),
                                  'splits': run()}
    finally:
        evaluator.final = False
    if accelerator.is_main_process:
        atomic_write_text(out / 'clusters.json', json.dumps(result, indent=1))
    return result


def train_cluster(cfg: ClusterTrainConfig, accelerator=None) -> dict:
    """Train (or resume) the clustering run of `cfg`; returns the final report (report.json) with the final
    evaluation of the last and the label-free selected model on every split under 'clusters' (`clusters.json`).

    Args:
        cfg: the resolved config.
        accelerator: an `accelerate.Accelerator` (default: `deit_lt.runtime.create_accelerator(cfg.runtime)`).
    """
    validate_config(cfg)
    accelerator = accelerator or create_accelerator(cfg.runtime)
    parts, train_split = cluster_parts(cfg, accelerator, return_train_split=True)
    report = fit(parts, cfg.runtime, cfg.wandb, accelerator, name=cfg.name, epochs=cfg.optim.epochs, config=cfg)
    report['clusters'] = final_evaluation(parts, report, cfg.runtime.output_dir, accelerator, train_split)
    return report
