"""tools/cluster.py end to end on the bundled digits_lt data: a short run writes Hungarian-matched metrics into its
report, the label-free selection and the final evaluation; a run stopped inside an epoch and resumed ends with the
same weights, banks and warm starts as an uninterrupted one (SP²OT, two heads); backbones from a deit-lt model file
and from a pretrained-file override; bad configs give one line and exit code 2; every shipped config loads."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from deit_lt.checkpoint import save_model_file
from deit_lt.cli import run_tool
from deit_lt.cluster.config import ClusterModelConfig, ClusterTrainConfig, validate_config
from deit_lt.cluster.model import create_backbone, load_cluster_model
from deit_lt.cluster.recipe import IndexedTrainBatches, cluster_report
from deit_lt.config import DataConfig, load_config
from deit_lt.data import create_datasets
from deit_lt.errors import CheckpointError, ConfigError

TOOL = REPO / 'tools' / 'cluster.py'
CONFIGS = sorted((REPO / 'configs' / 'cluster').glob('*.yaml'))
# a micro ViT trained from scratch on the pixels: no backbone file needed; 2 epochs of 6 micro-batches
SHORT = ['model.name=deit_micro_patch2_8', 'model.checkpoint=null', 'model.train_blocks=all', 'optim.epochs=2',
         'optim.batch_size=64', 'cluster.bank_size=128', 'cluster.bank_start_epoch=1', 'cluster.kmeans_n_init=1',
         'runtime.log_every=5', 'runtime.progress=false', 'wandb.mode=disabled']


def _main(argv: list[str]) -> tuple[int, str, str]:
    """tools/cluster.py's main() in this process: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location('cluster_tool', TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_tool(mod.main, argv)
    return code, out.getvalue(), err.getvalue()


def _run(out: Path, *overrides: str) -> dict:
    code, stdout, stderr = _main(['--config', str(REPO / 'configs' / 'cluster' / 'digits_lt.yaml'), *SHORT,
                                  f'runtime.output_dir={out}', *overrides])
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    return json.loads((out / 'report.json').read_text())


def test_short_run_reports_hungarian_metrics(tmp_path):
    out = tmp_path / 'run'
    report = _run(out, 'cluster.kmeans=[pixels,init,trained]')
    assert report['finished'] and report['kind'] == 'cluster' and report['headline'] == 'clusters'
    test = report['last']['test']
    assert set(report['predictors']) == {'clusters', 'kmeans_pixels', 'kmeans_init'}
    for name in report['predictors']:
        r = test[name]
        assert r['top1'] == r['acc'] and 0 <= r['acc'] <= 100 and 0 <= r['nmi'] <= 100
        assert len(r['per_class']) == 10 and sorted(set(r['mapping'])) == list(range(10))
    # balanced test split: the class-mean ACC is the overall accuracy
    assert test['clusters']['acc'] == pytest.approx(test['clusters']['overall_acc'])
    assert test['clusters']['top5'] >= test['clusters']['top1'] and test['num_samples'] == 400
    # label-free selection: a score from the training losses, and the history holds the OT statistics
    assert np.isfinite(report['best']['score']) and report['best']['predictor'] == 'clusters'
    train = report['history'][-1]['train']
    assert train['rho'] > 0.1 and 0 < train['mass'] <= 1.0 + 1e-6 and report['history'][-1]['bank']
    final = json.loads((out / 'clusters.json').read_text())
    for section in (final['last'], final['selected']['splits']):
        assert set(section) == {'test', 'val', 'train_set'}
        assert {'clusters', 'kmeans_pixels', 'kmeans_init', 'kmeans_trained'} <= set(section['train_set'])
    # on the long-tailed training split the class mean differs from the overall accuracy
    ts = final['last']['train_set']['clusters']
    assert ts['acc'] != pytest.approx(ts['overall_acc'])
    model, meta = load_cluster_model(out / 'last.safetensors')
    assert meta['num_clusters'] == 10 and model(torch.zeros(2, 1, 8, 8)).shape == (1, 2, 10)
    assert len(model.ot_state.banks[0]) == 128


