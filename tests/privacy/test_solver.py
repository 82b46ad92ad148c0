import pytest
import torch

from kscope.privacy.edit.solver import null_projector, orthonormal, second_moment, solve_columns, solve_directions, solve_unrestricted


def _problem(seed=0, m=16, d=6, n=3, rank_r=10, n_r=200):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(m, rank_r, generator=g)
    K_R = basis @ torch.randn(rank_r, n_r, generator=g)  # preserved keys span a 10-dim subspace of R^16
    K_F = torch.randn(m, n, generator=g)  # erased keys have components outside it
    R = torch.randn(d, n, generator=g)
    return K_F, K_R, second_moment(K_R.T), R


def test_nullspace_edit_moves_erased_keys_to_the_target_and_leaves_preserved_keys():
    K_F, K_R, C, R = _problem()
    sol = solve_unrestricted(R, K_F, C, "nullspace", tol=1e-8, eps=1e-8)
    assert torch.allclose(sol.delta @ K_F, R, atol=1e-3)
    assert (sol.delta @ K_R).abs().max() < 1e-3 * K_R.abs().max()
    assert sol.params == 6 * 16


def test_ridge_trades_the_target_against_preservation():
    K_F, K_R, C, R = _problem()
    weak = solve_unrestricted(R, K_F, C, "ridge", lam=1e-6, eps=1e-9)
    strong = solve_unrestricted(R, K_F, C, "ridge", lam=1e3, eps=1e-9)
    assert torch.allclose(weak.delta @ K_F, R, atol=1e-3)  # nearly unconstrained: the target is met
    off = lambda s: float((s.delta @ K_R).norm())  # noqa: E731
    assert off(strong) < 0.1 * off(weak)  # a strong preservation term keeps preserved keys near zero
    assert float((strong.delta @ K_F - R).norm()) < float(R.norm())  # and still moves toward the target


def test_direction_restricted_edit_lives_in_the_span_and_is_the_projection_of_the_unrestricted_one():
    K_F, K_R, C, R = _problem()
    D = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    sol = solve_directions(R, K_F, C, D, "ridge", lam=1.0)
    U = orthonormal(D).float()
    assert sol.params == 2 * 16
    assert torch.allclose(sol.delta - U @ (U.T @ sol.delta), torch.zeros_like(sol.delta), atol=1e-5)  # column space in span(D)
    full = solve_unrestricted(R, K_F, C, "ridge", lam=1.0)
    assert torch.allclose(sol.delta, U @ (U.T @ full.delta), atol=1e-4)


def test_column_restricted_edit_changes_only_its_columns():
    K_F, K_R, C, R = _problem()
    sol = solve_columns(R, K_F, C, [1, 5, 7, 11], "ridge", lam=1.0)
    changed = (sol.delta.abs() > 0).any(0).nonzero().flatten().tolist()
    assert changed == [1, 5, 7, 11] and sol.params == 6 * 4


def test_null_projector_projects_out_the_preserved_span():
    _, K_R, C, _ = _problem()
    P = null_projector(C, 1e-8)
    assert torch.allclose(P @ P, P, atol=1e-8)
    assert (P @ K_R.double()).abs().max() < 1e-6 * K_R.abs().max()
    assert int(round(float(P.trace()))) == 6


@pytest.mark.parametrize("preserve", ["ridge", "nullspace"])
def test_unknown_preservation_is_refused(preserve):
    K_F, _, C, R = _problem()
    with pytest.raises(ValueError):
        solve_unrestricted(R, K_F, C, preserve + "x")


