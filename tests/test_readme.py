"""README.md's commands, run as documented at tiny scale, and every tool's `--help`: a documented command that breaks
fails here.

How README.md is read (the contract with its authors):
- Every fenced block tagged ```bash holds commands, run in README order (blocks top to bottom, lines top to bottom)
  as a new user would run them, all in one scratch folder that stands in for a fresh clone: the repository's files
  linked in, no runs/. A line ending in `\\` continues on the next; blank lines and `#` comment lines are skipped;
  a trailing `# ...` comment is dropped. Other blocks, and commands inside tables, are not run (their config paths
  are still checked: `test_readme_config_paths_exist`).
- MARKER: a command whose trailing comment contains `(not run in tests: <reason>)`, e.g.
      accelerate launch --multi_gpu --num_processes 4 tools/train.py --config ...   # (not run in tests: GPU)
  is listed but not run; the marker alone on a comment line before a block's first command covers the whole
  block. Reasons in use: GPU, installs, downloads. Some commands are never run whatever the README says
  (NOT_RUN below: the test suite itself, installs, writes into the repository, full-size training on a CPU).
- SUBSTITUTIONS, applied to each command before it runs (see `substitute`):
    data       `/data/...` and `../shared/data/...` -> the test data folder (tests/conftest.py DATA_DIR,
               $DEIT_LT_DATA); a command whose data file is not there is skipped with that reason.
    schedules  tools/train.py, train_teacher.py and cluster.py get `optim.epochs_scale=0.05` (digits_lt: 2 teacher and
               3 student epochs), tools/quickstart.py `--scale 0.05`, unless the command sets its own
               (optim.epochs_scale, optim.epochs, runtime.max_steps; --scale).
    W&B        train / train_teacher / rebalance / analyze / cluster get `wandb.mode=disabled`, quickstart
               `--wandb disabled`, unless the command sets a mode.
    accelerate `accelerate launch` keeps its form but gets the values it would otherwise default and warn about
               (--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no) where not given.
    outputs    relative output paths (runs/..., my_results/) land in the scratch folder under tmp_path;
               tools/quickstart.py gets `--output-dir runs/quickstart` (its default is inside the repository).
    python     `python`, `accelerate` and the other console scripts are those of the test's interpreter (its bin
               folder first on PATH); `.venv/bin/python` is left as written (it exists in a checkout that ran
               quickstart.sh).
Runtime: about a minute on 2 CPU cores for a README whose runnable commands are a few digits_lt runs.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import itertools
import os
import re
import runpy
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from conftest import DATA_DIR, REPO

README = REPO / 'README.md'
TOOLS = sorted((REPO / 'tools').glob('*.py'))
MARKER = re.compile(r'\(not run in tests(?::\s*([^)]*))?\)')
# digits_lt's 40 / 60 epochs -> 2 / 3 (a 1-epoch teacher schedule puts its lr steps at epoch 0, which the teacher
# recipe refuses); full-size datasets are not run on a CPU (NOT_RUN)
EPOCHS_SCALE = '0.05'
QUICKSTART_SCALE = '0.05'
TIMEOUT_S = 300             # per command; generous for a loaded CI machine
# Commands never run here, whatever README.md says: (pattern, reason).
NOT_RUN = [
    (r'\bpytest\b', 'the test suite itself'),
    (r'\bquickstart\.sh\b|\bpip3? install\b|\buv pip install\b', 'installs'),
    (r'--tracked-results', "writes into the repository's results/"),
    (r'^(?!.*ACCELERATE_USE_CPU=1).*--multi_gpu', 'GPU (several processes on GPUs)'),
    (r'tools/benchmark\.py(?!.*--cpu)', 'GPU (benchmark sizes)'),
    (r'tools/(train|train_teacher|rebalance|analyze)\.py.*(configs/(cifar10_lt|cifar100_lt|imagenet_lt|inat2018)/|'
     r'configs/teachers/(cifar|imagenet|inat)|cifar10_lt_if|runs/(cifar|imagenet|inat))',
     'GPU (a full-size dataset: one epoch takes minutes on a CPU)'),
]
# `accelerate launch` values given explicitly where a command leaves them out: (how a command may give it, value)
ACCELERATE_DEFAULTS = [('--num[_-]processes', '--num_processes 1'), ('--num[_-]machines', '--num_machines 1'),
                       ('--mixed[_-]precision', '--mixed_precision no'), ('--dynamo[_-]backend', '--dynamo_backend no')]
_TOOL = re.compile(r'tools/(\w+)\.py')
_SEGMENT = re.compile(r'(\s(?:&&|\|\||;|\|)\s)')


@dataclasses.dataclass
class Command:
    text: str                   # as written (continuations joined, comment dropped)
    line: int                   # README line of its first physical line
    skip: str | None = None     # why it is not run


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: the first `#` outside quotes at the start or after whitespace."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in '\'"':
            quote = ch
        elif ch == '#' and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ''


def parse_bash_blocks(text: str) -> list[list[Command]]:
    """The commands of every ```bash block, markers applied."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if re.fullmatch(r'\s*```bash\s*', lines[i]):
            j = i + 1
            while j < len(lines) and not re.fullmatch(r'\s*```\s*', lines[j]):
                j += 1
            blocks.append(_commands(lines[i + 1:j], first_line=i + 2))
            i = j
        i += 1
    return blocks


