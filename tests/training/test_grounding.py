"""Grounding losses (training/grounding.py): the mass hinge, the heatmap-peak hinge and the pointing hits they aim at."""

from __future__ import annotations

import torch

from slidechat.training.grounding import grounding_loss, peak_loss, pointing_hits

LESION = torch.tensor([0.0, 0.0, 1.0, 0.6, 0.2, 0.0])  # patches 2-3 mostly inside, 4 touching, 0/1/5 outside


def test_peak_loss_is_zero_only_when_the_peak_is_inside_by_the_margin():
    on_lesion = torch.tensor([0.1, 0.1, 0.5, 0.1, 0.1, 0.1])
    assert float(peak_loss([on_lesion], [LESION], margin=1.5)) == 0.0
    assert pointing_hits([on_lesion], [LESION]) == [True]

    off_peak = torch.tensor([0.0, 0.0, 0.33, 0.31, 0.0, 0.36])  # half the mass on the lesion, but the peak outside
    assert float(grounding_loss([off_peak], [LESION], target_mass=0.5)) == 0.0
    assert float(peak_loss([off_peak], [LESION], margin=1.5)) > 0.0
    assert pointing_hits([off_peak], [LESION]) == [False]

    # a touching patch (20% inside) is neither inside nor outside: its peak is not pushed down, and it does not hit
    touching = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.5, 0.1])
    assert float(peak_loss([touching], [LESION], margin=1.0)) == 0.0
    assert pointing_hits([touching], [LESION]) == [False]


def test_peak_loss_pulls_the_peak_onto_the_lesion():
    logits = torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0, 1.0], requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    for _ in range(50):
        loss = peak_loss([logits.softmax(0)], [LESION], margin=1.5)
        if loss is None or float(loss.detach()) == 0.0:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert pointing_hits([logits.detach()], [LESION]) == [True]


def test_slides_without_an_annotation_add_nothing():
    rel = torch.rand(6)
    assert peak_loss([rel], [None]) is None and peak_loss([rel], [torch.zeros(6)]) is None
    assert pointing_hits([rel, rel], [None, LESION]) == [pointing_hits([rel], [LESION])[0]]
