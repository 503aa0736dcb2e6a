"""Training-curve panels follow what each family's history holds."""

import pytest

from sclatent.plotting import plot_training_history, training_panels


def _history(**terms):
    n = len(next(iter(terms.values())))
    history = {"epoch": list(range(1, n + 1))}
    history.update(terms)
    return history


def test_variational_history_gets_elbo_reconstruction_and_kl():
    history = _history(
        train_loss=[3.0, 2.0],
        train_elbo=[-3.0, -2.5],
        train_reconstruction=[2.0, 1.5],
        train_kl=[1.0, 1.0],
        validation_elbo=[-3.1, -2.6],
        kl_weight=[0.5, 1.0],
    )
    assert training_panels(history) == ["elbo", "reconstruction", "kl"]
    fig = plot_training_history(history)
    assert len(fig.axes) == 4  # three panels and the KL-weight twin axis


def test_autoencoder_history_drops_zero_kl_and_the_redundant_elbo():
    history = _history(
        train_elbo=[-2.0, -1.0], train_reconstruction=[2.0, 1.0], train_kl=[0.0, 0.0], validation_masked_nll=[5.0, 4.0]
    )
    assert training_panels(history) == ["reconstruction", "masked_nll"]


def test_contrastive_history_shows_nt_xent_once():
    loss = [4.0, 3.5]
    history = _history(train_nt_xent=loss, train_reconstruction=loss, train_kl=[0.0, 0.0], train_elbo=[-4.0, -3.5])
    assert training_panels(history) == ["nt_xent"]


def test_adversarial_history_gets_each_players_loss():
    history = _history(
        train_critic_loss=[-1.0, -2.0],
        train_generator_loss=[0.5, 0.4],
        train_wasserstein=[2.0, 1.5],
        train_gradient_penalty=[0.1, 0.05],
        train_loss=[-0.5, -1.6],
        validation_wasserstein=[2.1, 1.7],
    )
    assert training_panels(history) == ["critic_loss", "generator_loss", "wasserstein", "gradient_penalty"]
    assert len(plot_training_history(history).axes) == 4


def test_untrained_history_is_refused():
    with pytest.raises(ValueError, match="train it first"):
        plot_training_history({})


def test_spaced_validations_plot_as_points_and_keep_the_zoom_finite():
    nan = float("nan")
    epochs = 12
    validation = [nan] * epochs
    validation[3], validation[7], validation[11] = -3.0, -2.6, -2.5  # check_val_every_n_epoch=4
    history = _history(
        train_elbo=[-4.0 + 0.1 * e for e in range(epochs)],
        train_reconstruction=[3.0 - 0.1 * e for e in range(epochs)],
        train_kl=[1.0] * epochs,
        validation_elbo=validation,
    )
    fig = plot_training_history(history)
    ax = fig.axes[0]
    train_line, validation_line = ax.lines
    assert list(validation_line.get_xdata()) == [4, 8, 12]
    assert list(validation_line.get_ydata()) == [-3.0, -2.6, -2.5]
    assert validation_line.get_marker() == "o" and train_line.get_marker() in ("None", None, "")
    low, high = ax.get_ylim()
    assert low < -3.0 and high > -2.9  # the zoom spans both curves, NaN ignored