def _commands(lines: list[str], first_line: int) -> list[Command]:
    cmds: list[Command] = []
    block_skip = None
    pending, start, comment = '', 0, ''
    for n, raw in enumerate(lines, first_line):
        code, note = _split_comment(raw)
        if not pending and not code.strip():
            m = MARKER.search(note)
            if m and not cmds:
                block_skip = (m.group(1) or 'marked').strip()
            continue
        if not pending:
            start = n
        comment += note
        if code.endswith('\\'):
            pending += code[:-1].strip() + ' '
            continue
        m = MARKER.search(comment)
        cmds.append(Command((pending + code.strip()).strip(), start,
                            (m.group(1) or 'marked').strip() if m else block_skip))
        pending, comment = '', ''
    if pending:
        cmds.append(Command(pending.strip(), start, block_skip))
    return cmds


def _not_run(cmd: str) -> str | None:
    for pattern, reason in NOT_RUN:
        if re.search(pattern, cmd):
            return reason
    return None


def substitute(cmd: str) -> tuple[str, str | None]:
    """The command as the test runs it (SUBSTITUTIONS in the module docstring), and a reason to skip it, if any."""
    data = str(DATA_DIR)
    cmd = re.sub(r'(?<=[\s=])(?:\.\./shared/data|/data)(?=/|\s|$)', lambda m: data, cmd)
    for token in re.findall(r'(?:^|[\s=])(' + re.escape(data) + r'[^\s]*)', cmd):
        if not Path(token).exists():
            return cmd, f'needs data: {token} (set DEIT_LT_DATA)'
    parts = _SEGMENT.split(cmd)
    for k in range(0, len(parts), 2):
        seg = parts[k]
        tool = (_TOOL.search(seg) or [None, None])[1]
        if re.search(r'\baccelerate launch\b', seg):
            missing = ' '.join(flag for pattern, flag in ACCELERATE_DEFAULTS if not re.search(pattern, seg))
            if missing:
                seg = re.sub(r'\baccelerate launch\b', f'accelerate launch {missing}', seg, count=1)
        extra = []
        scheduled = re.search(r'optim\.epochs(_scale)?=|runtime\.max_steps=', seg)
        if tool in ('train', 'train_teacher', 'cluster') and not scheduled:
            extra.append(f'optim.epochs_scale={EPOCHS_SCALE}')
        if tool in ('train', 'train_teacher', 'rebalance', 'analyze', 'cluster') and 'wandb.mode=' not in seg:
            extra.append('wandb.mode=disabled')
        if tool == 'quickstart':
            extra += [] if '--scale' in seg else ['--scale', QUICKSTART_SCALE]
            extra += [] if '--wandb' in seg else ['--wandb', 'disabled']
            extra += [] if '--output-dir' in seg else ['--output-dir', 'runs/quickstart']
        parts[k] = seg.rstrip() + ''.join(f' {e}' for e in extra) + (' ' if seg != seg.rstrip() else '')
    return ''.join(parts), None


