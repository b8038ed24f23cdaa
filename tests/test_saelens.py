import pytest
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


def test_per_layer_views_load_in_sae_lens_one_hook_each_sharing_weights(tmp_path):
    torch.manual_seed(1)
    sae = MLSAE(24, 96, 8)
    with torch.no_grad():
        sae.b_pre.normal_()
    sae.eval()  # (in training mode the first batch would re-initialise b_pre)
    paths = saelens.save_layer_views(sae, tmp_path / "views", "smollm2-135m", [0, 1, 2])
    assert [p.name for p in paths] == ["layer_0", "layer_1", "layer_2"]
    x = torch.randn(2, 40, 24) * 3 + 1  # (layer, token, d), as the MLSAE reads it
    ours = sae(x)
    for layer, path in enumerate(paths):
        theirs = SAE.load_from_disk(str(path))
        assert theirs.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        torch.testing.assert_close(
            theirs.decode(theirs.encode(x)), ours.recons, rtol=1e-5, atol=1e-5
        )
    a, b = (p / saelens.WEIGHTS_FILE for p in paths[:2])
    assert a.stat().st_ino == b.stat().st_ino  # one weights file on disk, linked into each view


def test_a_lens_run_cannot_be_exported_as_views(tmp_path):
    from mlsae.lens import random_lens

    with pytest.raises(ValueError, match="A lens run cannot be expressed in SAELens's format"):
        saelens.save_layer_views(MLSAE(8, 16, 2), tmp_path, "m", [0], lens=random_lens(8, 2))
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_views_spliced_by_sae_lens_reproduce_our_delta_ce_per_layer(smollm2, tmp_path):
    """Independent check: TL hooks driven by the SAELens object, a full forward, float64 CE."""
    from mlsae.models import special_token_ids
    from mlsae.patching import delta_ce_kl

    model = smollm2
    texts = [
        "The committee reported on Tuesday that the new tax would fall hardest on small farms "
        "in the northern counties, and several members asked for a second vote.",
        "She opened the letter slowly. It was from her brother, who had not written in years, "
        "and it said only that he was coming home before the winter.",
    ]
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = [row[: min(map(len, ids))] for row in ids]
    bos = model.tokenizer.bos_token_id
    tokens = torch.tensor([[bos, *row] for row in ids])
    torch.manual_seed(0)
    sae = MLSAE(model.cfg.d_model, 2 * model.cfg.d_model, 32).eval()
    layers = [0, 14, model.cfg.n_layers - 1]
    ours = delta_ce_kl(model, tokens, lambda x, layer: sae(x).recons, layers)
    paths = saelens.save_layer_views(sae, tmp_path / "views", "smollm2-135m", layers)
    keep = ~torch.isin(tokens, torch.tensor(special_token_ids(model)))
    scored, targets = keep[:, :-1], tokens[:, 1:]

    def ce(logits):
        logp = logits[:, :-1].double().log_softmax(-1)
        return -logp.gather(-1, targets[..., None])[..., 0][scored]

    with torch.no_grad():
        clean = ce(model(tokens))
        for layer, path in zip(layers, paths, strict=True):
            view = SAE.load_from_disk(str(path))

            def splice(act, hook, view=view):
                act = act.clone()
                act[keep] = view.decode(view.encode(act[keep]))
                return act

            patched = ce(
                model.run_with_hooks(tokens, fwd_hooks=[(view.cfg.metadata.hook_name, splice)])
            )
            theirs = (patched - clean).mean().item()
            mine = (ours["delta_ce"][layer] / ours["n"]).item()
            assert abs(theirs) > 0.01  # the splice changes the model's predictions
            assert abs(theirs - mine) < 1e-3, (layer, theirs, mine)


def test_export_allows_fold_w_dec_norm_with_the_same_outputs(tmp_path):
    """sae-dashboard calls fold_W_dec_norm first; SAELens refuses it for TopK SAEs unless
    rescale_acts_by_decoder_norm, which our unit-norm decoders allow within float rounding."""
    torch.manual_seed(2)
    sae = MLSAE(24, 96, 8)
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.W_enc.normal_()
    sae.eval()
    saelens.save(sae, tmp_path / "sae", "smollm2-135m", ["blocks.0.hook_resid_post"])
    theirs = SAE.load_from_disk(str(tmp_path / "sae"))
    assert theirs.cfg.rescale_acts_by_decoder_norm is True
    x = torch.randn(2, 50, 24) * 3 + 1
    ours = sae(x)
    dense_ours = sae.dense_latents(ours.values, ours.indices)
    theirs.fold_W_dec_norm()  # raises NotImplementedError with rescale_acts_by_decoder_norm false
    torch.testing.assert_close(theirs.encode(x), dense_ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours.recons, rtol=1e-5, atol=1e-5)


def test_export_of_a_non_unit_decoder_stays_exact(tmp_path):
    torch.manual_seed(3)
    sae = MLSAE(24, 96, 8)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)  # rows far from unit norm
    sae.eval()
    saelens.save(sae, tmp_path / "sae", "m", ["blocks.0.hook_resid_post"])
    theirs = SAE.load_from_disk(str(tmp_path / "sae"))
    assert theirs.cfg.rescale_acts_by_decoder_norm is False
    x = torch.randn(2, 50, 24) * 3 + 1
    torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x).recons, rtol=1e-5, atol=1e-5)


def test_load_reads_a_rescaled_sae_lens_topk_sae_exactly(tmp_path):
    """A SAELens TopK SAE with rescale_acts_by_decoder_norm and non-unit rows: our load folds
    the norms in (selection by pre * norm, decode by act / norm), so the outputs agree."""
    torch.manual_seed(4)
    sae = MLSAE(24, 96, 8)
    sae.eval()
    saelens.save(sae, tmp_path / "sae", "m", ["blocks.0.hook_resid_post"])
    theirs = SAE.load_from_disk(str(tmp_path / "sae"))
    with torch.no_grad():
        theirs.W_dec.mul_(torch.rand(96, 1) + 0.5)
        theirs.b_dec.normal_()
    theirs.save_model(str(tmp_path / "rescaled"))
    back = saelens.load(tmp_path / "rescaled")
    x = torch.randn(2, 50, 24) * 3 + 1
    torch.testing.assert_close(
        back(x).recons, theirs.decode(theirs.encode(x)), rtol=1e-5, atol=1e-5
    )
