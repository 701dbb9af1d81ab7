"""The report's words for the terms are true for every method (memplan.terms' definitions are the reference)."""

from __future__ import annotations

import html

import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from memplan.report import sweep  # noqa: E402
from memplan.report.charts import TERM_LABELS  # noqa: E402
from memplan.report.html import _notes_html  # noqa: E402
from memplan.terms import Term  # noqa: E402


def test_every_term_has_a_label():
    assert set(TERM_LABELS) == set(Term)


def test_base_weights_label_is_true_for_full_fine_tuning():
    """A full fine-tune trains the base weights: "frozen" would be false; the definition's words are used."""
    label = TERM_LABELS[Term.BASE_WEIGHTS]
    assert "frozen" not in label.lower() and "frozen" not in Term.BASE_WEIGHTS.definition.lower()
    for word in ("decoder", "Linear"):
        assert word in label and word in Term.BASE_WEIGHTS.definition


def test_glossary_gives_each_terms_definition():
    df = sweep(["llama-3.2-1b"], ["a10g"], seq_lens=(512,), batch_sizes=(1,), progress=False)
    page = _notes_html(df, {})
    for t in Term:
        assert html.escape(t.definition, quote=True) in page, t
        assert html.escape(TERM_LABELS[t], quote=True) in page, t
