import re
import unicodedata

import pytest
from typer.testing import CliRunner

from mnist_jobs.cli import app
from mnist_jobs.config import (
    ConfigError,
    SlurmConfig,
    TrainConfig,
    check_no_control,
    parse_option,
    parse_slurm_opt,
    train_config_from_options,
)


def test_defaults_are_the_tutorial_run():
    c = TrainConfig()
    assert (c.model, c.optimizer, c.lr, c.batch_size, c.iters, c.eval_every) == (
        "logreg",
        "sgd",
        0.001,
        100,
        3000,
        500,
    )
    assert c.iters == 5 * c.iters_per_epoch


def test_epochs_resolve_to_iters():
    assert TrainConfig(epochs=3, batch_size=256).iters == 3 * 235  # ceil(60000 / 256) = 235
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(epochs=2, iters=7)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"lr": 0}, "--lr must be > 0"),
        ({"lr": float("nan")}, "--lr must be finite"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"iters": -5}, "--iters must be >= 1"),
        ({"model": "resnet"}, "--model must be one of logreg, cnn"),
        ({"optimizer": "lbfgs"}, "--optimizer must be one of sgd, adam"),
        ({"device": "tpu"}, "--device must be"),
        ({"momentum": -0.1}, "--momentum must be >= 0"),
    ],
)
def test_validation_names_option_and_value(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**kwargs)


def test_parse_option_lists_and_errors():
    assert parse_option("lr", "0.001, 0.01,0.001") == [0.001, 0.01]
    assert parse_option("batch_size", "64,128") == [64, 128]
    assert parse_option("model", "LogReg,cnn") == ["logreg", "cnn"]
    with pytest.raises(ConfigError, match="--lr has an empty value"):
        parse_option("lr", "0.1,,0.2")
    with pytest.raises(ConfigError, match="--batch-size must be an integer"):
        parse_option("batch_size", "12.5")
    with pytest.raises(ConfigError, match="--lr must be a number .got 'abc'"):
        parse_option("lr", "abc")


def test_train_rejects_lists():
    with pytest.raises(ConfigError, match="use `mnist-jobs sweep`"):
        train_config_from_options({"lr": "0.1,0.2"})


def test_config_id_is_stable_and_distinguishes():
    a, b = TrainConfig(lr=0.1), TrainConfig(lr=0.1)
    assert a.config_id() == b.config_id()
    assert a.config_id() != TrainConfig(lr=0.2).config_id()
    assert TrainConfig(epochs=5).config_id() == TrainConfig(iters=3000).config_id()
    assert TrainConfig.from_dict(a.to_dict()) == a


# ---- hyperparameters: finite, and momentum in [0, 1) ---------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99, 0.999999])
def test_momentum_below_one_is_fine(momentum):
    assert TrainConfig(momentum=momentum).momentum == momentum


@pytest.mark.parametrize("momentum", [1, 1.0, 1.0000001, 2, 2.0, 1e30, 1e300])
def test_momentum_of_one_and_above_is_refused(momentum):
    with pytest.raises(ConfigError) as e:
        TrainConfig(momentum=momentum)
    assert str(e.value) == f"--momentum must be >= 0 and < 1 (got {momentum!r})"


