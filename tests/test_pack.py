"""Packing arithmetic: piece cuts, best-fit-decreasing, window planning, row layout."""

import numpy as np
import pytest

from data.mix import SourceSpec, TokenMixer
from data.pack import IGNORE, PlanState, WindowPlanner, best_fit_decreasing, pack_row, piece_cuts


def test_piece_cuts_cover_the_document_and_never_split_an_atom():
    atoms = ((5, 25), (40, 41), (58, 70))
    cuts = piece_cuts(80, atoms, seq_len=30, max_pieces=10)
    assert cuts[0][0] == 0 and cuts[-1][1] == 80
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(cuts, cuts[1:]))
    assert all(0 < b - a <= 30 for a, b in cuts)
    for a, b in atoms:
        assert any(s <= a and b <= e for s, e in cuts), (a, b, cuts)
    assert piece_cuts(20, (), 30, 1) == [(0, 20)]
    assert piece_cuts(100, ((10, 50),), 30, 10) is None  # an atom longer than a sequence
    assert piece_cuts(100, (), 30, 3) is None  # more pieces than a window holds


def _reference_bfd(lengths, num_bins, capacity):
    """The plain loop: longest first, the fullest bin that still fits, lowest bin on ties."""
    free = [capacity] * num_bins
    where = [-1] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(num_bins) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))
            free[b] -= lengths[i]
            where[i] = b
    return where


def test_bfd_matches_the_plain_loop():
    rng = np.random.default_rng(0)
    failures = 0
    for trial in range(300):
        n, bins, cap = int(rng.integers(1, 40)), int(rng.integers(1, 8)), int(rng.integers(20, 120))
        lengths = rng.integers(1, cap + 1, n).tolist()
        where = best_fit_decreasing(lengths, bins, cap)
        assert where == _reference_bfd(lengths, bins, cap)
        failures += -1 in where
        for b in range(bins):
            assert sum(l for l, w in zip(lengths, where) if w == b) <= cap
    assert 0 < failures < 300  # both outcomes were exercised


def _sources(seed):
    rng = np.random.default_rng(seed)
    text = rng.integers(5, 700, 400)
    img_v = rng.integers(16, 120, 80)
    return [SourceSpec("text", "text", 1.0, text.astype(np.int64), np.zeros(400, np.int64)),
            SourceSpec("img", "vision", 1.0, (img_v + 20).astype(np.int64), img_v.astype(np.int64))]


def _layout_for(sources):
    """Image documents: [start, placeholders..., end] at the front is one atom."""
    def layout(draw):
        spec = sources[draw.source]
        n = int(spec.tokens[draw.sample])
        if spec.group == "vision":
            return n, ((0, int(spec.vision[draw.sample]) + 2),)
        return n, ()
    return layout


def _planner(seed=0, seq_len=256, window=8):
    sources = _sources(seed)
    mixer = TokenMixer(sources, 0.1, seed=seed, fingerprint="fp")
    return WindowPlanner(mixer, _layout_for(sources), seq_len, window), sources


def test_windows_take_the_stream_in_order_with_few_deferrals_and_fit():
    planner, sources = _planner()
    windows = [planner.next() for _ in range(30)]
    placed = [d for w in windows for d in w.docs]
    pending = windows[-1].end_state.carry
    mixer = TokenMixer(_sources(0), 0.1, seed=0, fingerprint="fp")
    drawn = [mixer.next() for _ in range(windows[-1].end_state.mix.draws)]
    # Every drawn unit is placed exactly once or still deferred; none lost, none duplicated.
    assert sorted(placed + pending, key=lambda d: d.index) == drawn
    assert len(pending) <= 8
    first_window = {d.index: w.index for w in windows for d in w.docs}
    # Deferral is short: a unit lands at most a few windows after the units drawn around it.
    lag = [first_window[d.index] - first_window[max(i for i in first_window if i <= d.index)]
           for d in placed]
    assert max(lag) <= 3
    _check_windows(windows, _layout_for(sources), 8, 256)
    eff = sum(w.tokens() for w in windows) / (30 * 8 * 256)
    assert eff > 0.95, eff
    # Long units were split across sequences.
    assert any(len(v) > 1 for w in windows for v in _pieces_per_doc(w).values())


