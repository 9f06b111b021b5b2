"""The Markdown tables of study B's data scaling (experiments/figures/study_b.py), checked
against numbers worked out by hand from a small results dictionary."""

from experiments.figures import study_b


def _results():
    # Two sizes, three seeds; seed 2 has no network at n = 200 (a missing cell).
    return {
        "n": [100, 200],
        "methods": {
            "network": {
                "test_error": [[0.30, 0.20, 0.10], [0.05, 0.15, None]],
                "test_loss": [[0.05, 0.07, 0.09], [0.02, 0.04, None]],
                "alpha": 0.5, "alpha_interval": [0.25, 0.75], "fit_sizes_error": [100, 200],
                "local_alpha": None, "local_alpha_interval": None, "local_alpha_sizes": None,
                "alpha_loss": 0.25, "alpha_loss_interval": [0.125, 0.375],
                "train_steps": [[500, 700, 600], [4000, 2500, None]],
                "hit_cap": [[False, False, False], [True, False, None]],
                "train_error": [[0.0, 0.0, 0.0], [0.015, 0.0, None]],
                "cap_hits": 1, "runs": 5,
            },
            "entk_init": {
                "test_error": [[0.40, 0.50, 0.60], [0.30, 0.35, 0.40]],
                "test_loss": [[0.10, 0.10, 0.10], [0.08, 0.06, 0.07]],
                "alpha": 0.6, "alpha_interval": [0.5, 0.7], "fit_sizes_error": [100, 200],
                "alpha_loss": None, "alpha_loss_interval": None,
            },
        },
        "exponent_differences": {
            "network_minus_entk_init": {
                "alpha": {"difference": -0.1, "interval": [-0.2, 0.05], "sizes_used": [100, 200]},
                "alpha_loss": {"difference": None, "interval": None, "sizes_used": []},
            },
        },
    }


def test_tables_hold_the_means_over_the_seeds_present_and_the_cap_hits():
    lines = study_b.data_scaling_tables(_results()).splitlines()
    # Means by hand: network error 20.0% (n = 100), (5 + 15)/2 = 10.0% (n = 200, two seeds);
    # entk_init 50.0% and 35.0%.
    assert ("| network | 20.0 | 10.0 | 0.500 [0.250, 0.750] (100–200) | – (–) "
            "| 0.250 [0.125, 0.375] |") in lines
    assert "| entk_init | 50.0 | 35.0 | 0.600 [0.500, 0.700] (100–200) | – (–) | – |" in lines
    assert "| network | 3 | 2 |" in lines  # seeds per size
    assert "| entk_init | 3 | 3 |" in lines
    # Losses: (0.05 + 0.07 + 0.09)/3 = 0.0700, (0.02 + 0.04)/2 = 0.0300.
    assert "| network | 0.0700 | 0.0300 |" in lines
    assert "| network_minus_entk_init | -0.100 [-0.200, +0.050] (100–200) | – |" in lines
    # One run at the cap at n = 200, with 0.015 · 200 = 3 training examples misclassified.
    assert "| n=100 | 3 | 500–700 | 0 | – |" in lines
    assert "| n=200 | 2 | 2500–4000 | 1 | 3 |" in lines
    assert "| all | 5 | | 1 | |" in lines
