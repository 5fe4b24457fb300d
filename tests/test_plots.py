"""The run's plots read at a glance (issue: a default run that shows what UniPruning buys)."""

from __future__ import annotations


def test_the_search_plot_reads_at_a_glance():
    """``search.png``'s panels carry no axis offset: a share of Γ at zero that barely moves (0.100058 %) once
    read "1e-8 + 1.00058e-3"; it is in percent from 0 now."""
    import matplotlib

    matplotlib.use("Agg")
    from unipruning_cli.core.report import search_figure

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


def test_the_perplexity_plot_gives_each_method_one_colour_and_plain_numbers():
    """``ppl_vs_sparsity.png`` of a default run: UniPruning and Wanda each in one colour (their 2:4 point too), the
    cuts' sparsities as percent ticks, and the log axis labelled in plain numbers (not 6 x 10^1)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import to_hex

    from unipruning_cli.core.report import ppl_figure

    ppl = {"s0.50_owl": 49.5, "s0.60_owl": 113.5, "s0.70_owl": 358.4, "2of4": 150.2,
           "wanda@one_shot:s0.50_per_row": 52.5, "wanda@one_shot:s0.60_per_row": 129.7,
           "wanda@one_shot:s0.70_per_row": 541.2, "wanda@one_shot:2of4": 160.3}
    metrics = {"method": "unipruning", "model": {"name": "m"},
               "perplexity": {"wiki": {"dense": {"ppl": 26.1}, "pruned": {"seqlen": 512}}},
               "results": {t: {"ppl": {"wiki": v}} for t, v in ppl.items()}}
    fig = ppl_figure(metrics)
    fig.canvas.draw()
    ax = fig.axes[0]
    colour = {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines()}
    assert colour["unipruning"] == colour["unipruning 2:4"] != colour["wanda@one_shot"] == colour["wanda@one_shot 2:4"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["50%", "60%", "70%"]
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(label.replace(".", "").isdigit() for label in labels), labels