def _scratch_clone(root: Path) -> Path:
    """A folder that looks like a fresh clone: the repository's entries linked in, nothing the runs wrote."""
    root.mkdir(parents=True, exist_ok=True)
    for entry in REPO.iterdir():
        if entry.name in ('.git', 'runs', '.pytest_cache', '__pycache__', 'wandb') or entry.name.endswith('.egg-info'):
            continue
        (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return root


def run_commands(blocks: list[list[Command]], cwd: Path) -> tuple[list[str], list[str]]:
    """Run every command not skipped; returns (log lines, failures)."""
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get('PATH', ''),
               OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    log, failures = [], []
    for cmd in itertools.chain.from_iterable(blocks):
        skip = cmd.skip or _not_run(cmd.text)
        shown, data_skip = substitute(cmd.text)
        skip = skip or data_skip
        if skip:
            log.append(f'README:{cmd.line} not run ({skip}): {cmd.text}')
            continue
        try:
            r = subprocess.run(['bash', '-c', shown], cwd=cwd, env=env, capture_output=True, text=True,
                               timeout=TIMEOUT_S)
            rc, output = r.returncode, (r.stdout + r.stderr)
        except subprocess.TimeoutExpired as e:
            rc, output = 'timeout', f'{e.stdout or ""}{e.stderr or ""}'
        log.append(f'README:{cmd.line} exit {rc}: {shown}')
        if rc != 0:
            failures.append(f'README:{cmd.line}: `{cmd.text}`\n  ran as: {shown}\n  exit {rc}; last output:\n'
                            + '\n'.join('    ' + s for s in str(output).splitlines()[-25:]))
    return log, failures


def test_readme_commands(tmp_path):
    blocks = parse_bash_blocks(README.read_text())
    assert blocks, 'README.md has no ```bash block'
    log, failures = run_commands(blocks, _scratch_clone(tmp_path / 'clone'))
    print('\n'.join(log))
    assert not failures, '\n\n'.join(failures)


def _expand_braces(path: str) -> list[str]:
    m = re.search(r'\{([^{}]*)\}', path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(',') for p in _expand_braces(path[:m.start()] + alt + path[m.end():])]


def _missing_configs(text: str) -> list[str]:
    """configs/... paths (with {a,b} alternatives and * wildcards) in `text` that match no file or folder."""
    missing = []
    for ref in sorted(set(re.findall(r'configs/[\w./{},*-]*', text))):
        ref = ref.rstrip('.,')
        for path in _expand_braces(ref):
            if not glob.glob(str(REPO / path)):
                missing.append(path)
    return missing


def test_readme_config_paths_exist():
    """Every config path README.md names (tables and prose too, not only the commands run) exists."""
    assert not _missing_configs(README.read_text())


def _help(tool: Path, monkeypatch) -> str:
    """`python tools/X.py --help`, run in this process (one torch import for all tools); asserts exit 0."""
    monkeypatch.setattr(sys, 'argv', [str(tool), '--help'])
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(tool), run_name='__main__')
    text = buf.getvalue()
    assert exit_info.value.code in (0, None) and 'usage:' in text, text
    return text


@pytest.mark.parametrize('tool', TOOLS, ids=lambda p: p.stem)
def test_tool_help(tool, monkeypatch):
    """`python tools/X.py --help` exits 0 and its examples name only configs that exist."""
    assert not _missing_configs(_help(tool, monkeypatch))


