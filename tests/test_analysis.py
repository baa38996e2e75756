"""The analyses (deit_lt.analysis, tools/analyze.py): each measure against a hand computation, the hooks against
the model's own forward pass, and the tool end to end on untrained micro models over the real digits_lt data.

Hand computations: mean attention distance of constructed attention maps (uniform attention gives the mean pairwise
patch distance, attention to self gives 0, a two-patch map worked out by hand), the rank of constructed feature
matrices, agreement and split numbers counted by hand, reliability bins that reproduce `metrics.calibration_error`.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import deit_lt.models  # noqa: F401  (registers the micro students and the CIFAR ResNets)
from deit_lt.analysis import (FeatureRecorder, agreement, attention_hooks, attention_modules,
                              calibration_report, classifier_norms, expertise_report, load_analysis_config,
                              mean_attention_distance, numerical_rank, patch_distances, rank_summary,
                              reliability_bins, run_analysis, singular_values, variance_rank)
from deit_lt.checkpoint import CheckpointError, save_model_file
from deit_lt.cli import run_tool
from deit_lt.config import AugConfig, DataConfig, DistillConfig, ModelConfig, TeacherConfig, TrainConfig, to_dict
from deit_lt.data import create_datasets
from deit_lt.data.transforms import resolve_norm
from deit_lt.metrics import calibration_error
from deit_lt.models import create_model_from_checkpoint, model_outputs
from deit_lt.models.teacher import load_teacher

REPO = Path(__file__).resolve().parents[1]
DATA = DataConfig(name='digits_lt', imb_factor=10, split='index', split_bounds=[3, 7])
MEAN, STD = resolve_norm(AugConfig().mean, AugConfig().std, 1)
def _tool():
    spec = importlib.util.spec_from_file_location('analyze_tool', REPO / 'tools' / 'analyze.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FIGURES = ('attention_distance', 'feature_rank', 'feature_spectrum', 'expertise', 'classifier_norms', 'reliability')


# --------------------------------------------------------------------------------------------------------------
# Mean attention distance
# --------------------------------------------------------------------------------------------------------------

def test_patch_distances_are_pixel_distances_between_centres():
    d = patch_distances((2, 3), (4, 4))        # centres (2, 2), (2, 6), (2, 10), (6, 2), ...
    assert d.shape == (6, 6)
    assert d[0, 1] == pytest.approx(4.0) and d[0, 2] == pytest.approx(8.0) and d[0, 3] == pytest.approx(4.0)
    assert d[0, 5] == pytest.approx(float(np.hypot(4, 8)))
    assert torch.all(d.diagonal() == 0)


def test_uniform_attention_gives_mean_pairwise_distance_and_self_attention_zero():
    grid, patch, prefix = (3, 4), (2, 2), 2
    dist = patch_distances(grid, patch)
    n = dist.shape[0]
    t = prefix + n
    uniform = torch.full((2, 3, t, t), 1.0 / t)
    d, share = mean_attention_distance(uniform, dist, prefix)
    assert d.shape == (2, 3)
    assert torch.allclose(d, torch.full_like(d, dist.mean().item()), atol=1e-12)   # mean over all N x N pairs
    assert torch.allclose(share, torch.full_like(share, prefix / t))
    own = torch.zeros(1, 2, t, t)
    own[:, :, torch.arange(t), torch.arange(t)] = 1.0                               # every token attends to itself
    d, share = mean_attention_distance(own, dist, prefix)
    assert torch.all(d == 0) and torch.all(share == 0)


def test_attention_distance_hand_example():
    """Two patches 4 px apart, one CLS token. Query patch 0: 0.25 to CLS, 0.25 to itself, 0.5 to patch 1 ->
    (0.25 * 0 + 0.5 * 4) / 0.75 = 8/3 px; query patch 1: all to itself -> 0. Mean 4/3 px; CLS share (0.25 + 0) / 2.
    The CLS query row is not used (it has no position)."""
    attn = torch.tensor([[[[0.1, 0.2, 0.7],
                           [0.25, 0.25, 0.5],
                           [0.0, 0.0, 1.0]]]], dtype=torch.float64)
    d, share = mean_attention_distance(attn, patch_distances((1, 2), (4, 4)), 1)
    assert d.item() == pytest.approx(4.0 / 3.0)
    assert share.item() == pytest.approx(0.125)


def test_hooks_capture_the_blocks_own_attention_and_restore_fused_path():
    torch.manual_seed(0)
    model = timm.create_model('deit_micro_distilled_patch2_8', num_classes=10, in_chans=1).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        ref = model_outputs(model, x)
    mods = [m for _, m in attention_modules(model)]
    assert len(mods) == 4
    fused_before = [m.fused_attn for m in mods]
    inputs, maps = {}, {}
    pre = [m.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0])) for i, m in enumerate(mods)]
    with torch.no_grad(), attention_hooks(model, lambda i, a: maps.__setitem__(i, a.clone())) as n:
        out = model_outputs(model, x)
    for h in pre:
        h.remove()
    assert n == 4 and sorted(maps) == [0, 1, 2, 3]
    assert [m.fused_attn for m in mods] == fused_before
    for a, b in zip(out, ref):   # the unfused path computes the same function
        assert torch.allclose(a, b, atol=1e-5)
    t = 2 + 16
    for i, m in enumerate(mods):  # softmax(q k^T / sqrt(d)) from the block's own projections
        assert maps[i].shape == (5, 3, t, t)
        q, k, _ = m.qkv(inputs[i]).reshape(5, t, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
        expect = (q @ k.transpose(-2, -1) * m.head_dim ** -0.5).softmax(-1)
        assert torch.allclose(maps[i], expect, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Feature rank
# --------------------------------------------------------------------------------------------------------------

def test_rank_of_constructed_matrices():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.randn(5, 24, generator=g, dtype=torch.float64)
    f = a @ b                                            # rank 5
    assert numerical_rank(singular_values(f, center=False), 1e-8) == 5
    centred = (a - a.mean(0)) @ b                        # zero-mean columns: centring keeps rank 5
    assert numerical_rank(singular_values(centred), 1e-8) == 5
    offset = torch.ones(60, 1, dtype=torch.float64) @ torch.randn(1, 24, generator=g, dtype=torch.float64)
    assert numerical_rank(singular_values(centred + offset, center=False), 1e-8) == 6   # the offset adds one
    assert numerical_rank(singular_values(centred + offset), 1e-8) == 5                 # centring removes it
    # known spectrum 3, 2, 1: variance shares 9/14, 13/14, 14/14
    u, _ = torch.linalg.qr(torch.randn(40, 3, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64))
    m = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T
    s = singular_values(m, center=False)
    assert torch.allclose(s[:3], torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    assert [variance_rank(s, q) for q in (0.5, 0.9, 0.95, 1.0)] == [1, 2, 3, 3]
    assert numerical_rank(s, 0.5) == 2 and numerical_rank(s, 0.2) == 3
    summary = rank_summary(m, rtol=0.2, fraction=0.9, center=False)
    assert summary['rank'] == 3 and summary['variance_rank'] == 2
    assert summary['spectrum'][:3] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert numerical_rank(torch.zeros(3, dtype=torch.float64), 0.1) == 0


def test_feature_recorder_reads_block_outputs():
    torch.manual_seed(0)
    model = timm.create_model('deit_micro_distilled_patch2_8', num_classes=10, in_chans=1).eval()
    rec = FeatureRecorder(model)
    assert rec.sites == ['block 1', 'block 2', 'block 3', 'block 4'] and list(rec.tokens) == ['cls', 'dist']
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad(), rec.hooks():
        model_outputs(model, x[:4])
        model_outputs(model, x[4:])
    with torch.no_grad():
        tokens = model.forward_features(x)                # final norm of the last block's output
    assert rec.features('cls', 'block 4').shape == (7, 96)
    assert torch.allclose(model.norm(rec.features('cls', 'block 4')), tokens[:, 0], atol=1e-5)
    assert torch.allclose(model.norm(rec.features('dist', 'block 4')), tokens[:, 1], atol=1e-5)
    res = rec.result(rtol=1e-3)
    assert [r['num_samples'] for r in res['tokens']['dist']] == [7] * 4
    assert all(r['rank'] <= 6 for r in res['tokens']['cls'])   # 7 centred samples span at most 6 directions
    teacher = timm.create_model('resnet32', num_classes=10, in_chans=1, use_norm=True).eval()
    rec = FeatureRecorder(teacher)
    assert rec.kind == 'stages' and rec.sites == ['act1', 'layer1', 'layer2', 'layer3']
    with torch.no_grad(), rec.hooks():
        teacher(x)
    assert rec.features('pooled', 'layer3').shape == (7, 64)


# --------------------------------------------------------------------------------------------------------------
# Expertise, geometry, calibration
# --------------------------------------------------------------------------------------------------------------

def _onehot_logits(preds: list[int], num_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), num_classes).float()


def test_agreement_and_split_accuracy_hand_counts():
    groups = {'head': [0], 'mid': [1], 'tail': [2]}
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    cls = [0, 0, 0, 1, 1, 0, 0, 0, 2, 1]
    dist = [0, 0, 1, 1, 1, 1, 2, 2, 2, 0]
    teacher = [0, 0, 1, 0, 1, 1, 2, 2, 1, 0]
    rep = expertise_report({'cls': _onehot_logits(cls), 'dist': _onehot_logits(dist)}, targets, groups, 3,
                           teacher_logits=_onehot_logits(teacher))
    acc = rep['accuracy']
    # cls correct: head 3/4, mid 1/2, tail 1/4; dist: head 2/4, mid 2/2, tail 3/4
    assert acc['cls']['head'] == pytest.approx(75.0) and acc['cls']['mid'] == pytest.approx(50.0)
    assert acc['cls']['tail'] == pytest.approx(25.0) and acc['cls']['top1'] == pytest.approx(50.0)
    assert acc['dist']['per_class'] == pytest.approx([50.0, 100.0, 75.0])
    assert acc['dist']['top1'] == pytest.approx(70.0)
    assert acc['teacher']['top1'] == pytest.approx(70.0)   # right on samples 0, 1, 3, 4, 5, 6, 7
    # cls == dist on samples 0, 1, 3, 4, 8: head 3/4, mid 1/2, tail 1/4, overall 5/10
    cd = rep['agreement']['cls_dist']
    assert (cd['overall'], cd['head'], cd['mid'], cd['tail']) == pytest.approx((50.0, 75.0, 50.0, 25.0))
    # dist == teacher on samples 0, 1, 2, 4, 5, 6, 7, 9: head 3/4, mid 2/2, tail 3/4
    dt = rep['agreement']['dist_teacher']
    assert (dt['overall'], dt['head'], dt['mid'], dt['tail']) == pytest.approx((80.0, 75.0, 100.0, 75.0))
    assert dt['per_class'] == pytest.approx([75.0, 100.0, 75.0])
    assert set(rep['agreement']) == {'cls_dist', 'dist_teacher', 'cls_teacher'}
    empty = agreement(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), {'head': [0], 'tail': [2]}, 3)
    assert np.isnan(empty['tail']) and empty['per_class'] == [100.0, None, None]
    single = expertise_report({'logits': _onehot_logits(cls)}, targets, groups, 3)
    assert single['agreement'] == {}


def test_reliability_bins_reproduce_metrics_ece():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 7, generator=g) * 2
    targets = torch.randint(0, 7, (500,), generator=g)
    rep = calibration_report({'logits': logits}, targets, n_bins=10)['logits']
    conf, pred = logits.softmax(1).max(1)
    assert rep['ece'] == pytest.approx(calibration_error(conf, pred == targets, 10))
    n = torch.tensor(rep['count'], dtype=torch.float64)
    assert n.sum() == 500
    gaps = [c / 500 * abs(a - m) for c, a, m in zip(rep['count'], rep['accuracy'], rep['confidence']) if c]
    assert 100 * sum(gaps) == pytest.approx(rep['ece'])
    bins = reliability_bins(torch.tensor([0.0, 0.1, 0.55, 1.0]), torch.tensor([True, False, True, True]), 2)
    assert bins['count'] == [2, 2] and bins['accuracy'] == [0.5, 1.0]   # 0 goes to the first bin, 1 to the last


def test_classifier_norms_of_every_head():
    torch.manual_seed(0)
    student = timm.create_model('deit_micro_distilled_patch2_8', num_classes=10, in_chans=1)
    counts = list(range(100, 0, -10))
    norms = classifier_norms(student, counts)
    assert set(norms) == {'cls', 'dist'}
    assert norms['dist']['norms'] == pytest.approx(student.head_dist.weight.norm(dim=1).tolist())
    assert norms['cls']['type'] == 'linear' and norms['cls']['module'] == 'head'
    vit = timm.create_model('deit_micro_patch2_8', num_classes=10, in_chans=1)
    with torch.no_grad():
        vit.head.weight.copy_(torch.arange(10, 0, -1, dtype=torch.float32)[:, None].expand(10, 96) / 10)
    assert classifier_norms(vit, counts)['cls']['spearman_norm_vs_count'] == pytest.approx(1.0)
    teacher = timm.create_model('resnet32', num_classes=10, in_chans=1, use_norm=True)
    cnn = classifier_norms(teacher, counts)['cnn']
    assert cnn['type'] == 'cosine' and cnn['norms'] == pytest.approx(teacher.linear.weight.norm(dim=0).tolist())


# --------------------------------------------------------------------------------------------------------------
# The tool on digits_lt
# --------------------------------------------------------------------------------------------------------------

def _save(path: Path, model: torch.nn.Module, kind: str, arch: str, counts: list[int], splits: dict,
          model_kwargs: dict, config: dict, **extra) -> Path:
    meta = {'kind': kind, 'arch': arch, 'num_classes': 10, 'model_kwargs': model_kwargs, 'img_size': 8, 'in_chans': 1,
            'mean': list(MEAN), 'std': list(STD), 'train_counts': counts, 'class_names': [str(i) for i in range(10)],
            'class_map': None, 'dataset': {'name': 'digits_lt', 'imb_factor': 10}, 'splits': splits,
            'config': config, **extra}
    return save_model_file(path, model.state_dict(), meta)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """Untrained teacher (ResNet-32, cosine head), DeiT-LT student (distilled from it), ViT, and a 're-balanced'
    ViT whose head norms were flattened, saved as deit-lt model files with the metadata the tools write."""
    root = tmp_path_factory.mktemp('analysis_ckpts')
    train = create_datasets(DATA)['train']
    counts, splits = train.train_counts.tolist(), train.splits.as_dict()
    aug = AugConfig(mean=MEAN, std=STD, eval_crop_pct=1.0, num_workers=0)
    torch.manual_seed(0)
    teacher = timm.create_model('resnet32', num_classes=10, in_chans=1, use_norm=True)
    t_path = _save(root / 'teacher' / 'last.safetensors', teacher, 'teacher', 'resnet32', counts, splits,
                   {'in_chans': 1, 'use_norm': True},
                   {'data': to_dict(DATA), 'aug': to_dict(aug)}, use_norm=True, logit_scale=30.0,
                   loss={'type': 'ldam', 'drw_epoch': 0, 'sam': True})
    student = timm.create_model('deit_micro_distilled_patch2_8', num_classes=10, in_chans=1)
    cfg = TrainConfig(data=DATA, model=ModelConfig(name='deit_micro_distilled_patch2_8'), aug=aug,
                      teacher=TeacherConfig(checkpoint=str(t_path)), distill=DistillConfig(type='hard'))
    s_path = _save(root / 'deit_lt' / 'last.safetensors', student, 'student', 'deit_micro_distilled_patch2_8',
                   counts, splits, {'in_chans': 1}, to_dict(cfg))
    vit = timm.create_model('deit_micro_patch2_8', num_classes=10, in_chans=1)
    vit_cfg = TrainConfig(data=DATA, model=ModelConfig(name='deit_micro_patch2_8'), aug=aug,
                          distill=DistillConfig(type='none'))
    v_path = _save(root / 'vit' / 'last.safetensors', vit, 'student', 'deit_micro_patch2_8', counts, splits,
                   {'in_chans': 1}, to_dict(vit_cfg))
    with torch.no_grad():
        vit.head.weight.div_(vit.head.weight.norm(dim=1, keepdim=True))
    r_path = _save(root / 'vit_rebalance' / 'tau_norm.safetensors', vit, 'rebalanced', 'deit_micro_patch2_8', counts,
                   splits, {'in_chans': 1}, to_dict(vit_cfg), rebalance={'method': 'tau_norm'})
    return {'teacher': t_path, 'deit_lt': s_path, 'vit': v_path, 'rebalanced': r_path, 'root': root}


def test_tool_writes_every_figure_and_the_numbers_behind_them(checkpoints, tmp_path, capsys):
    tool = _tool()
    main = lambda argv: run_tool(tool.main, argv)   # noqa: E731  (the tool's error handling)
    out = tmp_path / 'analysis'
    code = main(['--checkpoint', str(checkpoints['root'] / 'deit_lt'), '--compare', str(checkpoints['vit']),
                 str(checkpoints['rebalanced']), str(checkpoints['teacher']), 'num_images=150',   # an override here
                 '--labels', 'DeiT-LT,ViT,ViT+tau,teacher', '--out', str(out), 'wandb.mode=disabled', 'progress=false',
                 'batch_size=128'])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / 'analysis.json').read_text())
    for name in FIGURES:
        path = out / f'{name}.png'
        assert report['figures'][name] == str(path)
        assert path.stat().st_size > 1000
        with Image.open(path) as im:
            assert min(im.size) > 100
    assert report['probe'] == {'num_images': 150, 'seed': 0, 'indices_are_whole_split': False}
    res = report['results']
    assert 'skipped' in res['teacher']['attention'] and res['teacher']['rank']['kind'] == 'stages'
    att = res['DeiT-LT']['attention']
    assert np.asarray(att['distance']).shape == (4, 3) and att['num_images'] == 150
    assert 0 < min(min(b) for b in att['distance']) and max(max(b) for b in att['distance']) <= att['max_distance']
    assert list(res['DeiT-LT']['rank']['tokens']) == ['cls', 'dist'] and list(res['ViT']['rank']['tokens']) == ['cls']
    assert set(res['DeiT-LT']['geometry']) == {'cls', 'dist'} and set(res['teacher']['geometry']) == {'cnn'}
    assert res['ViT+tau']['geometry']['cls']['norms'] == pytest.approx([1.0] * 10)
    assert res['teacher']['calibration']['logits']['ece'] is not None and res['teacher']['info']['logit_scale'] == 30

    # expertise numbers against an independent evaluation of the same models on the same 400 test images
    split = create_datasets(DATA)['test']
    x = (torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255 - MEAN[0]) / STD[0]
    y = torch.from_numpy(split.targets)
    student, _ = create_model_from_checkpoint(checkpoints['deit_lt'])
    teacher, _ = load_teacher(checkpoints['teacher'], num_classes=10, in_chans=1)
    with torch.no_grad():
        z_cls, z_dist = model_outputs(student, x)
        t_pred = teacher(x).argmax(1)
    exp = res['DeiT-LT']['expertise']
    assert exp['accuracy']['cls']['top1'] == pytest.approx(100 * (z_cls.argmax(1) == y).double().mean().item())
    assert exp['accuracy']['teacher']['top1'] == pytest.approx(100 * (t_pred == y).double().mean().item())
    tail = torch.isin(y, torch.tensor([7, 8, 9]))
    same = (z_dist.argmax(1) == t_pred).double()
    assert exp['agreement']['dist_teacher']['tail'] == pytest.approx(100 * same[tail].mean().item())
    assert exp['agreement']['cls_dist']['overall'] == pytest.approx(
        100 * (z_cls.argmax(1) == z_dist.argmax(1)).double().mean().item())
    assert res['DeiT-LT']['info']['teacher']['used'] and res['DeiT-LT']['info']['teacher']['sam'] is True
    assert not res['ViT']['info']['teacher']['used']
    printed = capsys.readouterr().out
    assert 'DeiT-LT: cls' in printed and 'analysis.json' in printed


def test_tool_user_errors_are_one_line(checkpoints, tmp_path, capsys):
    tool = _tool()
    main = lambda argv: run_tool(tool.main, argv)   # noqa: E731  (the tool's error handling)
    five = timm.create_model('deit_micro_patch2_8', num_classes=5, in_chans=1)
    wrong = save_model_file(tmp_path / 'five.safetensors', five.state_dict(), {'kind': 'student',
                            'arch': 'deit_micro_patch2_8', 'num_classes': 5, 'model_kwargs': {'in_chans': 1}})
    for args, needle in (
            (['--checkpoint', str(checkpoints['vit']), '--compare', str(wrong), '--out', str(tmp_path / 'o'),
              'wandb.mode=disabled'], 'predicts 5 classes but the data (digits_lt) have 10'),
            (['--checkpoint', str(tmp_path / 'missing')], 'checkpoint not found'),
            (['--checkpoint', str(tmp_path)], 'without last.safetensors'),
            (['--checkpoint', str(checkpoints['vit']), '--analyses', 'atention'], "unknown analysis 'atention'"),
            (['--checkpoint', str(checkpoints['vit']), 'rank_rtol=2'], 'rank_rtol=2.0 is out of range'),
            (['--checkpoint', str(checkpoints['vit']), 'num_imgs=3'], "unknown config key 'num_imgs'"),
            (['--checkpoint', str(checkpoints['vit']), '--compare', str(checkpoints['teacher']), '--labels', 'a'],
             '1 labels for 2 checkpoints'),
            (['--checkpoint', str(checkpoints['deit_lt']), '--teacher', str(tmp_path / 'nope.safetensors'),
              '--out', str(tmp_path / 'o'), 'wandb.mode=disabled', 'progress=false'], 'teacher checkpoint not found')):
        code = main(args)
        err = capsys.readouterr().err.strip()
        assert code != 0 and err.startswith('error: ') and needle in err and 'Traceback' not in err, (args, err)
        assert len(err.splitlines()) == 1


def test_analyses_subset_and_whole_split(checkpoints, tmp_path):
    cfg = load_analysis_config([str(checkpoints['vit'])], ['wandb.mode=disabled', 'progress=false'],
                               analyses=['attention', 'geometry'], output_dir=str(tmp_path / 'a'))
    assert cfg.data.name == 'digits_lt' and cfg.aug.eval_crop_pct == 1.0   # the checkpoint's own data settings
    report = run_analysis(cfg)
    assert report['probe']['indices_are_whole_split'] and set(report['figures']) == {'attention_distance',
                                                                                      'classifier_norms'}
    assert set(report['results']['vit/last']) == {'info', 'attention', 'geometry'}
    with pytest.raises(CheckpointError, match='no deit-lt metadata'):
        plain = tmp_path / 'plain.safetensors'
        from safetensors.torch import save_file
        save_file({'w': torch.zeros(1)}, str(plain))
        load_analysis_config([str(plain)])
