"""Configs: YAML with bases, dotted overrides, type coercion, unknown keys, saving; every shipped config loads."""
from __future__ import annotations


import pytest
import yaml

from conftest import REPO
from deit_lt.config import ConfigError, TrainConfig, load_config, save_config, to_dict


def test_bases_and_overrides(tmp_path):
    (tmp_path / 'base.yaml').write_text('data: {name: digits_lt, imb_factor: 10}\noptim: {lr: 1.0e-3, epochs: 7}\n')
    (tmp_path / 'child.yaml').write_text('base: base.yaml\noptim: {epochs: 9}\naug: {scale: [0.2, 1.0]}\n')
    cfg = load_config(TrainConfig, tmp_path / 'child.yaml',
                      ['optim.lr=2e-4', 'model.kwargs.depth=2', 'aug.rand_augment=null', 'runtime.resume=auto',
                       'distill.drw_epoch=5', 'aug.mean=[0.5,0.5,0.5]', 'wandb.tags=[a,b]'])
    assert cfg.data.name == 'digits_lt' and cfg.data.imb_factor == 10.0
    assert cfg.optim.epochs == 9 and cfg.optim.lr == pytest.approx(2e-4)   # '2e-4' is a string to PyYAML
    assert cfg.aug.scale == (0.2, 1.0) and cfg.aug.rand_augment is None
    assert cfg.model.kwargs == {'depth': 2} and cfg.runtime.resume == 'auto' and cfg.distill.drw_epoch == 5
    assert cfg.aug.mean == (0.5, 0.5, 0.5) and cfg.wandb.tags == ['a', 'b']
    assert cfg.optim.accum_steps == TrainConfig().optim.accum_steps   # untouched defaults stay


def test_unknown_keys_are_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'\. Did you mean 'lr'\?"):
        load_config(TrainConfig, None, ['optim.lrr=1'])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'"):
        load_config(TrainConfig, None, ['optimizer.lr=1'])
    (tmp_path / 'c.yaml').write_text('data:\n  imbalance: 100\n')
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.imbalance'"):
        load_config(TrainConfig, tmp_path / 'c.yaml')


def test_type_errors_and_choices():
    with pytest.raises(ConfigError, match='optim.epochs: expected an integer'):
        load_config(TrainConfig, None, ['optim.epochs=ten'])
    with pytest.raises(ConfigError, match='optim.epochs: expected an integer'):
        load_config(TrainConfig, None, ['optim.epochs=1.5'])
    with pytest.raises(ConfigError, match="distill.type: 'hardd' is not one of"):
        load_config(TrainConfig, None, ['distill.type=hardd'])
    with pytest.raises(ConfigError, match='aug.scale: expected 2 values'):
        load_config(TrainConfig, None, ['aug.scale=[0.1,0.2,0.3]'])
    with pytest.raises(ConfigError, match='not of the form'):
        load_config(TrainConfig, None, ['optim.lr'])
    with pytest.raises(ConfigError, match='config file not found'):
        load_config(TrainConfig, '/nonexistent.yaml')
    assert load_config(TrainConfig, None, ['runtime.cpu=yes']).runtime.cpu is True


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / 'a.yaml').write_text('base: b.yaml\n')
    (tmp_path / 'b.yaml').write_text('base: a.yaml\n')
    with pytest.raises(ConfigError, match='cycle'):
        load_config(TrainConfig, tmp_path / 'a.yaml')


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(TrainConfig, None, ['optim.lr=3e-4', 'aug.scale=[0.3,1]', 'model.kwargs.depth=3'])
    save_config(cfg, tmp_path / 'out' / 'config.yaml')
    again = load_config(TrainConfig, tmp_path / 'out' / 'config.yaml')
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / 'out' / 'config.yaml').read_text())['optim']['lr'] == 3e-4


def _shipped_configs():
    return sorted(p for p in (REPO / 'configs').rglob('*.yaml'))


def test_every_shipped_student_config_loads():
    found = 0
    for path in _shipped_configs():
        rel = path.relative_to(REPO / 'configs')
        if rel.parts[0] in ('teachers', 'rebalance', 'cluster') or path.name.startswith('_'):
            continue  # other tools' schemas are checked in their own tests; _*.yaml are bases
        cfg = load_config(TrainConfig, path)
        assert cfg.optim.epochs >= 1, path
        found += 1
    assert found >= 1 or not (REPO / 'configs').exists()


def test_epochs_scale_shrinks_every_schedule_setting():
    from deit_lt.config import TrainConfig, load_config
    from teachers.config import TeacherTrainConfig, validate_config
    c = load_config(TrainConfig, REPO / 'configs' / 'cifar10_lt' / 'deit_lt_ldam_if100.yaml',
                    ['optim.epochs_scale=0.01'])
    assert (c.optim.epochs, c.distill.drw_epoch, c.optim.warmup_epochs, c.optim.epochs_scale) == (12, 11, 0.05, 1.0)
    t = load_config(TeacherTrainConfig, REPO / 'configs' / 'teachers' / 'imagenet_lt_ldam_drw_sam.yaml',
                    ['optim.epochs_scale=0.1'])
    assert (t.optim.epochs, t.loss.drw_epoch, t.sam.step_epochs) == (9, 6, [1, 6, 8])
    validate_config(t)
    d = load_config(TeacherTrainConfig, REPO / 'configs' / 'teachers' / 'cifar10_lt_if100_ldam_drw_sam.yaml',
                    ['optim.epochs_scale=0.02'])
    assert (d.optim.epochs, d.optim.milestones, d.optim.warmup_epochs, d.loss.drw_epoch) == (4, [3], 0.0, 3)
    validate_config(d)
