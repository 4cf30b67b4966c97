"""Settings: flag over environment over default, validation, and the CSA start-up checks."""

from __future__ import annotations

import os
import platform
import socket

import pytest

from model import cache, native
from model.head.files import CheckpointMismatchError
from model.head.group_head import GroupHead, GroupHeadConfig
from model.weights.loading import weights_signature
from server.__main__ import main
from server.app import create_app
from server.config import OPTIONS, Settings, SettingsError
from server.services import csa_path

FOREIGN_ISA = "avx2" if platform.machine().lower() in ("aarch64", "arm64") else "neon"


def test_defaults():
    settings = Settings.from_sources([], environ={})
    assert (settings.host, settings.port, settings.model) == ("127.0.0.1", 8000, None)
    assert settings.max_group_size == 8 and settings.max_wait_ms == 20.0
    assert settings.csa == "auto" and settings.api_key is None
    assert settings.weights == "auto"  # int4 for the embedded GGUF on a CPU
    assert settings.replica_name == socket.gethostname()
    assert settings.engine_options.speculate and settings.engine_options.max_proposal_tokens == 8


def test_speculation_is_set_by_flag_or_environment():
    settings = Settings.from_sources(["--speculate", "off"],
                                     environ={"GROUPWISE_SPECULATE_TOKENS": "4"})
    assert not settings.engine_options.speculate
    assert settings.engine_options.max_proposal_tokens == 4


def test_environment_is_read_and_flags_win():
    environ = {"GROUPWISE_PORT": "9001", "GROUPWISE_MAX_WAIT_MS": "7.5",
               "GROUPWISE_MODEL": "tiny-random", "GROUPWISE_API_KEY": "k",
               "GROUPWISE_REPLICA_NAME": "r2", "GROUPWISE_KV_CACHE_MB": "12.5"}
    settings = Settings.from_sources(["--port", "9002"], environ=environ)
    assert settings.port == 9002  # the flag
    assert settings.max_wait_ms == 7.5 and settings.model == "tiny-random"
    assert settings.api_key == "k" and settings.replica_name == "r2"
    assert settings.kv_cache_mb == 12.5


def test_every_setting_has_a_flag_and_an_environment_variable():
    fields = {option.field for option in OPTIONS}
    assert fields == set(Settings.__dataclass_fields__)
    assert all(option.env == "GROUPWISE_" + option.field.upper() for option in OPTIONS)
    assert all(option.flag == "--" + option.field.replace("_", "-") for option in OPTIONS)


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {"GROUPWISE_PORT": "eighty"},
         "--port (GROUPWISE_PORT): cannot read 'eighty' as an integer"),
        (["--playground", "maybe"], {},
         "--playground (GROUPWISE_PLAYGROUND): cannot read 'maybe' as on or off"),
        (["--port", "70000"], {}, "--port (GROUPWISE_PORT): must be in 0..65535, got 70000"),
        (["--max-group-size", "0"], {},
         "--max-group-size (GROUPWISE_MAX_GROUP_SIZE): must be >= 1"),
        (["--dtype", "int3"], {}, "--dtype (GROUPWISE_DTYPE): must be one of"),
        (["--max-wait-ms", "-1"], {}, "--max-wait-ms (GROUPWISE_MAX_WAIT_MS): must be >= 0"),
        ([], {"GROUPWISE_THREADS": "0"}, "--threads (GROUPWISE_THREADS): must be >= 1"),
        (["--kv-cache-mb", "0"], {}, "--kv-cache-mb (GROUPWISE_KV_CACHE_MB): must be > 0"),
        (["--weights", "int3"], {},
         "--weights (GROUPWISE_WEIGHTS): must be one of auto, loaded, bf16, int4, fp32"),
        (["--max-prefill-tokens", "0"], {},
         "--max-prefill-tokens (GROUPWISE_MAX_PREFILL_TOKENS): must be >= 1"),
        (["--csa-scope", "some"], {},
         "--csa-scope (GROUPWISE_CSA_SCOPE): must be one of grouped, all"),
        (["--api-key", "a,,b"], {}, "--api-key (GROUPWISE_API_KEY): must not hold an empty key"),
        ([], {"GROUPWISE_CPU_ISA": "avx3"},
         "--cpu-isa (GROUPWISE_CPU_ISA): 'avx3': use one of auto, avx512, avx2, neon, scalar"),
        (["--speculate", "on"], {}, "--speculate (GROUPWISE_SPECULATE): must be one of auto, off"),
        ([], {"GROUPWISE_SPECULATE_TOKENS": "0"},
         "--speculate-tokens (GROUPWISE_SPECULATE_TOKENS): must be >= 1"),
        (["--cpu-isa", FOREIGN_ISA], {}, f"--cpu-isa (GROUPWISE_CPU_ISA): '{FOREIGN_ISA}': not an "
         f"instruction set of this {platform.machine()} CPU (this CPU runs"),
    ],
)
def test_bad_values_are_refused_naming_their_flag_and_variable(argv, environ, expected):
    with pytest.raises(SettingsError) as refused:
        Settings.from_sources(argv, environ=environ)
    assert str(refused.value).startswith(expected)