def test_resume_inside_an_epoch_is_exact(tmp_path):
    """SP²OT with two heads, stopped after 9 of 12 updates (inside epoch 1, bank in use), then resumed."""
    extra = ['cluster.sp2ot=true', 'cluster.num_heads=2', 'cluster.mm_max_iter=3', 'cluster.max_iter=50',
             'cluster.eval_train=false']
    a = _run(tmp_path / 'a', *extra)
    _run(tmp_path / 'b', *extra, 'runtime.max_steps=9')
    b = _run(tmp_path / 'b', *extra, 'runtime.resume=auto')
    wa, wb = load_file(tmp_path / 'a' / 'last.safetensors'), load_file(tmp_path / 'b' / 'last.safetensors')
    assert wa.keys() == wb.keys() and any('ot_state.banks.1.memory' in k for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert a['last']['test']['clusters'] == b['last']['test']['clusters']
    # epoch 0 ran in the first process of run b; its record (and the selection score) came through the checkpoint
    assert a['history'][0]['train']['loss'] == b['history'][0]['train']['loss']
    assert a['best']['score'] == b['best']['score'] and a['best']['epoch'] == b['best']['epoch']


def test_indexed_batches_carry_the_dataset_ids():
    from accelerate import Accelerator

    from deit_lt.cluster.config import ClusterAugConfig, ClusterOptimConfig
    from deit_lt.recipe import create_run_data
    sets = create_datasets(DataConfig(name='digits_lt', imb_factor=10))
    data = create_run_data(sets, DataConfig(name='digits_lt'), ClusterAugConfig(hflip=0.0, num_workers=0),
                           ClusterOptimConfig(batch_size=50), accelerator=Accelerator(cpu=True), seed=3,
                           img_size=8, eval_batch_size=100, extra_views=[ClusterAugConfig()])
    batches = IndexedTrainBatches(data.train_batches)
    targets = torch.from_numpy(sets['train'].targets)
    seen = [b for b in batches.iter_epoch(2, start_step=1)]
    assert len(seen) == len(batches) - 1 and seen[0].step == 1 and seen[0].epoch == 2
    for b in seen:
        assert torch.equal(b.y, targets[b.ids]) and b.views[0].shape == b.x.shape
    assert len(torch.cat([b.ids for b in seen]).unique()) == sum(len(b.ids) for b in seen)


def test_cluster_report_hand_case():
    # clusters 1 -> class 0, 0 -> class 1, 2 -> class 2 (test_cluster's oracle case), plus a top-2 column
    top = np.array([[1, 0], [1, 2], [1, 0], [0, 1], [0, 2], [0, 2]])
    y = np.array([0, 0, 0, 1, 1, 2])
    r = cluster_report(top, y, {'head': [0], 'mid': [1], 'tail': [2]}, num_clusters=3, num_classes=3)
    assert r['top1'] == pytest.approx(200 / 3) and r['overall_acc'] == pytest.approx(500 / 6)
    assert (r['head'], r['mid'], r['tail']) == (100.0, 100.0, 0.0)
    assert r['top5'] == pytest.approx(100.0) and r['mapping'] == [1, 0, 2]
    assert cluster_report(top[:, :1], y, {}, 3, 3)['top5'] is None


def test_backbone_files(tmp_path):
    import timm
    # timm's pretrained-file override (no download): a tagged timm name with weights from a file on disk
    ref = timm.create_model('test_vit', num_classes=0, in_chans=1, img_size=16)
    torch.save({'state_dict': ref.state_dict()}, tmp_path / 'vit.pth')
    cfg = ClusterModelConfig(name='test_vit.r160_in1k', pretrained_file=str(tmp_path / 'vit.pth'), img_size=16)
    bb, arch, kwargs, size = create_backbone(cfg, 1)
    assert size == 16 and kwargs == {'in_chans': 1, 'img_size': 16} and arch == 'test_vit.r160_in1k'
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in bb.state_dict().items())
    torch.save({'state_dict': {k: v for k, v in ref.state_dict().items() if 'blocks.5' not in k}}, tmp_path / 'x.pth')
    with pytest.raises(CheckpointError, match='does not fit'):
        create_backbone(dataclasses.replace(cfg, pretrained_file=str(tmp_path / 'x.pth')), 1)
    # a deit-lt model file: rebuilt from its metadata, classifier dropped
    student = timm.create_model('deit_micro_distilled_patch2_8', num_classes=10, in_chans=1)
    save_model_file(tmp_path / 'student.safetensors', student.state_dict(),
                    {'arch': 'deit_micro_distilled_patch2_8', 'num_classes': 10, 'img_size': 8, 'in_chans': 1,
                     'model_kwargs': {'in_chans': 1}, 'kind': 'student'})
    bb, arch, _, _ = create_backbone(ClusterModelConfig(checkpoint=str(tmp_path / 'student.safetensors')), 1)
    assert arch == 'deit_micro_distilled_patch2_8' and bb(torch.zeros(3, 1, 8, 8)).shape == (3, 96)
    with pytest.raises(ConfigError, match='takes 1-channel images, the data has 3'):
        create_backbone(ClusterModelConfig(checkpoint=str(tmp_path / 'student.safetensors')), 3)


@pytest.mark.parametrize('overrides, message', [
    (['cluster.epsilon=0'], 'cluster.epsilon must be > 0'),
    (['cluster.epsilonn=0.1'], "unknown config key 'cluster.epsilonn'"),
    (['model.name=vit_base_patch16_224.dino', 'model.checkpoint=null'], 'model.pretrained_file'),
    (['aug.sampler=class_balanced'], 'without labels'),
    (['cluster.bank_size=100000'], 'cluster.bank_size=100000 must hold'),
])
def test_bad_config_is_one_line(tmp_path, overrides, message):
    code, stdout, stderr = _main(['--config', str(REPO / 'configs' / 'cluster' / 'digits_lt.yaml'), *SHORT,
                                  f'runtime.output_dir={tmp_path / "bad"}', *overrides])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], stderr


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path):
    weights = tmp_path / 'weights.pth'
    weights.touch()
    over = [] if path.name.startswith('_') else [f'model.pretrained_file={weights}']
    if path.name == 'digits_lt.yaml':
        over = [f'model.checkpoint={weights}']
    cfg = load_config(ClusterTrainConfig, path, over)
    if not path.name.startswith('_'):
        validate_config(cfg)
        assert cfg.runtime.output_dir.startswith('runs/cluster/') and cfg.runtime.eval_every == 1
