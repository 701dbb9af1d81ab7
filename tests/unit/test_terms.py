"""Every Term is defined once, and the allocated terms are the first ten (DESIGN.md)."""

from memplan.terms import ALLOCATED_TERMS, DEFINITIONS, Term


def test_every_term_has_one_definition():
    assert set(DEFINITIONS) == set(Term)
    assert all(t.definition == DEFINITIONS[t] and len(t.definition) > 20 for t in Term)


def test_allocated_terms_exclude_what_torch_does_not_allocate():
    assert Term.ALLOCATOR_OVERHEAD not in ALLOCATED_TERMS and Term.CUDA_CONTEXT not in ALLOCATED_TERMS
    assert len(ALLOCATED_TERMS) == 11 and Term.WORKSPACE in ALLOCATED_TERMS and Term.COMM_BUFFERS in ALLOCATED_TERMS
