import torch
from sae_lens import SAE

from mlsae import saelens
from mlsae.sae import MLSAE


def test_sae_lens_loads_our_export_with_identical_encode_decode(tmp_path):
    torch.manual_seed(0)
    sae = MLSAE(24, 96, 8)
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.W_enc.normal_()
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    saelens.save(sae, tmp_path / "sae", "smollm2-135m", hooks)
    theirs = SAE.load_from_disk(str(tmp_path / "sae"))
    # small-std vectors make any difference in the eps convention of (de)standardization visible
    x = torch.cat([torch.randn(3, 50, 24) * 4 + 2, torch.randn(3, 10, 24) * 1e-3 + 5], dim=1)
    ours = sae.eval()(x)
    dense_theirs = theirs.encode(x)
    dense_ours = sae.dense_latents(ours.values, ours.indices)
    torch.testing.assert_close(dense_theirs, dense_ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.decode(dense_theirs), ours.recons, rtol=1e-5, atol=1e-5)
    assert theirs.cfg.metadata.hook_names == hooks
    back = saelens.load(tmp_path / "sae")
    torch.testing.assert_close(back(x).recons, ours.recons)
