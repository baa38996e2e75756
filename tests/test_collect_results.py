"""tools/collect_results.py: records of finished and unfinished runs, name clashes, re-balancing folders, the tracked
results/ folder and the table beside the published numbers.

Reports are written here by hand in the schema the tools write (deit_lt/engine.py `_finish`, report_version 2;
deit_lt/rebalance/runner.py), with made-up accuracies; one real digits_lt teacher run stopped after 3 updates checks
the real unfinished report end to end.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO
from deit_lt.cli import run_tool

_spec = importlib.util.spec_from_file_location('collect_results', REPO / 'tools' / 'collect_results.py')
cr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cr)


def _metrics(top1, head=50.0, mid=40.0, tail=30.0):
    return {'top1': top1, 'top5': 90.0, 'head': head, 'mid': mid, 'tail': tail, 'ece': 5.0, 'per_class': [top1] * 10}


def write_run(folder, name, *, kind='student', dataset='cifar10_lt', imb=100.0, finished=True, updates_done=150,
              top1=60.0, mid=40.0, best=True):
    """A training run folder as tools/train.py / train_teacher.py leave it (report.json, config.yaml)."""
    preds = ['cls', 'dist', 'avg'] if kind == 'student' else ['logits']
    test = {p: _metrics(top1 + i, mid=mid) for i, p in enumerate(preds)} | {'num_samples': 10000}
    report = {
        'report_version': 2, 'name': name, 'kind': kind, 'arch': 'resnet32' if kind == 'teacher' else 'deit',
        'finished': finished,
        'progress': {'epochs_done': 10 if finished else 0, 'epochs': 10, 'updates_done': updates_done,
                     'updates': 150, 'fraction': round(updates_done / 150, 4)},
        'stopped_by': None if finished else 'max_steps', 'predictors': preds,
        'headline': 'avg' if kind == 'student' else 'logits', 'select_on': 'test',
        'last': {'test': test}, 'history': [], 'wall_time_s': 120.0, 'world_size': 1, 'device': 'cpu',
        'mixed_precision': 'no', 'dataset': {'name': dataset, 'imb_factor': imb}, 'splits': {},
        'git_commit': 'abc', 'git_dirty': False, 'machine': {'hostname': 'h'}, 'versions': {'torch': 'x'},
    }
    if best:
        report['best'] = {'epoch': 7, 'split': 'test', 'predictor': report['headline'], 'top1': top1 + 1,
                          'score': top1 + 1, 'metrics': {'test': {p: _metrics(top1 + 1) for p in preds}}}
    folder.mkdir(parents=True)
    (folder / 'report.json').write_text(json.dumps(report))
    (folder / 'config.yaml').write_text(f'name: {name}\ndata: {{name: {dataset}, imb_factor: {imb}}}\n')
    return folder


def write_rebalance(folder, source_dir, *, methods=('crt', 'tau_norm'), with_source=True):
    """A tools/rebalance.py folder re-balancing `source_dir`/last.safetensors."""
    report = {
        'checkpoint': str(source_dir / 'last.safetensors'), 'arch': 'deit', 'kind': 'student',
        'dataset': {'name': 'cifar10_lt', 'imb_factor': 100.0, 'sizes': {'train': 12406, 'test': 10000}},
        'joint': {'test': {'logits': _metrics(60.0)}},
        'methods': {m: {'test': {'logits': _metrics(65.0 + i)}, 'info': {}} for i, m in enumerate(methods)},
        'selection_metric': 'val mean per-class accuracy', 'wall_time_s': 30.0,
    }
    if with_source:
        run = json.loads((source_dir / 'report.json').read_text())
        report['source'] = {'name': run['name'], 'file': 'last', 'epoch': 9, 'finished': run['finished'],
                            'progress': run['progress'], 'stopped_by': run['stopped_by'],
                            'report': str(source_dir / 'report.json')}
    folder.mkdir(parents=True)
    (folder / 'report.json').write_text(json.dumps(report))
    return folder


def collect(*argv):
    return run_tool(cr.main, [str(a) for a in argv])


def test_finished_run_record(tmp_path, capsys):
    run = write_run(tmp_path / 'runs' / 'x', 'cifar10_lt_if100_deit_lt_ldam')
    out = tmp_path / 'res'
    assert collect(run, '--out', out) == 0
    r = json.loads((out / 'cifar10_lt_if100_deit_lt_ldam.json').read_text())
    assert r['finished'] is True and r['row'] == 'deit_lt_ldam' and r['kind'] == 'student'
    assert r['dataset'] == 'cifar10_lt' and r['imb_factor'] == 100 and r['config']['name'] == r['name']
    assert r['last']['avg'] == {'top1': 62.0, 'top5': 90.0, 'head': 50.0, 'mid': 40.0, 'tail': 30.0}
    assert r['best']['epoch'] == 7 and r['best']['selected_on'] == 'test' and r['best']['test']['avg']['top1'] == 61.0
    assert r['git_commit'] == 'abc' and r['wall_time_s'] == 120.0
    assert 'cifar10_lt_if100_deit_lt_ldam ->' in capsys.readouterr().out


def test_unfinished_run_is_refused_unless_allowed_and_then_marked(tmp_path, capsys):
    run = write_run(tmp_path / 'runs' / 'x', 'cifar10_lt_if100_deit_lt_ldam', finished=False, updates_done=3,
                    best=False)
    out = tmp_path / 'res'
    assert collect(run, '--out', out) == 2
    err = capsys.readouterr().err
    assert 'UNFINISHED: 3/150 updates (2.0%), stopped by max_steps' in err and '--allow-unfinished' in err
    assert not out.exists()
    assert collect(run, '--out', out, '--allow-unfinished') == 0
    assert 'UNFINISHED' in capsys.readouterr().out
    r = json.loads((out / 'cifar10_lt_if100_deit_lt_ldam.json').read_text())
    assert r['finished'] is False and r['progress']['updates_done'] == 3 and r['stopped_by'] == 'max_steps'
    assert 'best' not in r


def test_name_clash_is_an_error_unless_forced(tmp_path, capsys):
    a = write_run(tmp_path / 'a', 'digits_lt_vit', dataset='digits_lt', imb=10.0, top1=30.0)
    b = write_run(tmp_path / 'b', 'digits_lt_vit', dataset='digits_lt', imb=10.0, top1=40.0)
    out = tmp_path / 'res'
    assert collect(a, b, '--out', out) == 2                       # two runs, one name, in one call
    assert 'would both be filed as' in capsys.readouterr().err and not out.exists()
    assert collect(a, '--out', out) == 0
    assert collect(b, '--out', out) == 2                          # a second run of the same name
    assert 'exists' in capsys.readouterr().err
    assert json.loads((out / 'digits_lt_vit.json').read_text())['last']['cls']['top1'] == 30.0
    assert collect(b, '--out', out, '--name', 'digits_lt_vit_seed1') == 0
    assert collect(b, '--out', out, '--force') == 0
    assert json.loads((out / 'digits_lt_vit.json').read_text())['last']['cls']['top1'] == 40.0
    assert sorted(p.name for p in out.iterdir()) == ['digits_lt_vit.json', 'digits_lt_vit_seed1.json']


def test_output_folder_is_required_and_tracked_results_need_a_flag(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / 'run', 'digits_lt_vit', dataset='digits_lt', imb=10.0)
    assert collect(run) == 2 and '--out is required' in capsys.readouterr().err
    assert collect(run, '--out', REPO / 'results') == 2
    assert '--tracked-results' in capsys.readouterr().err
    assert not (REPO / 'results' / 'digits_lt_vit.json').exists()
    tracked = tmp_path / 'repo_results'                           # stands in for the repository's results/
    monkeypatch.setattr(cr, 'TRACKED', tracked)
    assert collect(run, '--out', tracked / 'sub') == 2
    assert collect(run, '--out', tracked, '--tracked-results') == 0 and (tracked / 'digits_lt_vit.json').is_file()
    capsys.readouterr()
    assert collect('--table') == 0 and 'digits_lt_vit' in capsys.readouterr().out   # --table alone reads it


def test_rebalance_records_are_named_after_the_source_run(tmp_path, capsys):
    vit = write_run(tmp_path / 'runs' / 'vit', 'cifar10_lt_if100_vit')
    reb = write_rebalance(tmp_path / 'runs' / 'rebalance' / 'vit_last', vit)
    out = tmp_path / 'res'
    assert collect('--rebalance', reb, '--out', out) == 0
    assert sorted(p.name for p in out.iterdir()) == ['cifar10_lt_if100_vit_crt.json',
                                                      'cifar10_lt_if100_vit_tau_norm.json']
    r = json.loads((out / 'cifar10_lt_if100_vit_crt.json').read_text())
    assert r['row'] == 'vit_crt' and r['kind'] == 'rebalance' and r['method'] == 'crt' and r['finished'] is True
    assert r['last']['logits']['top1'] == 65.0 and r['joint']['logits']['top1'] == 60.0
    # a folder is recognised without --rebalance; --method picks one, --name then renames it
    out2 = tmp_path / 'res2'
    assert collect(reb, '--method', 'tau_norm', '--name', 'my_tau', '--out', out2) == 0
    assert [p.name for p in out2.iterdir()] == ['my_tau.json']
    assert collect(reb, '--method', 'lws', '--out', out2) == 2 and "no 'lws' results" in capsys.readouterr().err
    assert collect(reb, '--name', 'x', '--out', out2) == 2        # --name with two methods: which one?
    # an older report without `source`: the checkpoint's run report beside it
    old = write_rebalance(tmp_path / 'old', vit, methods=('crt',), with_source=False)
    assert collect(old, '--out', tmp_path / 'res3') == 0
    assert (tmp_path / 'res3' / 'cifar10_lt_if100_vit_crt.json').is_file()


def test_rebalance_of_an_unfinished_or_unknown_run(tmp_path, capsys):
    vit = write_run(tmp_path / 'vit', 'cifar10_lt_if100_vit', finished=False, updates_done=30)
    reb = write_rebalance(tmp_path / 'reb', vit, methods=('crt',))
    assert collect(reb, '--out', tmp_path / 'o') == 2
    assert 'UNFINISHED: source run 30/150 updates (20.0%)' in capsys.readouterr().err
    stray = tmp_path / 'copied'                                   # a model file without its run's report
    stray.mkdir()
    unknown = write_rebalance(tmp_path / 'reb2', stray, methods=('crt',), with_source=False)
    assert collect(unknown, '--out', tmp_path / 'o') == 2 and 'unknown' in capsys.readouterr().err
    assert collect(unknown, '--out', tmp_path / 'o', '--allow-unfinished') == 0
    assert json.loads((tmp_path / 'o' / 'copied_crt.json').read_text())['finished'] is None


def test_table_sets_ours_beside_the_paper_and_marks_unfinished_runs(tmp_path, capsys):
    out = tmp_path / 'res'
    teacher = write_run(tmp_path / 't', 'cifar10_lt_if100_ldam_drw_sam', kind='teacher', top1=80.0)
    deit = write_run(tmp_path / 'd', 'cifar10_lt_if100_deit_lt_ldam', finished=False, updates_done=3,
                     mid=float('nan'))
    digits = write_run(tmp_path / 'g', 'digits_lt_deit_lt', dataset='digits_lt', imb=10.0)
    assert collect(teacher, deit, digits, '--out', out, '--allow-unfinished', '--table') == 0
    lines = {line.split(' | ')[2]: line for line in capsys.readouterr().out.splitlines() if line.startswith('| ')}
    t = lines['Teacher ResNet-32/50, LDAM+DRW+SAM (cifar10_lt_if100_ldam_drw_sam)']
    assert '| LOGITS | 80.0 / 50.0 / 40.0 / 30.0 | 81.9 | finished | 2.0 min |' in t
    d = lines['DeiT-LT, LDAM+DRW+SAM teacher (cifar10_lt_if100_deit_lt_ldam)']
    # the unfinished run next to the paper's 84.8 says so twice; its empty mid group prints as '-'
    assert '| AVG | 62.0 / 50.0 / - / 30.0 (unfinished) | 84.8 | UNFINISHED: 3/150 updates (2.0%)' in d
    assert '| 10 | deit_lt (digits_lt_deit_lt) | AVG |' in lines['deit_lt (digits_lt_deit_lt)'] and \
        '| - | finished |' in lines['deit_lt (digits_lt_deit_lt)']
    # records of another schema are skipped with a note, not misread
    (out / 'old.json').write_text(json.dumps({'name': 'old', 'last': {}}))
    assert collect('--table', '--out', out) == 0
    captured = capsys.readouterr()
    assert 'skipping' in captured.err and '(old)' not in captured.out


def test_published_numbers_stand_alone():
    """The paper's numbers live in the tool itself, keyed by rows the inferred names reach."""
    assert cr.PUBLISHED[('cifar10_lt', 100, 'deit_lt_paco')] == (87.5, 94.5, 84.1, 85.0)
    assert cr.infer_row('cifar100_lt_if50_ce_drw_sam', 'teacher') == 'teacher_ce_drw_sam'
    assert cr.infer_row('imagenet_lt_vit_crt', 'rebalance') == 'vit_crt'
    source = (REPO / 'tools' / 'collect_results.py').read_text()
    assert '../shared' not in source and '/shared/' not in source


