"""Config loading, overrides and validation: every error names the file and the key."""

from pathlib import Path

import pytest
import yaml

from mt.config import (
    Config,
    DecodeConfig,
    config_text,
    diff,
    from_dict,
    load_config,
    save_config,
    temperature_shares,
    written_by_mt,
)
from mt.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(path.stem for path in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(config, Config)
    assert config.data.src_lang != config.data.tgt_lang


def test_base_is_the_paper_base_model() -> None:
    m = load_config(CONFIGS / "base.yaml").model
    assert (m.dim, m.enc_layers, m.dec_layers, m.heads, m.ffn_dim, m.dropout) == (
        512,
        6,
        6,
        8,
        2048,
        0.1,
    )
    t = load_config(CONFIGS / "base.yaml").train
    assert (t.betas, t.eps, t.warmup_steps, t.label_smoothing) == ((0.9, 0.98), 1e-9, 4000, 0.1)
    assert 24_000 <= t.max_tokens * t.update_freq <= 26_000


def test_defaults_fill_missing_sections(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "run_dir: runs/a\n"))
    assert config == Config(run_dir="runs/a")


def test_an_empty_path_key_means_none_as_when_left_out(tmp_path: Path) -> None:
    # `test:` with nothing after it (or null, or ~): no test set, the default.
    plain = load_config(write(tmp_path, "data:\n  train: t\n"))
    for text in ("  test:\n", "  test: null\n  cache_dir: ~\n  valid: null\n"):
        assert load_config(write(tmp_path, f"data:\n  train: t\n{text}")) == plain
    corpus = "data:\n  train: t\n  corpora:\n    - {src_lang: de, tgt_lang: en, test: null}\n"
    assert load_config(write(tmp_path, corpus)).data.corpora[0].test == ""
    path = write(tmp_path, "data:\n  train:\n")  # still empty where a command needs it
    with pytest.raises(ConfigError) as err:
        load_config(path, required=("data.train",))
    assert str(err.value) == f"{path}: data.train is empty; set it in the config or data.train=PATH"
    path = write(tmp_path, "run_dir:\n")  # a key whose default is not empty wants a value
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: run_dir must be a string, got None"


def test_heads_must_divide_dim(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  dim: 512\n  heads: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: model.heads=7 does not divide model.dim=512"
    assert err.value.exit_code == 2


def test_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  layers: 3\n")
    with pytest.raises(
        ConfigError, match=r"x\.yaml: unknown key model\.layers; did you mean model\.enc_layers\?$"
    ):
        load_config(path)


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x\.yaml: unknown key optim$"):
        load_config(write(tmp_path, "optim: {lr: 1}\n"))


def test_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  max_tokens: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: train.max_tokens must be an integer, got 'lots'"


def test_bool_is_not_an_integer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.dim must be an integer, got True"):
        load_config(write(tmp_path, "model: {dim: true}\n"))


def test_int_accepted_for_float(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "train: {lr: 1}\n")).train.lr == 1.0


def test_literal_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "train: {precision: fp8}\n"))
    assert str(err.value).endswith(
        "train.precision must be one of auto, fp32, bf16, fp16, got 'fp8'"
    )


def test_section_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model must be a section"):
        load_config(write(tmp_path, "model: 3\n"))
    # A section whose keys are all commented out is empty, not an error.
    assert load_config(write(tmp_path, "data:\n#  train: x\nmodel:\n  dim: 64\n")).model.dim == 64
    # and a key=value override fills it
    commented = write(tmp_path, "model:\n#  dim: 64\n")
    assert load_config(commented, ["model.dim=48", "model.heads=4"]).model.dim == 48


def test_yaml_keys_must_be_names_and_merge_keys_work(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  train: a\nmodel:\n  [a, b]: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: line 4: invalid YAML (a key must be a name, not a list or a mapping)"
    )
    merged = "shape: &shape {dim: 64, heads: 4}\nmodel:\n  <<: *shape\n  heads: 2\n"
    path = write(tmp_path, merged)
    with pytest.raises(ConfigError, match=r"unknown key shape$"):  # the anchor's own section
        load_config(path)
    model = load_config(write(tmp_path, "model:\n  <<: {dim: 64, heads: 4}\n  heads: 2\n")).model
    assert (model.dim, model.heads) == (64, 2)


