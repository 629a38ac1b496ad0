"""The DoRA row-norm kernels against the materialized norm; the Triton one under TRITON_INTERPRET=1."""

import pytest
import torch

from kernels import dora_norm
from tests.helpers.triton import interpreted


def _materialized(w0, a, b, s):
    return torch.linalg.vector_norm(w0.double() + s * b.double() @ a.double(), dim=1).float()  # [out]


CASES = [(37, 70, 3, 0.5), (64, 128, 16, 2.0), (33, 200, 20, 0.25)]  # odd sizes, rank padded to 16 / 32


@pytest.mark.parametrize("n_out,n_in,rank,s", CASES)
def test_reference_matches_the_materialized_norm(n_out, n_in, rank, s):
    g = torch.Generator().manual_seed(n_out)
    w0, a, b = (torch.randn(*shape, generator=g) for shape in ((n_out, n_in), (rank, n_in), (n_out, rank)))
    torch.testing.assert_close(
        dora_norm.dora_row_norm_reference(w0, a, b, s), _materialized(w0, a, b, s), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("n_out,n_in,rank,s", CASES)
@interpreted
def test_triton_kernel_matches_the_reference(n_out, n_in, rank, s):
    g = torch.Generator().manual_seed(n_out)
    w0, a, b = (torch.randn(*shape, generator=g) for shape in ((n_out, n_in), (rank, n_in), (n_out, rank)))
    out = dora_norm.dora_row_norm_triton(w0, a, b, s)
    assert out.shape == (n_out,) and out.dtype == torch.float32
    torch.testing.assert_close(out, dora_norm.dora_row_norm_reference(w0, a, b, s), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _materialized(w0, a, b, s), rtol=1e-5, atol=1e-5)


@interpreted
def test_triton_kernel_on_strided_bf16_weights():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(96, 40, generator=g).to(torch.bfloat16).T  # [40, 96], column-major view
    a, b = torch.randn(8, 96, generator=g), torch.randn(40, 8, generator=g)
    out = dora_norm.dora_row_norm_triton(w0, a, b, 0.3, block_out=16, block_in=32)
    torch.testing.assert_close(out, _materialized(w0.float(), a, b, 0.3), rtol=1e-5, atol=1e-5)


@interpreted
def test_triton_kernel_has_no_cancellation_where_the_adapter_cancels_a_row():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 64, generator=g), torch.randn(16, 4, generator=g)
    w0 = -(b @ a) + 1e-3 * torch.randn(16, 64, generator=g)  # W0 + BA is tiny: the norm is ~1e-3·√64
    out = dora_norm.dora_row_norm_triton(w0, a, b, 1.0)
    torch.testing.assert_close(out, _materialized(w0, a, b, 1.0), rtol=1e-3, atol=1e-6)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"A \(4, 10\), B \(5, 3\)"):
        dora_norm.dora_row_norm_triton(torch.zeros(5, 9), torch.zeros(4, 10), torch.zeros(5, 3), 1.0)