def test_api_key_is_not_logged():
    assert Settings(api_key="secret").describe()["api_key"] == "set"


def test_a_comma_separated_api_key_is_one_tenant_per_key():
    assert Settings(api_key="alpha, beta").api_keys == ("alpha", "beta")
    assert Settings().api_keys == ()


def test_main_exits_2_on_a_bad_setting(capsys):
    assert main(["--port", "x"]) == 2
    assert "--port (GROUPWISE_PORT): cannot read 'x'" in capsys.readouterr().err


def test_csa_path_resolution(tmp_path):
    assert csa_path(Settings(csa="off"), "SmolLM2-135M-Instruct") is None
    assert csa_path(Settings(csa="auto"), "tiny-random") is None  # nothing shipped for it
    assert csa_path(Settings(csa=str(tmp_path)), "tiny-random") == tmp_path


def save_checkpoint(directory, hidden_size: int, signature: tuple[float, ...]) -> None:
    config = GroupHeadConfig(hidden_size=hidden_size, num_heads=4, base_model="some-model",
                       base_signature=signature)
    GroupHead(config).save(directory)


def test_checkpoint_of_another_model_stops_start_up(tiny_model, tmp_path, capsys):
    save_checkpoint(tmp_path, tiny_model.model.config.hidden_size, (1.0,) * 128)
    settings = Settings(model="tiny-random", csa=str(tmp_path))
    with pytest.raises(CheckpointMismatchError, match="trained on some-model"):
        create_app(settings, loaded_model=tiny_model)
    assert main(["--model", "tiny-random", "--csa", str(tmp_path), "--port", "0"]) == 1
    assert "cannot start: CSA checkpoint" in capsys.readouterr().err


def test_matching_checkpoint_is_loaded(tiny_model, tmp_path):
    signature = weights_signature(tiny_model.model)
    save_checkpoint(tmp_path, tiny_model.model.config.hidden_size, signature)
    app = create_app(Settings(model="tiny-random", csa=str(tmp_path)), loaded_model=tiny_model)
    assert app.state.services.engine.csa is not None
    off = create_app(Settings(model="tiny-random", csa="off"), loaded_model=tiny_model)
    assert off.state.services.engine.csa is None


def test_missing_checkpoint_directory_stops_start_up(tmp_path, capsys):
    missing = tmp_path / "nothing-here"
    assert main(["--model", "tiny-random", "--csa", str(missing)]) == 2
    said = capsys.readouterr().err
    assert "--csa (GROUPWISE_CSA): must be auto, off or a CSA checkpoint directory" in said
    assert f"{missing} holds no CSA checkpoint" in said
    assert main(["--model", "tiny-random", "--csa", "maybe"]) == 2
    assert "must be auto, off or" in capsys.readouterr().err


def test_every_flag_shows_its_default_and_its_variable_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option in OPTIONS:
        assert f"(default: {option.default}; env {option.env})" in shown, option.flag
    assert "(default: 127.0.0.1; env GROUPWISE_HOST)" in shown
    assert "(default: 1024 on cpu, 8192 on cuda, at most 16 full contexts;" in shown


def test_the_cpu_isa_cap_is_a_setting_passed_inward(tiny_model):
    try:
        create_app(Settings(model="tiny-random", csa="off", cpu_isa="scalar"),
                   loaded_model=tiny_model)
        assert native.chosen_isa() == "scalar"
        create_app(Settings(model="tiny-random", csa="off"), loaded_model=tiny_model)
        assert native.chosen_isa() == native.runnable_isas()[0]
    finally:
        native.use_isa_cap(os.environ.get("GROUPWISE_CPU_ISA"))  # the run's own cap


def test_the_cache_directory_is_a_setting_passed_inward(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_directory", cache.cache_dir())  # loading moves it: put it back
    assert Settings.from_sources([], environ={"GROUPWISE_CACHE": str(tmp_path)}).cache == str(
        tmp_path)
    create_app(Settings(model="tiny-random", csa="off", cache=str(tmp_path)),
               loaded_model=tiny_model)
    assert cache.cache_dir() == tmp_path
    create_app(Settings(model="tiny-random", csa="off"), loaded_model=tiny_model)
    assert cache.cache_dir() == cache.DEFAULT_CACHE_DIR
