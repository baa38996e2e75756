"""Metrics checked against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from deit_lt.metrics import (classification_report, confusion_matrix, expected_calibration_error,
                             per_class_accuracy, split_accuracy, topk_accuracy)

# 6 samples, 3 classes
LOGITS = torch.tensor([
    [3.0, 2.0, 1.0],   # y=0, pred 0
    [1.0, 3.0, 2.0],   # y=0, pred 1 (0 is 3rd)
    [1.0, 2.0, 3.0],   # y=1, pred 2 (1 is 2nd)
    [0.0, 5.0, 1.0],   # y=1, pred 1
    [2.0, 1.0, 3.0],   # y=2, pred 2
    [3.0, 1.0, 2.0],   # y=2, pred 0 (2 is 2nd)
])
TARGETS = torch.tensor([0, 0, 1, 1, 2, 2])


def test_topk_by_hand():
    acc = topk_accuracy(LOGITS, TARGETS, ks=(1, 2, 5))
    assert acc[1] == pytest.approx(100 * 3 / 6)
    assert acc[2] == pytest.approx(100 * 5 / 6)     # only sample 1 misses top-2
    assert acc[5] == pytest.approx(100.0)           # k clipped to the 3 classes


def test_confusion_and_per_class_by_hand():
    preds = LOGITS.argmax(1)
    cm = confusion_matrix(preds, TARGETS, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    pc = per_class_accuracy(preds, TARGETS, 4)     # class 3 has no samples -> NaN
    assert pc[:3].tolist() == [50.0, 50.0, 50.0] and math.isnan(pc[3].item())


def test_split_accuracy_is_unweighted_class_mean():
    class_acc = torch.tensor([100.0, 50.0, 0.0, float('nan')])
    s = split_accuracy(class_acc, {'head': [0, 1], 'mid': [2, 3], 'tail': []})
    assert s['head'] == 75.0 and s['mid'] == 0.0 and math.isnan(s['tail'])


def test_ece_by_hand():
    # confidences 0.9 (correct), 0.9 (wrong), 0.65 (correct), 0.55 (wrong)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.35, 0.65], [0.55, 0.45]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 1])
    # 2 bins: all in (0.5, 1]: accuracy 2/4, mean confidence 0.75 -> 0.25
    assert expected_calibration_error(probs, y, n_bins=2) == pytest.approx(25.0)
    # 10 bins: (0.8,0.9] weight .5 |.5-.9| = .2; (0.6,0.7] weight .25 |1-.65| = .0875; (0.5,0.6] .25 |0-.55| = .1375
    assert expected_calibration_error(probs, y, n_bins=10) == pytest.approx(42.5)


def test_classification_report_consistent():
    r = classification_report(LOGITS, TARGETS, {'head': [0], 'mid': [1], 'tail': [2]}, ks=(1, 2))
    assert r['top1'] == pytest.approx(50.0) and r['top2'] == pytest.approx(500 / 6)
    assert r['head'] == r['mid'] == r['tail'] == 50.0
    assert r['per_class'] == [50.0, 50.0, 50.0] and r['confusion'][0] == [1, 1, 0]
    assert 0 <= r['ece'] <= 100