def test_real_unfinished_teacher_run(tmp_path, capsys):
    """A real digits_lt teacher (2 epochs of 15 updates) stopped by runtime.max_steps after 3 updates."""
    run = tmp_path / 'teacher'
    r = subprocess.run([sys.executable, str(REPO / 'tools' / 'train_teacher.py'), '--config',
                        str(REPO / 'configs' / 'teachers' / 'digits_lt.yaml'), f'runtime.output_dir={run}',
                        'optim.epochs_scale=0.05', 'runtime.max_steps=3', 'wandb.mode=disabled',
                        'runtime.progress=false'], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = tmp_path / 'res'
    assert collect(run, '--out', out) == 2
    assert 'UNFINISHED: 3/30 updates (10.0%), stopped by max_steps' in capsys.readouterr().err
    assert collect(run, '--out', out, '--allow-unfinished', '--table') == 0
    rec = json.loads((out / 'digits_lt_ldam_drw_sam.json').read_text())
    assert rec['finished'] is False and rec['progress']['updates_done'] == 3 and rec['kind'] == 'teacher'
    assert set(rec['last']) == {'logits'} and rec['dataset'] == 'digits_lt' and rec['imb_factor'] == 10
    assert 'best' not in rec
    assert '(unfinished)' in capsys.readouterr().out


@pytest.mark.parametrize('name', ['../evil', 'a b'])
def test_unusable_names_are_refused(tmp_path, name, capsys):
    run = write_run(tmp_path / 'r', 'digits_lt_vit', dataset='digits_lt', imb=10.0)
    assert collect(run, '--out', tmp_path / 'o', '--name', name) == 2
    assert 'not usable as a file name' in capsys.readouterr().err