@pytest.mark.parametrize("momentum", [-0.1, -1e-12, -2.0])
def test_negative_momentum_is_refused_with_the_range(momentum):
    with pytest.raises(ConfigError, match=r"^--momentum must be >= 0 and < 1 \(got -"):
        TrainConfig(momentum=momentum)


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_hyperparameters_are_refused(name, value):
    option = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"^{option} must be finite \(got {value!r}\)$"):
        TrainConfig(**{name: value})


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay"])
@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "NaN", "Infinity", "1e309", "-1e309"])
def test_non_finite_option_text_is_refused(name, text):
    option = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"^{option} must be finite"):
        train_config_from_options({name: text})


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"weight_decay": -1e-9}, "--weight-decay must be >= 0 (got -1e-09)"),
        ({"weight_decay": 1e31}, "--weight-decay must be <= 1e+30"),
        ({"lr": -0.0}, "--lr must be > 0"),
        ({"lr": 1e31}, "--lr must be <= 1e+30"),
        ({"momentum": "0.9"}, "--momentum must be a number"),
        ({"momentum": True}, "--momentum must be a number"),
    ],
)
def test_other_hyperparameter_bounds(kwargs, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        TrainConfig(**kwargs)


def test_valid_hyperparameters_still_pass():
    c = TrainConfig(lr=0.5, momentum=0.99, weight_decay=1e-4, optimizer="sgd")
    assert (c.lr, c.momentum, c.weight_decay) == (0.5, 0.99, 1e-4)


# ---- text that reaches the sbatch script: no control characters ----------------------------------

CONTROL = ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85", "\u200b", "\u2066", "\udcff"]


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert all(unicodedata.category(c)[0] != "C" for c in msg), msg
    return msg


@pytest.mark.parametrize("field", ["partition", "account", "qos", "constraint"])
@pytest.mark.parametrize("char", CONTROL)
def test_slurm_words_refuse_control_characters(field, char):
    value = f"gpu{char}#SBATCH --uid=0"
    with pytest.raises(ConfigError) as e:
        SlurmConfig(**{field: value})
    option = "--" + field
    assert one_line(e) == f"{option} {value!r} contains a control character ({repr(char)[1:-1]})"


def test_partition_newline_message_is_exact():
    with pytest.raises(ConfigError) as e:
        SlurmConfig(partition="gpu\n#SBATCH --uid=0")
    assert str(e.value) == "--partition 'gpu\\n#SBATCH --uid=0' contains a control character (\\n)"
    with pytest.raises(ConfigError) as e:
        SlurmConfig(account="a\rb")
    assert str(e.value) == "--account 'a\\rb' contains a control character (\\r)"


@pytest.mark.parametrize("field", ["partition", "account", "qos", "constraint"])
def test_slurm_words_refuse_empty_and_non_text(field):
    option = "--" + field
    with pytest.raises(ConfigError, match=f"^{option} must not be empty .got ''.$"):
        SlurmConfig(**{field: ""})
    for value in (5, ["gpu"], True):
        with pytest.raises(ConfigError, match=f"^{option} must be text"):
            SlurmConfig(**{field: value})


def test_slurm_words_that_are_fine():
    s = SlurmConfig(partition="gpu,cpu", account="proj-1", qos="normal", constraint="a100&ib|[r1|r2]")
    assert (s.partition, s.account, s.qos, s.constraint) == ("gpu,cpu", "proj-1", "normal", "a100&ib|[r1|r2]")
    assert SlurmConfig().partition is None  # unset stays unset


def test_parse_slurm_opt_refuses_control_characters_in_key_and_value():
    text = "comment=a\n#SBATCH --uid=0"
    with pytest.raises(ConfigError) as e:
        parse_slurm_opt(text)
    assert str(e.value) == "--slurm-opt 'comment=a\\n#SBATCH --uid=0' contains a control character (\\n)"
    for text in ("com\tment=a", "comment\n=a", "comment=a\r", "mail-type=END\x1b[2J", "\x00x=1", "x=\u200b"):
        with pytest.raises(ConfigError) as e:
            parse_slurm_opt(text)
        assert one_line(e).startswith(f"--slurm-opt {text!r} contains a control character (")


@pytest.mark.parametrize("text", ["=x", "-=x", "--=x", " =x", "novalue", ""])
def test_parse_slurm_opt_refuses_an_empty_key(text):
    with pytest.raises(ConfigError, match="^--slurm-opt must be KEY=VALUE"):
        parse_slurm_opt(text)


@pytest.mark.parametrize("text", [1, None, ["a=b"], {"a": "b"}])
def test_parse_slurm_opt_refuses_non_text(text):  # a TOML [slurm] table can hold anything
    with pytest.raises(ConfigError, match="^--slurm-opt must be KEY=VALUE"):
        parse_slurm_opt(text)


def test_parse_slurm_opt_valid():
    assert parse_slurm_opt("mail-type=END") == ("mail-type", "END")
    assert parse_slurm_opt("--mail_user = me@example.org ") == ("mail-user", "me@example.org")
    assert parse_slurm_opt("comment=a=b") == ("comment", "a=b")
    assert SlurmConfig(slurm_opts=(parse_slurm_opt("comment=two words"),)).slurm_opts == (
        ("comment", "two words"),
    )


@pytest.mark.parametrize(
    ("pair", "needle"),
    [
        (("comment\n", "a"), "--slurm-opt 'comment\\n=a' contains a control character (\\n)"),
        (("comment", "a\n#SBATCH --uid=0"), "--slurm-opt 'comment=a\\n#SBATCH --uid=0' contains a control"),
        (("Comment", "a"), "--slurm-opt key must look like 'mail-type' (got 'Comment')"),
        (("", "a"), "--slurm-opt key must look like 'mail-type' (got '')"),
        (("bad key", "a"), "--slurm-opt key must look like 'mail-type' (got 'bad key')"),
        (("comment", 1), "--slurm-opt must be KEY=VALUE (got ('comment', 1))"),
        (("comment",), "--slurm-opt must be KEY=VALUE"),
    ],
)
def test_slurm_config_checks_each_slurm_opt(pair, needle):
    with pytest.raises(ConfigError) as e:
        SlurmConfig(slurm_opts=(pair,))
    assert one_line(e).startswith(needle)


@pytest.mark.parametrize("char", CONTROL)
def test_setup_lines_refuse_control_characters(char):
    line = f"echo hi{char}rm -rf /"
    with pytest.raises(ConfigError) as e:
        SlurmConfig(setup=("module load cuda", line))
    assert one_line(e) == f"--setup {line!r} contains a control character ({repr(char)[1:-1]})"


def test_setup_lines_valid_and_non_text():
    lines = ("module load cuda", "source /path/venv/bin/activate", 'export X="a b"; echo $X')
    assert SlurmConfig(setup=lines).setup == lines
    with pytest.raises(ConfigError, match="^--setup must be a line of shell .got 1."):
        SlurmConfig(setup=(1,))


def test_exclusive_must_be_a_bool():
    assert SlurmConfig(exclusive=True).exclusive is True
    with pytest.raises(ConfigError, match="^--exclusive must be true or false .got 'yes'."):
        SlurmConfig(exclusive="yes")


def test_check_no_control_is_usable_for_other_options():
    check_no_control("--name", "lr-study")
    with pytest.raises(ConfigError) as e:
        check_no_control("--name", "x\n#SBATCH --uid=0")
    assert str(e.value) == "--name 'x\\n#SBATCH --uid=0' contains a control character (\\n)"


def test_momentum_with_adam_is_refused_rather_than_a_second_run_id_for_the_same_run():
    """Adam takes no momentum: two configs differing in it would train the same run twice under two
    run ids (and `report` would show them as two configurations)."""
    with pytest.raises(ConfigError, match="--momentum 0.9 has no effect with --optimizer adam"):
        TrainConfig(optimizer="adam", momentum=0.9)
    assert TrainConfig(optimizer="adam", momentum=0.0).momentum == 0.0
    res = CliRunner().invoke(app, ["sweep", "--optimizer", "sgd,adam", "--momentum", "0,0.9", "--dry-run"])
    assert res.exit_code == 2 and res.output.startswith("Error: --momentum 0.9 has no effect"), res.output