def test_an_unclosed_quote_names_the_line_it_opens_on(tmp_path: Path) -> None:
    path = write(tmp_path, 'data:\n  train: "abc\nmodel:\n  dim: 3\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: line 2: invalid YAML (")


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  dim: [1, 2\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: line \d+: invalid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [("train:\n  lr: 1\nmodel:\n  dim: 8\ntrain:\n  seed: 3\n", 5, "train"),
     ("train:\n  lr: 1\n  seed: 2\n  lr: 2\n", 4, "lr")],
)  # fmt: skip
def test_a_key_given_twice_is_an_error(tmp_path: Path, text: str, line: int, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: line {line}: invalid YAML ('{key}' given twice)"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert str(err.value) == f"{tmp_path / 'nope.yaml'}: no such config file"


def test_overrides_are_typed(tmp_path: Path) -> None:
    config = load_config(
        CONFIGS / "base.yaml",
        [
            "model.enc_layers=3",
            "train.max_tokens=2048",
            "train.betas=[0.9, 0.99]",
            "run_dir=2024",
            "model.prenorm=true",
            "train.lr=1e-3",
        ],
    )
    assert config.model.enc_layers == 3
    assert config.train.max_tokens == 2048
    assert config.train.betas == (0.9, 0.99)
    assert config.run_dir == "2024"  # string fields keep the raw text
    assert config.model.prenorm is True
    assert config.train.lr == 1e-3


def test_integers_are_decimal_and_dates_are_text(tmp_path: Path) -> None:
    # YAML 1.1 read 045 as octal 37 and 2024-09-31 as a date (a traceback: no such day).
    config = load_config(
        CONFIGS / "base.yaml",
        ["train.max_minutes=045", "train.valid_every=0500", "train.max_tokens=4_096"],
    )
    assert (config.train.max_minutes, config.train.valid_every) == (45.0, 500)
    assert config.train.max_tokens == 4096
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "base.yaml", ["model.dim=0x200"])
    assert str(err.value) == "command line: model.dim must be an integer, got '0x200'"
    path = write(tmp_path, "run_dir: 2024-09-31\ntrain:\n  seed: 0123\n")
    config = load_config(path)
    assert (config.run_dir, config.train.seed) == ("2024-09-31", 123)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "train:\n  seed: !!int 0x10\n"))
    assert str(err.value) == (
        f"{tmp_path / 'x.yaml'}: invalid YAML (invalid literal for int() with base 10: '0x10')"
    )
    for tagged in ("!!bool maybe", "!!timestamp x"):  # each was a traceback
        with pytest.raises(ConfigError) as err:
            load_config(write(tmp_path, f"train:\n  compile: {tagged}\n"))
        assert str(err.value) == (
            f"{tmp_path / 'x.yaml'}: invalid YAML (a value its explicit !!tag cannot be)"
        )
        with pytest.raises(ConfigError) as err:
            load_config(CONFIGS / "base.yaml", [f"train.compile={tagged}"])
        message = f"command line: train.compile must be true or false, got {tagged!r}"
        assert str(err.value) == message


def test_a_dotted_key_in_a_file_says_to_nest_it(tmp_path: Path) -> None:
    for text, key, hint in [("model.dim: 64\n", "model.dim", "dim under model:"),
                            ("train:\n  ema.decay: 1\n", "train.ema.decay", None)]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            load_config(write(tmp_path, text))
        message = str(err.value)
        assert message.startswith(f"{tmp_path / 'x.yaml'}: unknown key {key}")
        assert (
            message.endswith(f": in a file, write {hint}") if hint else "in a file" not in message
        )


def test_a_control_character_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  dim: 64\n\x0c\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: line 3: invalid YAML (character U+000C is not allowed)"


def test_override_errors_name_the_command_line() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "base.yaml", ["model.enc_layers=abc"])
    assert str(err.value) == "command line: model.enc_layers must be an integer, got 'abc'"
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "base.yaml", ["model.layerz=3"])
    assert (
        str(err.value) == "command line: unknown key model.layerz; did you mean model.enc_layers?"
    )
    for override, message in [
        ("model.heds=2", "unknown key model.heds; did you mean model.heads?"),
        ("modle.dim=3", "unknown key modle.dim; did you mean model.dim?"),
        ("data=5", "data is a section: override one of its keys, e.g. data.KEY=v"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(CONFIGS / "base.yaml", [override, "data.valid="])
        assert str(err.value) == f"command line: {message}"
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "base.yaml", ["model.heads"])
    assert str(err.value) == "command line: override 'model.heads' is not of the form key=value"
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "base.yaml", ["model.heads=7"])
    assert str(err.value) == "command line: model.heads=7 does not divide model.dim=512"


