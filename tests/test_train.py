import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_cache

from mlsae import config
from mlsae.stages.train import passes
from mlsae.train import NonFiniteError, TrainConfig, load_checkpoint, load_sae, read_log, train


def cfg(**kw):
    base = dict(expansion_factor=4, k=4, lr=3e-3, batch_tokens=64, dead_tokens=256, log_every=1)
    base |= dict(shuffle_tokens=0, select_bf16=False)  # cache order, exact top-k
    return TrainConfig.of(**(base | kw))


def test_training_reduces_fvu(tmp_path):
    cache = make_cache(tmp_path / "cache")
    train(cfg(), cache, tmp_path / "run", progress=False)
    fvus = [row["fvu"] for row in read_log(tmp_path / "run")]
    assert len(fvus) == 32
    assert np.mean(fvus[-5:]) < 0.6 * np.mean(fvus[:3])
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["tokens_seen"] == 2048 and state["step"] == 32


def test_single_layer_run_and_budget(tmp_path):
    cache = make_cache(tmp_path / "cache")
    sae = train(cfg(layers=[1], max_tokens=640), cache, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["tokens_seen"] == 640 and state["layers"] == [1]
    assert sae.n_latents == 64


def test_resume_gives_the_same_weights_as_one_run(tmp_path):
    cache = make_cache(tmp_path / "cache")
    full = train(cfg(checkpoint_tokens=320), cache, tmp_path / "full", progress=False)
    train(cfg(max_tokens=960), cache, tmp_path / "part", progress=False)
    resumed = train(cfg(checkpoint_tokens=320), cache, tmp_path / "part", progress=False)
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-6, atol=1e-6)
    assert (tmp_path / "full" / "checkpoint.pt.prev").exists()