def test_admission_layout_is_the_fallback_when_bfd_cannot_place_the_set(monkeypatch):
    import data.pack as pack

    used = []
    real = pack._online_best_fit
    monkeypatch.setattr(pack, "_online_best_fit", lambda *a: used.append(1) or real(*a))
    planner, sources = _planner(seed=0, seq_len=256, window=8)
    windows = [planner.next() for _ in range(300)]
    assert used  # BFD does fail now and then on a set that online best fit placed
    _check_windows(windows, _layout_for(sources), 8, 256)


def _check_windows(windows, layout, num_seqs, seq_len):
    for w in windows:
        assert len(w.sequences) == num_seqs
        assert [d.index for d in w.docs] == sorted(d.index for d in w.docs)
        covered = {i: [] for i in range(len(w.docs))}
        for seq in w.sequences:
            assert sum(p.end - p.start for p in seq) <= seq_len
            assert [(p.doc, p.start) for p in seq] == sorted((p.doc, p.start) for p in seq)
            for p in seq:
                covered[p.doc].append((p.start, p.end))
        for i, d in enumerate(w.docs):  # every unit whole, each atom inside one piece
            spans = sorted(covered[i])
            assert spans[0][0] == 0 and spans[-1][1] == d.tokens
            assert all(b == a for (_, b), (a, _) in zip(spans, spans[1:]))
            for a, b in layout(d)[1]:
                assert any(s <= a and b <= e for s, e in spans)


def _pieces_per_doc(window):
    out = {}
    for seq in window.sequences:
        for p in seq:
            out.setdefault(p.doc, []).append(p)
    return out


def test_planner_resumes_from_a_window_start_state():
    planner, _ = _planner(seed=1)
    straight = [planner.next() for _ in range(12)]
    resumed, _ = _planner(seed=1)
    resumed.seek(7, PlanState.from_dict(straight[7].start_state.to_dict()))
    again = [resumed.next() for _ in range(5)]
    assert [(w.index, w.docs, w.sequences) for w in again] == \
           [(w.index, w.docs, w.sequences) for w in straight[7:]]


def test_pack_row_labels_positions_doc_ids_and_mask():
    placeholder, end_marker, pad = 90, 91, 0
    doc_a = np.array([10, 11, 12, 13, 14, 15])
    doc_b = np.array([89, placeholder, placeholder, end_marker, 20, 21, 2])
    row = pack_row([(doc_a, 2, 6), (doc_b, 0, 7)], seq_len=16, pad_id=pad,
                   no_loss_ids=np.array([placeholder, end_marker]))
    assert row.input_ids.tolist() == [12, 13, 14, 15, 89, 90, 90, 91, 20, 21, 2] + [pad] * 5
    assert row.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6] + [0, 1, 2, 3, 4]
    assert row.doc_ids.tolist() == [0] * 4 + [1] * 7 + [2] * 5
    assert row.seqlens == [4, 7, 5]
    # Next token of the same document; none at a document's end, none for padding; the label
    # of a piece's last token would be past the end of doc_a here (it is the document's end).
    assert row.labels.tolist() == [13, 14, 15, IGNORE, IGNORE, IGNORE, IGNORE, 20, 21, 2, IGNORE] + [IGNORE] * 5
    assert row.loss_mask.tolist() == [l != IGNORE for l in row.labels.tolist()]
    # A cut piece predicts the first token of its continuation.
    cut = pack_row([(doc_a, 0, 3)], 4, pad, np.array([placeholder]))
    assert cut.labels.tolist() == [11, 12, 13, IGNORE]
    with pytest.raises(ValueError, match="seq_len"):
        pack_row([(doc_a, 0, 6)], 4, pad, np.array([placeholder]))
