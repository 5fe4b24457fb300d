"""``scripts/study_learned_nm.py`` (issue 29's end-to-end N:M study): its patterns are every way to keep N of M,
and its cap on changes of pattern moves only the groups whose new pattern leads the most, holding the others."""

from __future__ import annotations

import itertools

import torch

from _helpers import load_script


def test_patterns_are_every_way_to_keep_n_of_m():
    study = load_script("study_learned_nm")
    for n, m in ((2, 4), (4, 8), (1, 4)):
        pats = study.patterns(n, m)
        assert pats.shape == (len(list(itertools.combinations(range(m), n))), m)
        assert torch.all(pats.sum(1) == n)
        assert len({tuple(r.tolist()) for r in pats}) == pats.shape[0]


def test_flip_cap_moves_the_largest_leads_and_holds_the_rest():
    study = load_script("study_learned_nm")
    torch.manual_seed(0)
    logits = {"a": torch.randn(3, 5, 6), "b": torch.randn(2, 4, 6)}
    current = {k: torch.zeros(z.shape[:2], dtype=torch.long) for k, z in logits.items()}
    for z in logits.values():
        z[..., 0] += 0.5  # some groups stay at pattern 0, the others lead elsewhere by various margins
    before = {k: z.clone() for k, z in logits.items()}
    leads = sorted(((float(before[k][i, j].max() - before[k][i, j, 0]), k, i, j) for k, z in before.items()
                    for i in range(z.shape[0]) for j in range(z.shape[1]) if int(z[i, j].argmax()) != 0), reverse=True)
    cap = 3
    assert len(leads) > cap
    assert study.flip_cap(logits, current, cap) == cap
    moved = {(k, i, j) for _, k, i, j in leads[:cap]}
    for k, z in logits.items():
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                if (k, i, j) in moved:  # moved to its new argmax, logits untouched
                    assert int(current[k][i, j]) == int(before[k][i, j].argmax())
                    assert torch.equal(z[i, j], before[k][i, j])
                else:  # held: still pattern 0, now the argmax
                    assert int(current[k][i, j]) == 0 and int(z[i, j].argmax()) == 0
    assert study.flip_cap(logits, current, 100) == 0  # nothing left leading elsewhere
