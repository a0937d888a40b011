"""One look for every figure of maxscale/analysis: a colour-blind-safe palette (Okabe & Ito, 2008) and, past its
8 colours, a line style per round, so that no two of up to 32 series share both colour and style; larger figures.

    from maxscale.analysis import plotstyle
    ax.plot(x, y, **plotstyle.series(i))        colour, line style and marker of series i
    plotstyle.colour(i)                          colour only (scatter points)
"""

from __future__ import annotations

# Okabe-Ito: distinguishable under the common colour-vision deficiencies, and none pale on white (their yellow,
# #F0E442, is left out for that reason; black takes its place)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#999933")
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = (".", "s", "^", "D")
DPI = 110  # with the figure sizes below: about 1000-1800 px wide


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def series(i: int) -> dict:
    """matplotlib keywords of series i: the colour cycles fastest, the line style and marker change each round."""
    k = (i // len(PALETTE)) % len(LINESTYLES)
    return {"color": colour(i), "ls": LINESTYLES[k], "marker": MARKERS[k], "markersize": 3.5}


def ordered(n: int) -> list[str]:
    """n colours for an ordered series (sizes, budgets): the palette in order (distinct, unlike a pale colormap)."""
    return [colour(i) for i in range(n)]