def test_one_field_of_one_corpus_can_be_overridden() -> None:
    multi = CONFIGS / "multi30k-multi.yaml"
    config = load_config(multi, ["data.corpora[1].weight=3", "data.corpora[0].valid=dev"])
    before = load_config(multi)
    assert [c.weight for c in config.data.corpora] == [
        3.0 if i == 1 else c.weight for i, c in enumerate(before.data.corpora)
    ]
    assert config.data.corpora[0].valid == "dev"  # string fields keep the raw text
    assert config.data.corpora[2:] == before.data.corpora[2:]
    for override, message in [
        ("data.corpora[4].weight=1", "there is no data.corpora[4] (data.corpora has 4)"),
        ("data.corpora[0].wait=1", "unknown key data.corpora[0].wait"),
        ("data.corpora[0].weight=abc", "data.corpora[0].weight must be a number, got 'abc'"),
        ("data.corpora[2].weight=-1", "data.corpora[2].weight=-1.0 must be positive"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(multi, [override])
        assert str(err.value) == f"command line: {message}"
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "base.yaml", ["data.corpora[0].weight=2"])
    assert str(err.value) == ("command line: there is no data.corpora[0] (data.corpora has 0)")


def test_overrides_that_data_corpora_would_ignore_are_refused() -> None:
    multi = CONFIGS / "multi30k-multi.yaml"
    own = [f"data.corpora[{i}].valid=dev{i}" for i in range(4)]  # every corpus names its own
    cases = [
        (["data.src_lang=fr"], "data.src_lang: this config's directions are data.corpora's "
         "(de-en, en-de, fr-en, en-fr); set them there (data.src_lang and data.tgt_lang are the "
         "direction of a run without it)"),
        ([*own, "data.valid=other"], "data.valid: every corpus of data.corpora names its own "
         "valid file; set data.corpora[N].valid instead (data.valid is for the corpora that "
         "name none)"),
    ]  # fmt: skip
    for overrides, message in cases:
        with pytest.raises(ConfigError) as err:
            load_config(multi, overrides)
        assert str(err.value) == f"command line: {message}"
    # Where a corpus names none, data.valid is its file: taken.
    config = load_config(multi, [*own[:3], "data.valid=other"])
    assert [c.valid for c in config.data.directions()] == ["dev0", "dev1", "dev2", "other"]


def test_share_embeddings_needs_joint_vocab(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "tokenizer: {joint: false}\n"))
    assert str(err.value).endswith(
        "model.share_embeddings=true needs a joint vocabulary (tokenizer.joint=true)"
    )
    config = load_config(
        write(tmp_path, "tokenizer: {joint: false}\n"), ["model.share_embeddings=false"]
    )
    assert not config.tokenizer.joint


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.dropout=1.0", "model.dropout=1.0 must be in [0, 1)"),
        ("train.update_freq=0", "train.update_freq=0 must be positive"),
        ("train.label_smoothing=-0.1", "train.label_smoothing=-0.1 must be in [0, 1)"),
        ("train.initial_dropout=1", "train.initial_dropout=1.0 must be in [0, 1)"),
        ("train.initial_dropout_steps=-5", "train.initial_dropout_steps=-5 must be >= 0"),
        ("train.cooldown=1", "train.cooldown=1.0 must be in [0, 1)"),
        ("train.cooldown=-0.1", "train.cooldown=-0.1 must be in [0, 1)"),
        ("data.src_lang=en", "data.src_lang and data.tgt_lang are both 'en'"),
        ("tokenizer.vocab_size=4", "tokenizer.vocab_size=4 must be in [8, 2147483647]"),
        (
            "tokenizer.vocab_size=3000000000",
            "tokenizer.vocab_size=3000000000 must be in [8, 2147483647]",
        ),
        (
            "tokenizer.input_sentence_size=99999999999999999999",
            "tokenizer.input_sentence_size="
            "99999999999999999999 is out of range (at most 9223372036854775807)",
        ),
        ("train.eps=-1", "train.eps=-1.0 must be positive"),
        ("train.eps=0", "train.eps=0.0 must be positive"),
        ("train.min_loss_scale=-1", "train.min_loss_scale=-1.0 must be >= 0"),
        ("decode.beam=0", "decode.beam=0 must be >= 1"),
        (
            "model.max_positions=100",
            "model.max_positions=100 is shorter than data.max_len=128 + 1",
        ),
        ("train.device=tpu", "train.device='tpu' must be auto, cpu, cuda or cuda:N"),
        ("train.device=cudaX", "train.device='cudaX' must be auto, cpu, cuda or cuda:N"),
        ("train.device=cuda:abc", "train.device='cuda:abc' must be auto, cpu, cuda or cuda:N"),
        ("train.device=cuda:-1", "train.device='cuda:-1' must be auto, cpu, cuda or cuda:N"),
        ("train.seed=-1", "train.seed=-1 must be in [0, 4294967295]"),
        ("train.seed=4294967296", "train.seed=4294967296 must be in [0, 4294967295]"),
        ("decode.max_len_a=-5", "decode.max_len_a=-5.0 must be >= 0"),
        ("decode.max_len_b=-10", "decode.max_len_b=-10 must be >= 0"),
        ("run_dir=", "run_dir is empty: name the run's directory"),
        (
            "tokenizer.character_coverage=0.5",
            "tokenizer.character_coverage=0.5 must be in [0.98, 1]",
        ),
    ],
)
def test_impossible_values(override: str, message: str) -> None:  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "multi30k.yaml", [override])
    assert str(err.value) == f"command line: {message}"


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "base.yaml", ["model.enc_layers=2"])
    save_config(config, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == config
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.parametrize("text", ["09", "019", "0_9", "-07", "+1_000", "0x10", "2024-09-31"])
def test_a_string_that_looks_like_a_number_reads_back_as_written(tmp_path: Path, text: str) -> None:
    # The loader reads 09 and 0_9 as integers where YAML 1.1 does not: the dumper must quote them.
    keys = ("run_dir", "data.train", "data.valid", "data.test", "data.cache_dir")
    config = load_config(CONFIGS / "tiny.yaml", [f"{key}={text}" for key in keys])
    assert config.run_dir == config.data.valid == text
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert written_by_mt(config_text(config), config)  # `mt train --config RUN/config.yaml`


@pytest.mark.parametrize("name", sorted(path.stem for path in CONFIGS.glob("*.yaml")))
def test_configs_are_written_as_before(name: str) -> None:
    # A run's config.yaml is compared as text (check_config_file): what PyYAML's safe_dump
    # wrote, mt writes still.
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config_text(config) == yaml.safe_dump(config.to_dict(), sort_keys=False)


def test_from_dict_and_diff() -> None:
    a = from_dict({"model": {"dim": 64, "heads": 4}})
    b = from_dict({"model": {"dim": 64, "heads": 2}, "train": {"lr": 0.5}})
    assert diff(a, b, ["model"]) == ["model.heads: 4 -> 2"]
    assert diff(a, b, ["model", "train"]) == ["model.heads: 4 -> 2", "train.lr: 0.0007 -> 0.5"]
    with pytest.raises(ConfigError, match=r"^checkpoint: unknown key model\.x$"):
        from_dict({"model": {"x": 1}}, source="checkpoint")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=.inf", "train.lr=inf must be finite"),
        ("train.lr=nan", "train.lr=nan must be finite"),
        ("train.lr=1e999", "train.lr=inf must be finite"),
        ("train.max_minutes=.inf", "train.max_minutes=inf must be finite"),
        ("train.betas=[0.9, .nan]", "train.betas=nan must be finite"),
        ("model.dropout=-.inf", "model.dropout=-inf must be finite"),
        ("data.max_ratio=.inf", "data.max_ratio=inf must be finite"),
        ("decode.alpha=.nan", "decode.alpha=nan must be finite"),
        ("decode.max_len_a=inf", "decode.max_len_a=inf must be finite"),
        ("train.lr=1" + "0" * 400, "train.lr must be finite, got an integer of 401 digits"),
    ],
)
def test_float_settings_refuse_inf_and_nan_on_the_command_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert str(err.value) == f"command line: {message}"


