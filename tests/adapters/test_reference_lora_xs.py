"""`lora-xs` against the reference code of LoRA-XS (github.com/MohammadrezaBanaei/LoRA-XS), its
equations written out here in plain torch, independently of `longctx.adapters.lora_xs`:

- `utils/svd_utils.py` + `utils/initialization_utils.py`: a truncated SVD of the *transposed*
  weight, M = Wᵀ (d_in, d_out); `enc = transform(M) = M · components_ᵀ` (d_in, r) and
  `dec = components_` (r, d_out); PEFT's `lora_A.weight = encᵀ`, `lora_B.weight = decᵀ`; R is an
  r×r `nn.Linear` without bias, initialised with `normal_(mean=0, std=1e-5)`.
- `utils/latent_utils.py` (`forward_latent`): result = W x + b + lora_B(R(lora_A(dropout(x)))) · scaling,
  with PEFT's scaling = lora_alpha / r.

The reference's SVD is scikit-learn's randomized TruncatedSVD; the references below take the exact
SVD with the sign rule current scikit-learn applies to `components_` (each row's largest-magnitude
entry positive), and one test compares with TruncatedSVD itself where scikit-learn is installed.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb, random_ids, tiny_llama
from torch import nn

from longctx.adapters import wrap
from longctx.adapters.lora_xs import LoraXSLinear

# The modules the reference's decoder-LM scripts adapt (main_math_tuning.py, run_commonsense_tuning.sh).
REFERENCE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A.weight (r, d_in), lora_B.weight (d_out, r)) as the reference builds them from W (d_out, d_in)."""
    m = weight.detach().T  # the reference decomposes `target.weight.T`: (d_in, d_out)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    components = vh[:rank]  # TruncatedSVD.components_: (r, d_out)
    pivot = components.abs().argmax(1)  # svd_flip(u_based_decision=False): largest entry of each row > 0
    components = components * torch.sign(components[torch.arange(rank), pivot])[:, None]
    enc = m @ components.T  # TruncatedSVD.transform(M): (d_in, r), = P_r S_r
    return enc.T, components.T


class ReferenceLoraXSLinear(nn.Module):
    """One adapted linear layer, computed as the reference's `forward_latent` does."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, latent: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight.detach(), linear.bias
        self.lora_a, self.lora_b = reference_factors(self.weight, rank)
        self.latent, self.scaling = latent.detach(), alpha / rank  # R: the latent map's (r, r) weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        return result + F.linear(F.linear(F.linear(x, self.lora_a), self.latent), self.lora_b) * self.scaling


def reference_model(model: nn.Module, adapted) -> nn.Module:
    """`model` (a fresh copy of the base) with the reference layer at each of `adapted`'s points, given its R."""
    recipe = adapted.recipe
    for name in adapted.insertion_points:
        parent, _, leaf = name.rpartition(".")
        linear = model.get_submodule(name)
        rank = min(recipe.rank, *linear.weight.shape)
        latent = adapted.model.get_submodule(name).lora_xs_R
        setattr(model.get_submodule(parent), leaf, ReferenceLoraXSLinear(linear, rank, recipe.alpha, latent))
    return model