def test_keyed_edit_moves_erased_keys_to_the_target_and_keeps_preserved_keys(llama_lm):
    """On a tiny model, one layer, null-space preservation: afterwards the residual at the erased keys is the target z
    (the solver's constraint met), and the MLP output at the preserved keys is unchanged."""
    from kscope.facts import Fact, resolve_targets
    from kscope.model.sites import Site
    from kscope.privacy.edit.editors import WeightEdit
    from kscope.privacy.edit.keyed import Handle, KeyedConfig, KeyRows, at_keys, keyed_edit, optimise_z, preserved_moments

    lm = llama_lm
    tok = lm.tokenizer
    erase = resolve_targets([Fact("france", "capital", "paris", ["the capital of france is"])], tok, "whole")
    keep = resolve_targets([Fact("germany", "capital", "berlin", ["the capital of germany is", "germany 's capital city is"]),
                            Fact("spain", "language", "spanish", ["people in spain speak", "the official language of spain is"])],
                           tok, "whole")
    cfg = KeyedConfig(preserve="nullspace", tol=1e-6, steps=5, weight_decay=0.0)
    rows, kept = KeyRows.of(tok, erase), KeyRows.of(tok, keep)
    C = preserved_moments(lm, [2], [kept], [])
    h, z = optimise_z(lm, rows, 2, cfg)
    assert (z - h).norm() > 0
    new, params, _ = keyed_edit(lm, rows, [2], Handle("unrestricted", {}), C, 0.0, cfg, z)
    out, resid = Site(2, "mlp.out"), Site(2, "resid.post")
    before = at_keys(lm, kept, [out])[out]
    with WeightEdit("keyed", new).applied(lm.model):
        assert float((at_keys(lm, rows, [resid])[resid] - z).norm()) < 1e-2 * float((z - h).norm())  # the target is met
        assert float((at_keys(lm, kept, [out])[out] - before).norm()) < 1e-4 * float(before.norm())  # preserved keys kept
    assert params == 32 * 64


def test_keyed_edit_memoises_only_the_unedited_activations(llama_lm):
    """Over a two-layer band, the memo of the unedited model's key activations saves one forward per later edit and
    changes nothing: the second layer, read after the first one's edit, is never served from it."""
    from kscope.facts import Fact, resolve_targets
    from kscope.privacy.edit.keyed import Handle, KeyedConfig, KeyRows, keyed_edit, optimise_z, preserved_moments

    lm = llama_lm
    rows = KeyRows.of(lm.tokenizer, resolve_targets([Fact("france", "capital", "paris", ["the capital of france is"])],
                                                    lm.tokenizer, "whole"))
    cfg = KeyedConfig(steps=3)
    C = preserved_moments(lm, [1, 2], [], [[1, 5, 7, 9, 11]])
    z = optimise_z(lm, rows, 2, cfg)[1]
    forwards = []
    hook = lm.model.base_model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        plain, _, _ = keyed_edit(lm, rows, [1, 2], Handle("unrestricted", {}), C, 1.0, cfg, z)
        n_plain = len(forwards)
        memo: dict = {}
        for _ in range(2):
            forwards.clear()
            got, _, _ = keyed_edit(lm, rows, [1, 2], Handle("unrestricted", {}), C, 1.0, cfg, z, memo)
            assert all(torch.equal(got[L], plain[L]) for L in (1, 2))
    finally:
        hook.remove()
    assert n_plain == 2 and len(forwards) == 1  # the second layer's keys are read on the model with layer 1 edited


def test_the_share_a_handle_can_express_separates_geometry_from_location():
    from kscope.privacy.edit.solver import expressible

    torch.manual_seed(0)
    d, m, n = 6, 12, 5
    R, K = torch.randn(d, n), torch.randn(m, n)
    held, total = expressible(R, K)
    assert held == pytest.approx(total)  # unrestricted, n <= m keys of full rank: all of it
    e0 = torch.zeros(1, d)
    e0[0, 0] = 1.0
    held, total = expressible(R, K, directions=e0)
    assert held / total == pytest.approx(float(R[0].pow(2).sum() / R.pow(2).sum()), rel=1e-6)  # one output coordinate
    assert expressible(R, K, columns=range(m))[0] == pytest.approx(total)
    few = expressible(R, K, columns=[0, 1])  # two key rows cannot span five keys
    assert 0 < few[0] < 0.9 * total
