"""``auto`` bf16 settings: resolved from the CPU's flags (a CPU without bf16 units gets float32)."""

import pytest

from mlsae import config, precision


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n")
    return str(path)


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu sse2 avx2 fma", False),  # an AVX2-only EPYC: bf16 is emulated, ~66x slower
        ("fpu avx2 avx512f avx512_bf16", True),
        ("fpu avx2 amx_tile amx_bf16", True),
    ],
)
def test_cpu_bf16_from_flags(tmp_path, flags, expected):
    assert precision.cpu_has_bf16(_cpuinfo(tmp_path, flags)) is expected


def test_arm_features_and_unreadable_cpuinfo(tmp_path):
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert precision.cpu_has_bf16(str(arm)) is True
    assert precision.cpu_has_bf16(str(tmp_path / "missing")) is False


def test_explicit_settings_win_and_bad_ones_are_refused():
    assert precision.use_bf16(True, "cpu") is True
    assert precision.use_bf16(False, "cuda") is False
    assert precision.use_bf16("auto", "cpu") is precision.cpu_has_bf16()
    with pytest.raises(ValueError, match="'fast'"):
        precision.use_bf16("fast", "cpu")


def test_params_accept_auto_and_booleans_and_name_a_bad_word():
    for value in ("auto", True, False):
        p = config.from_dict({"train": {"select_bf16": value}, "eval": {"ce_bf16": value}})
        assert p.train.select_bf16 == value and p.eval.ce_bf16 == value
    with pytest.raises(config.ConfigError, match="train.select_bf16"):
        config.from_dict({"train": {"select_bf16": "fast"}})
    with pytest.raises(config.ConfigError, match="eval.ce_bf16"):
        config.from_dict({"eval": {"ce_bf16": 1}})