@pytest.mark.parametrize('tool', TOOLS, ids=lambda p: p.stem)
def test_tool_help_examples_are_clean(tool, monkeypatch):
    """Help examples keep their line breaks (a `\\` at the end of a docstring line swallows the newline unless
    written `\\\\`) and name no path of this workspace (../shared) that a clone does not have."""
    text = _help(tool, monkeypatch)
    assert '../shared' not in text, 'help names a path of this workspace, not of a clone'
    joined = [line for line in text.splitlines()
              if re.match(r'\s*(python|accelerate|ACCELERATE_USE_CPU)', line) and re.search(r'\S {6,}[^\s#]', line)]
    assert not joined, f'example lines that lost their line break: {joined}'


SAMPLE = '''
Some prose with `accelerate launch tools/train.py --config configs/cifar10_lt/deit_lt_ldam_if100.yaml` (not run).

```bash
python tools/dataset_stats.py --dataset digits_lt \\
    --imb-factor 10 --json > stats.json        # a trailing comment
accelerate launch --cpu tools/train.py --config configs/digits_lt/vit.yaml
python tools/collect_results.py runs/digits_lt/vit --out my_results --table
accelerate launch tools/train.py --config configs/digits_lt/vit.yaml   # (not run in tests: GPU)
python tools/train.py --config configs/cifar10_lt/deit_lt_ldam_if100.yaml data.root=/data
```

```bash
# (not run in tests: installs)
bash quickstart.sh
```

```text
python tools/never_run.py
```
'''


def test_harness_reads_markers_and_substitutes():
    """The parser and the substitution table on a sample README (no command is run)."""
    (first, second) = parse_bash_blocks(SAMPLE)
    assert [c.text for c in first][0] == 'python tools/dataset_stats.py --dataset digits_lt --imb-factor 10 --json ' \
                                         '> stats.json'
    assert [c.skip for c in first] == [None, None, None, 'GPU', None] and first[0].line == 5
    assert [(c.text, c.skip) for c in second] == [('bash quickstart.sh', 'installs')]
    assert _not_run(first[4].text).startswith('GPU') and _not_run('.venv/bin/python -m pytest -q tests')
    cmd, skip = substitute(first[1].text)
    assert skip is None and cmd == ('accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no '
                                    '--dynamo_backend no --cpu tools/train.py --config configs/digits_lt/vit.yaml '
                                    f'optim.epochs_scale={EPOCHS_SCALE} wandb.mode=disabled')
    cmd, _ = substitute('python tools/train.py --config c.yaml runtime.max_steps=2 && python tools/quickstart.py')
    assert cmd == ('python tools/train.py --config c.yaml runtime.max_steps=2 wandb.mode=disabled && python '
                   f'tools/quickstart.py --scale {QUICKSTART_SCALE} --wandb disabled --output-dir runs/quickstart')
    cmd, _ = substitute('python tools/dataset_stats.py --root ../shared/data/x.npz data.root=/data')
    assert cmd == f'python tools/dataset_stats.py --root {DATA_DIR}/x.npz data.root={DATA_DIR}'
    assert substitute('python tools/dataset_stats.py --root /data/none.npz')[1].startswith('needs data')
    assert _missing_configs(SAMPLE) == [] and _missing_configs('configs/nope_{a,b}.yaml') == \
        ['configs/nope_a.yaml', 'configs/nope_b.yaml']


def test_harness_runs_a_sample_in_a_fresh_clone(tmp_path):
    """The sample's runnable commands succeed in a scratch clone (one digits_lt epoch through `accelerate launch`,
    its record collected), and a failing command is reported with its output."""
    blocks = parse_bash_blocks(SAMPLE)
    clone = _scratch_clone(tmp_path / 'clone')
    log, failures = run_commands(blocks, clone)
    assert not failures, '\n\n'.join(failures)
    assert sum(' exit 0: ' in line for line in log) == 3 and sum(' not run ' in line for line in log) == 3
    assert (clone / 'my_results' / 'digits_lt_vit.json').is_file() and not (REPO / 'my_results').exists()
    assert '"num_samples": 461' in (clone / 'stats.json').read_text()
    _, failures = run_commands(parse_bash_blocks('```bash\npython tools/collect_results.py runs/none --out r\n```'),
                               clone)
    assert len(failures) == 1 and 'has no report.json' in failures[0]