def test_one_layer_equals_the_reference_forward_and_not_sigma_on_the_output_side():
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, dtype=torch.float64)  # (d_out, d_in) = (80, 48): not square
    ours = LoraXSLinear(linear, rank=6, alpha=12.0, dropout=0.0, r_init_std=1e-5)
    with torch.no_grad():
        ours.lora_xs_R.copy_(torch.randn(6, 6, dtype=torch.float64))
    reference = ReferenceLoraXSLinear(linear, 6, 12.0, ours.lora_xs_R)
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    with torch.no_grad():
        got, want = ours(x), reference(x)
        base = linear(x)
    # 1e-10: the two SVDs (of W here, of Wᵀ in the reference) agree to ~1e-12 in float64 on one CPU
    # and not another (its LAPACK kernels); a wrong factor or order is off by more than 1e-2.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert (want - base).abs().max() > 1e-2  # the branch is not negligible
    # Σ on the output factor instead (B = U_r Σ_r, A = V_rᵀ) is another map for the same R:
    sigma = reference.lora_a.norm(dim=1)  # rows of lora_A are σ_i v_iᵀ
    other = (reference.lora_b * sigma) @ reference.latent @ (reference.lora_a / sigma[:, None])  # (80, 48)
    assert (base + reference.scaling * x @ other.T - want).abs().max() > 1e-2


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("insertion, rank, alpha", [("every-qv", 8, 16.0), (REFERENCE_TARGETS, 4, 4.0)])
def test_whole_model_logits_equal_the_reference(dtype, atol, insertion, rank, alpha):
    adapted = wrap(tiny_llama().to(dtype), "lora-xs", insertion=insertion, rank=rank, alpha=alpha)
    perturb(adapted, scale=0.5)  # a trained-looking R, so that the branch is visible in the logits
    reference = reference_model(tiny_llama().to(dtype), adapted)
    ids = random_ids(2, 40)
    with torch.no_grad():
        got, want = adapted(input_ids=ids).logits, reference(input_ids=ids).logits
        base = tiny_llama().to(dtype)(input_ids=ids).logits
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert (want - base).abs().max() > 1e-2


def test_fresh_model_equals_the_reference_with_the_initial_r():
    adapted = wrap(tiny_llama().double(), "lora-xs")
    reference = reference_model(tiny_llama().double(), adapted)
    ids = random_ids(1, 30)
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0,
                                   atol=1e-12)


def _all_r(adapted) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in adapted.model.parameters() if p.requires_grad])


def _initial_r(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.Tensor:
    return _all_r(wrap(tiny_llama().to(dtype), "lora-xs", seed=seed, **overrides))


def test_initial_r_is_normal_with_the_reference_std():
    r = _initial_r(insertion=REFERENCE_TARGETS, rank=16).double()  # 28 modules x 256 = 7,168 draws
    n, std = r.numel(), 1e-5  # the reference: init.normal_(weight, mean=0, std=0.00001)
    assert n == 28 * 256
    assert abs(r.std().item() / std - 1) < 0.05  # sampling error of the std: 1/sqrt(2n) = 0.8%
    assert abs(r.mean().item()) < 5 * std / n ** 0.5
    kurtosis = (((r - r.mean()) / r.std()) ** 4).mean().item()
    assert abs(kurtosis - 3) < 0.4  # normal (3), not uniform (1.8): SE sqrt(24/n) = 0.06


def test_initial_r_is_reproducible_for_a_seed_and_leaves_the_global_rng_alone():
    first = _initial_r(seed=0)
    model = tiny_llama()  # (seeds the global generator itself)
    for global_seed in (123, 999):  # any global state: the same R for the same seed, and that state kept
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        again = wrap(copy.deepcopy(model), "lora-xs", seed=0)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(_all_r(again), first)
    assert not torch.equal(_initial_r(seed=1), first)
    assert torch.equal(_initial_r(seed=0, dtype=torch.float64), first.double())  # same draw on any dtype


def test_factors_agree_with_the_references_truncated_svd():
    """The reference's own SVD call (config/reconstruct_config.yaml: n_iter=10, random_state=42),
    up to its randomized approximation (measured ≤ 3e-3 here): same factors, same signs."""
    sklearn = pytest.importorskip("sklearn.decomposition")
    adapted = wrap(tiny_llama(), "lora-xs", insertion=REFERENCE_TARGETS)
    for name in adapted.insertion_points[:7]:  # layer 0: square, GQA (32x64), MLP (128x64, 64x128)
        layer = adapted.model.get_submodule(name)
        m = layer.base_layer.weight.detach().T.numpy()
        svd = sklearn.TruncatedSVD(n_components=layer.rank, n_iter=10, random_state=42).fit(m)
        enc, dec = torch.from_numpy(svd.transform(m)), torch.from_numpy(svd.components_)
        torch.testing.assert_close(layer.lora_xs_A, enc.T.float(), rtol=0, atol=1e-2, msg=name)
        torch.testing.assert_close(layer.lora_xs_B, dec.T.float(), rtol=0, atol=1e-2, msg=name)
