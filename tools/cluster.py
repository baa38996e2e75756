"""Cluster a long-tailed image collection without labels: P²OT / SP²OT pseudo-labels on a timm or deit-lt backbone.

    python tools/cluster.py --config configs/cluster/digits_lt.yaml       # after tools/train.py digits_lt/vit.yaml
    python tools/cluster.py --config configs/cluster/cifar100_lt.yaml data.root=/data \\
        model.pretrained_file=/weights/dino_vitbase16_pretrain.pth            # DINO ViT-B/16 from a file on disk
    accelerate launch --multi_gpu --num_processes 4 tools/cluster.py --config configs/cluster/imagenet_r.yaml \\
        data.root=/data/imagenet-r model.pretrained_file=/weights/dino_vitbase16_pretrain.pth

The backbone is a timm model (`model.name`) with weights from `model.pretrained_file` (loaded through timm's
pretrained-file override, never downloaded; null: random init, e.g. a small network from scratch with
`model.train_blocks=all`) or a deit-lt model file (`model.checkpoint`: best.safetensors of tools/train.py). Only its
last `model.train_blocks` blocks and the cosine heads train. Labels are read for evaluation only.

Overrides are dotted config keys (`cluster.sp2ot=true optim.epochs=10 runtime.output_dir=runs/c wandb.mode=disabled`);
an unknown key is an error. `runtime.resume=auto` continues the run in `runtime.output_dir` exactly (banks and
solver warm starts are in the checkpoints). Outputs: report.json (per split and predictor: 'top1' = ACC, the
class-mean recall after Hungarian matching; 'overall_acc', 'nmi', 'ari', 'f1', head/mid/tail), best.safetensors
(label-free selection: lowest epoch loss / rho), last.safetensors (load either with
`deit_lt.cluster.model.load_cluster_model`), clusters.json (last and selected model on every split, the training
images included).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deit_lt.cli import config_parser, run_tool  # noqa: E402
from deit_lt.cluster.config import ClusterTrainConfig, validate_config  # noqa: E402
from deit_lt.config import load_config  # noqa: E402
from deit_lt.runtime import create_accelerator  # noqa: E402

COLUMNS = ('acc', 'overall_acc', 'nmi', 'ari', 'f1', 'head', 'mid', 'tail')


def format_clusters(splits: dict, title: str) -> str:
    """A table of every split and predictor: ACC (class-mean), overall accuracy, NMI, ARI, macro F1, head/mid/tail."""
    lines = [title, f'  {"split":<10}{"predictor":<16}' + ''.join(f'{c:>12}' for c in COLUMNS)]
    for split, report in splits.items():
        for name, r in report.items():
            if isinstance(r, dict):
                cells = ''.join(f'{r[c]:12.2f}' if isinstance(r.get(c), float) else f'{"-":>12}' for c in COLUMNS)
                lines.append(f'  {split:<10}{name:<16}{cells}')
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = config_parser(__doc__, 'configs/cluster/digits_lt.yaml').parse_args(argv)
    cfg = load_config(ClusterTrainConfig, args.config, args.overrides)
    validate_config(cfg)              # before any process group or device is set up
    accelerator = create_accelerator(cfg.runtime)
    try:
        from deit_lt.cluster.recipe import train_cluster
        result = train_cluster(cfg, accelerator)
    finally:
        accelerator.end_training()
    if accelerator.is_main_process:
        final = result['clusters']
        state = 'done' if result['finished'] else 'UNFINISHED'
        print(format_clusters(final['last'], f'[cluster] {state} after {result["progress"]["updates_done"]} updates: '
                                             f'last weights'))
        if 'selected' in final:
            sel = final['selected']
            print(format_clusters(sel['splits'], f'label-free selection: epoch {sel["epoch"] + 1} '
                                                 f'(score {sel["score"]:.4f})'))
        print(f'outputs in {cfg.runtime.output_dir} (clusters.json: the tables above)')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
