import pytest

from mnist_jobs.config import ConfigError, TrainConfig, parse_option, train_config_from_options


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