def test_nan_activations_stop_with_step_and_keep_checkpoint(tmp_path):
    cache = make_cache(tmp_path / "cache", nan_at=4)
    with pytest.raises(NonFiniteError, match=r"NaN/inf in activations at step 16"):
        train(cfg(checkpoint_tokens=256), cache, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["tokens_seen"] == 1024


def test_corrupt_checkpoint_is_a_clear_error_and_not_overwritten(tmp_path):
    cache = make_cache(tmp_path / "cache")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        train(cfg(), cache, tmp_path / "run", progress=False)
    assert ckpt.read_bytes() == b"not a checkpoint"
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        load_sae(tmp_path / "missing.pt")


def test_bad_config_values():
    with pytest.raises(ValueError, match="expansion_factor must be positive"):
        TrainConfig.of(expansion_factor=0)
    with pytest.raises(ValueError, match="batch_tokens must be positive"):
        TrainConfig.of(batch_tokens=0)


def test_changed_settings_start_afresh_instead_of_reusing_a_stale_checkpoint(tmp_path):
    cache = make_cache(tmp_path / "cache")
    train(cfg(max_tokens=640), cache, tmp_path / "run", progress=False)
    sae = train(cfg(max_tokens=640, k=2), cache, tmp_path / "run", progress=False)
    assert sae.k == 2
    assert (tmp_path / "run" / "checkpoint.stale.pt").exists()
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["train_config"]["run"]["k"] == 2


def test_incomplete_last_batch_is_dropped_not_nan(tmp_path):
    cache = make_cache(tmp_path / "cache")
    # 2048 tokens, 7 steps of 64 then a 1-token remainder under a 449-token budget
    train(cfg(layers=[0], max_tokens=449), cache, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["tokens_seen"] == 448 and state["step"] == 7


def test_resume_does_not_duplicate_log_rows(tmp_path):
    cache = make_cache(tmp_path / "cache")
    train(cfg(max_tokens=960, checkpoint_tokens=320), cache, tmp_path / "run", progress=False)
    # as after a crash: rows beyond the last checkpoint were logged, then lost with the process
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["step"] == 15
    state = ckpt | {"tokens_seen": 640, "step": 10}
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    train(cfg(max_tokens=960, checkpoint_tokens=320), cache, tmp_path / "run", progress=False)
    steps = [row["step"] for row in read_log(tmp_path / "run")]
    assert steps == sorted(set(steps)) and steps[-1] == 15


def test_missing_checkpoint_falls_back_to_prev(tmp_path):
    cache = make_cache(tmp_path / "cache")
    train(cfg(max_tokens=640, checkpoint_tokens=320), cache, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert (run / "checkpoint.pt.prev").exists()
    (run / "checkpoint.pt").unlink()  # a crash between the two renames of an older scheme
    train(cfg(max_tokens=640, checkpoint_tokens=320), cache, run, progress=False)
    assert load_checkpoint(run / "checkpoint.pt")["tokens_seen"] == 640


def test_a_step_counts_its_tokens_once_whatever_the_layers(tmp_path):
    cache = make_cache(tmp_path / "cache", n_layers=3)
    c = cfg(expansion_factor=16, k=2, batch_tokens=16, max_tokens=16, dead_tokens=10**6)
    sae = train(c, cache, tmp_path / "run", progress=False)
    # one step of 16 tokens x 3 layers: unfired latents are 16 tokens stale, not 48
    assert sae.tokens_since_fired.max().item() == 16
    assert (sae.tokens_since_fired == 0).any()


def test_grad_accum_counts_tokens_and_steps(tmp_path):
    cache = make_cache(tmp_path / "cache")
    train(cfg(max_tokens=640, grad_accum=2), cache, tmp_path / "run", progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["tokens_seen"] == 640 and state["step"] == 5


def test_training_in_lens_space_leaves_the_lens_untouched(tmp_path):
    from mlsae.lens import random_lens

    cache = make_cache(tmp_path / "cache", n_layers=3)
    lens = random_lens(16, 3, scale=0.5, seed=0)
    before = {k: v.clone() for k, v in lens.state_dict().items()}
    train(cfg(max_tokens=256), cache, tmp_path / "run", lens=lens, progress=False)
    for name, p in lens.named_parameters():
        assert p.grad is None, name  # no graph was built through the lens
        assert torch.equal(p.detach(), before[name])


def test_lr_factor_hand_computed():
    from mlsae.schedule import lr_factor

    assert lr_factor(0, 100) == 1.0 and lr_factor(99, 100) == 1.0  # the paper: constant
    assert lr_factor(0, 100, warmup=10) == pytest.approx(0.1)
    assert lr_factor(4, 100, warmup=10) == pytest.approx(0.5)
    assert lr_factor(50, 100, decay="linear") == pytest.approx(0.5)
    assert lr_factor(50, 100, decay="cosine") == pytest.approx(0.5)
    assert lr_factor(25, 100, decay="cosine") == pytest.approx((1 + 2**-0.5) / 2)
    assert lr_factor(4, 100, warmup=10, decay="linear") == pytest.approx(0.5 * 0.96)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig.of(lr_decay="step")


def test_a_decayed_run_resumes_to_the_same_weights(tmp_path):
    cache = make_cache(tmp_path / "c", n_tokens=2048, n_layers=2, d=16)
    cfg = TrainConfig.of(
        expansion_factor=2,
        k=4,
        batch_tokens=64,
        lr=3e-3,
        lr_warmup_tokens=256,
        lr_decay="cosine",
        checkpoint_tokens=384,
        max_tokens=1024,
    )
    full = train(cfg, cache, tmp_path / "full", progress=False)
    # the checkpoint written at 768 tokens (kept as .prev), as a killed run would leave it
    (tmp_path / "part").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint.pt.prev", tmp_path / "part" / "checkpoint.pt")
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["tokens_seen"] == 768
    resumed = train(cfg, cache, tmp_path / "part", progress=False)
    # a decayed run's schedule depends on its budget: a new budget starts afresh
    train(replace(cfg, max_tokens=2048), cache, tmp_path / "part", progress=False)
    assert (tmp_path / "part" / "checkpoint.stale.pt").exists()
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)


def test_train_config_is_the_params_sections_and_flat_keywords_go_where_they_belong():
    from mlsae import config

    assert TrainConfig().train == config.Train() and TrainConfig().run == config.Run()
    cfg = TrainConfig.of(k=3, lr=0.5, shuffle_tokens=0, max_tokens=10, seed=2)
    assert (cfg.run.k, cfg.train.lr, cfg.train.shuffle_tokens) == (3, 0.5, 0)
    assert (cfg.max_tokens, cfg.seed) == (10, 2)
    assert cfg.flat()["k"] == 3 and cfg.flat()["lr"] == 0.5 and "run" not in cfg.flat()
    with pytest.raises(TypeError, match="no setting 'learning_rate'"):
        TrainConfig.of(learning_rate=1.0)
    with pytest.raises(ValueError, match="train.shuffle_tokens = 32 is smaller than one batch"):
        TrainConfig.of(batch_tokens=64, shuffle_tokens=32)


def test_a_new_checkpoint_interval_or_budget_resumes_but_a_new_setting_does_not():
    from dataclasses import asdict

    from mlsae.train import same_run

    base = TrainConfig.of(k=4, max_tokens=100)
    for resumable in (dict(checkpoint_tokens=7), dict(max_tokens=200), dict(epochs=2)):
        kw = dict(k=4, max_tokens=100) | resumable
        assert same_run(asdict(base), asdict(TrainConfig.of(**kw))), resumable
    for fresh in (dict(lr=0.5), dict(k=8), dict(shuffle_tokens=0), dict(source="stream")):
        kw = dict(k=4, max_tokens=100) | fresh
        assert not same_run(asdict(base), asdict(TrainConfig.of(**kw))), fresh


def test_snapshots_are_the_sae_of_a_run_stopped_there(tmp_path):
    """A snapshot at N tokens holds exactly the weights of the same run trained to N (constant
    step size, cache order): the 64k point of a longer run stands for a 64k run."""
    cache = make_cache(tmp_path / "cache")
    train(cfg(snapshot_tokens=[640, 1280, 4096]), cache, tmp_path / "long", progress=False)
    short = train(cfg(max_tokens=640), cache, tmp_path / "short", progress=False)
    snaps = sorted(p.name for p in (tmp_path / "long" / "snapshots").iterdir())
    assert snaps == ["tokens-1280.pt", "tokens-640.pt"]  # 4096 is past the 2048-token budget
    state = load_checkpoint(tmp_path / "long" / "snapshots" / "tokens-640.pt")
    assert state["tokens_seen"] == 640 and state["optimizer"] is None
    snap = load_sae(tmp_path / "long" / "snapshots" / "tokens-640.pt")
    for name, value in short.state_dict().items():
        torch.testing.assert_close(snap.state_dict()[name], value, rtol=0, atol=0)


def test_a_run_longer_than_the_cache_reads_it_again(tmp_path):
    p = config.from_dict({"data": {"train_tokens": 64_000}})
    assert passes(p, None) == 1 and passes(p, 64_000) == 1
    assert passes(p, 64_001) == 2 and passes(p, 256_000) == 4
    assert passes(config.from_dict({"train": {"epochs": 2}}), 128_000) == 4
