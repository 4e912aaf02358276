"""matplotlib figures that notebooks display without a pyplot backend.

The plots of `mixco_tf` are `matplotlib.figure.Figure` objects built without pyplot, so
they keep no global state and draw the same on a server without a display. Jupyter shows
such a figure as an image only when the figure has `_repr_png_` or a pyplot backend has
registered a formatter, which happens only after pyplot draws its first figure.
"""

import functools
import io


@functools.cache
def _notebook_figure_class():
    # Defined on first use, because matplotlib is an optional dependency.
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        """A `Figure` that IPython displays as PNG at the figure's own size and dpi."""

        def _repr_png_(self):
            buffer = io.BytesIO()
            self.savefig(buffer, format="png")
            return buffer.getvalue()

    return NotebookFigure


def new_figure(inches, dpi):
    """Returns an empty figure of `inches` `(width, height)` at `dpi`, displayable in notebooks.

    Raises:
        ImportError: if matplotlib is not installed.
    """
    return _notebook_figure_class()(figsize=inches, dpi=dpi)
