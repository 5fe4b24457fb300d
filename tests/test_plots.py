"""The run's plots read at a glance (issue: a default run that shows what UniPruning buys)."""

from __future__ import annotations


def test_the_search_plot_reads_at_a_glance():
    """``search.png``'s panels carry no axis offset: a share of Γ at zero that barely moves (0.100058 %) once
    read "1e-8 + 1.00058e-3"; it is in percent from 0 now."""
    import matplotlib

    matplotlib.use("Agg")
    from unipruning_cli.report import search_figure

    for loss in (None, 3.2):
        rows = [{"step": i, "loss": None if loss is None else loss - 1e-7 * i, "lr": 1e-4,
                 "gamma_abs_q10": 1e-3 + 1e-9 * i, "gamma_abs_q50": 2e-3, "gamma_abs_q90": 3e-3,
                 "gamma_abs_mean": 2e-3 + 1e-9 * i, "gamma_zero_frac": 1.00058e-3 + 1e-8 * (i % 2)} for i in range(8)]
        fig = search_figure(rows)
        fig.canvas.draw()
        for ax in fig.axes:
            assert ax.yaxis.get_offset_text().get_text() == "", (ax.get_title(), ax.yaxis.get_offset_text().get_text())
        zero = fig.axes[2]
        assert zero.get_ylim()[0] == 0 and "%" in zero.get_yticklabels()[1].get_text()