def test_a_yaml_boolean_for_a_string_says_to_quote_it(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {corpora: [{src_lang: de, tgt_lang: no}]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: data.corpora[0].tgt_lang must be a string, got False (quote it: YAML reads "
        "yes, no, on, off as booleans)"
    )
    with pytest.raises(ConfigError, match=r"got True$"):  # quoting would not make it a number
        load_config(write(tmp_path, "train: {lr: yes}\n"))


def test_temperature_shares_do_not_overflow() -> None:
    assert temperature_shares([900, 100], 1.0) == pytest.approx([0.9, 0.1])
    assert temperature_shares([900, 100], 2.0, [1, 3]) == pytest.approx([0.5, 0.5])
    assert temperature_shares([29_000, 1_000], 0.001) == [1.0, 0.0]  # 29,000^1000 overflows
    assert temperature_shares([10, 10], 5.0, [1e308, 1e308]) == [0.5, 0.5]
    assert temperature_shares([0, 5], 5.0) == [0.0, 1.0] and temperature_shares([0], 1.0) == [0.0]


def test_float_settings_refuse_inf_and_nan_in_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train: {lr: .inf}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: train.lr=inf must be finite"
    path = write(tmp_path, "tokenizer: {character_coverage: .nan}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: tokenizer.character_coverage=nan must be finite"
    with pytest.raises(ConfigError, match=r"^checkpoint: train\.eps=inf must be finite$"):
        from_dict({"train": {"eps": float("inf")}}, source="checkpoint")


def test_decode_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(Exception, match=r"^decode\.length_penalty='wu' must be one of gnmt, "):
        DecodeConfig(length_penalty="wu")  # type: ignore[arg-type]
    with pytest.raises(Exception, match=r"^decode\.nbest=3 exceeds decode\.beam=2$"):
        DecodeConfig(beam=2, nbest=3)


def test_validation_searches_with_valid_beam_for_one_output_never_sampling() -> None:
    decode = DecodeConfig(beam=5, nbest=4, valid_beam=2, sampling=True, alpha=1.0)
    valid = decode.for_validation()
    assert (valid.beam, valid.nbest, valid.sampling, valid.alpha) == (2, 1, False, 1.0)


# --- several directions -----------------------------------------------------------------------

MULTI = """data:
  train: corpus/train
  valid: corpus/valid
  corpora:
    - {src_lang: de, tgt_lang: en}
    - {src_lang: en, tgt_lang: de, weight: 2}
    - {src_lang: fr, tgt_lang: en, train: other/train, test: other/test}
"""


def test_single_pair_keys_mean_one_direction() -> None:
    data = load_config(CONFIGS / "tiny.yaml").data
    assert data.corpora == [] and data.temperature == 5.0
    (only,) = data.directions()
    assert (only.direction, only.train, only.valid, only.test, only.weight) == (
        "de-en", data.train, data.valid, data.test, 1.0
    )  # fmt: skip
    assert data.target_languages() == ["en"]


def test_corpora_share_the_data_files_unless_they_name_their_own(tmp_path: Path) -> None:
    data = load_config(write(tmp_path, MULTI)).data
    rows = [(c.direction, c.train, c.valid, c.test, c.weight) for c in data.directions()]
    assert rows == [
        ("de-en", "corpus/train", "corpus/valid", "", 1.0),
        ("en-de", "corpus/train", "corpus/valid", "", 2.0),
        ("fr-en", "other/train", "corpus/valid", "other/test", 1.0),
    ]
    assert data.target_languages() == ["en", "de"]
    # The saved config keeps what was written (empty files mean "shared"), and reloads equal.
    save_config(load_config(write(tmp_path, MULTI)), tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").data == data


@pytest.mark.parametrize(
    ("corpora", "message"),
    [
        (
            "[{src_lang: de, tgt_lang: en}, {src_lang: fr, tgt_lang: en}, "
            "{src_lang: de, tgt_lang: en}]",
            "data.corpora[2]: direction de-en is already data.corpora[0]",
        ),
        (
            "[{src_lang: pt-BR, tgt_lang: en}, {src_lang: pt, tgt_lang: BR-en}]",
            "data.corpora[1]: pt -> BR-en and data.corpora[0]'s pt-BR -> en are both named "
            "pt-BR-en: write a code with _ instead of - (pt_BR)",
        ),
        (
            "[{src_lang: de, tgt_lang: 'e n'}]",
            "data.corpora[0].tgt_lang='e n' is not a language code (letters, digits, - and _)",
        ),
        (
            "[{src_lang: de}]",
            "data.corpora[0].tgt_lang='' is not a language code (letters, digits, - and _)",
        ),
        ("[{src_lang: de, tgt_lang: de}]", "data.corpora[0].src_lang and tgt_lang are both 'de'"),
        (
            "[{src_lang: de, tgt_lang: en, weight: 0}]",
            "data.corpora[0].weight=0.0 must be positive",
        ),
        ("[{src_lang: de, tgt_lang: en, lang: x}]", "unknown key data.corpora[0].lang"),
        ("[de-en]", "data.corpora[0] must be a mapping, got 'de-en'"),
        ("de-en", "data.corpora must be a list of mappings, got 'de-en'"),
    ],
)
def test_corpora_errors_name_the_entry(tmp_path: Path, corpora: str, message: str) -> None:
    path = write(tmp_path, f"data:\n  corpora: {corpora}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, ""), [f"data.corpora={corpora}"])
    assert str(err.value) == f"command line: {message}"


def test_every_corpus_needs_training_data(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  corpora: [{src_lang: de, tgt_lang: en, train: a}, "
                 "{src_lang: fr, tgt_lang: en}]\n")  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_config(path, required=["data.train"])
    assert str(err.value) == (
        f"{path}: data.corpora[1].train is empty; set it there or data.train=PATH for every corpus"
    )
    assert load_config(path, ["data.train=b"], required=["data.train"]).data.directions()[1].train
    assert load_config(path, ["data.train=b"]).data.directions()[0].train == "a"


def test_select_direction_and_temperature_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path, MULTI)
    assert load_config(path, ["data.select_direction=fr-en"]).data.select_direction == "fr-en"
    # Without a dev set it loads (a run's saved config must, to translate); training refuses it.
    assert load_config(path, ["data.select_direction=fr-en", "data.valid="])
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.select_direction=de-fr"])
    assert str(err.value) == (
        "command line: data.select_direction='de-fr' is not a direction of the run "
        "(de-en, en-de, fr-en)"
    )
    with pytest.raises(ConfigError, match=r"^command line: data.temperature=0.0 must be positive$"):
        load_config(path, ["data.temperature=0"])
    # A corpus's languages changed on the command line: the file is not to blame.
    multi = CONFIGS / "multi30k-multi.yaml"
    for override, message in [
        (
            "data.corpora[2].src_lang=de",
            "data.corpora[2]: direction de-en is already data.corpora[0]",
        ),
        (
            "data.corpora[0].src_lang=fr",
            "data.corpora[2]: direction fr-en is already data.corpora[0]",
        ),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(multi, [override])
        assert str(err.value) == f"command line: {message}"


def test_the_multilingual_recipe_has_four_directions() -> None:
    data = load_config(CONFIGS / "multi30k-multi.yaml").data
    assert [c.direction for c in data.directions()] == ["de-en", "en-de", "fr-en", "en-fr"]
    assert {c.train for c in data.directions()} == {"data/multi30k/train"}
    assert data.target_languages() == ["en", "de", "fr"]
    # Out of English drawn more often: 5/16 of the sentences each, 3/16 into English.
    assert [c.weight for c in data.directions()] == [0.75, 1.25, 0.75, 1.25]


def test_the_bilingual_recipes_differ_only_in_direction() -> None:
    de_en = load_config(CONFIGS / "multi30k.yaml")
    en_de = load_config(CONFIGS / "multi30k-en-de.yaml")
    sections = ("data", "tokenizer", "model", "train", "decode")
    assert diff(de_en, en_de, sections) == [
        "data.src_lang: 'de' -> 'en'",
        "data.tgt_lang: 'en' -> 'de'",
    ]
    assert (de_en.run_dir, en_de.run_dir) == ("runs/multi30k-de-en", "runs/multi30k-en-de")
    # The settings measured at an AVX2-only CPU's ~1,500 updates and an AMX CPU's ~4,000.
    assert (de_en.model.dropout, de_en.train.lr, de_en.train.cooldown) == (0.2, 3e-3, 0.2)
    assert (de_en.train.max_minutes, de_en.train.precision) == (58, "auto")
    assert (de_en.decode.beam, de_en.decode.length_penalty, de_en.decode.alpha) == (5, "gnmt", 1.5)
