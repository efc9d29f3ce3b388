"""A labelled image grid (rows of cells, a label left of each row and above each column): the sheet of each
validation and the grid of `sdlora compare`."""

from __future__ import annotations

from PIL import Image, ImageDraw

CHAR, LINE, PAD = 6, 11, 4  # PIL's default bitmap font: about 6 px a character, 11 px a line


def labelled_grid(rows: list[list[Image.Image | None]], row_labels: list[str], col_labels: list[str],
                  width: int = 0, title: str = "") -> Image.Image:
    """rows[r][c] at row r, column c (None leaves the cell empty), each resized to `width` pixels wide (0: the first
    image's width) at the first image's aspect ratio; labels may hold several lines; `title` goes in the top-left
    corner."""
    first = next(im for row in rows for im in row if im is not None)
    cw = width or first.width
    ch = max(1, round(cw * first.height / first.width))
    left = PAD * 2 + CHAR * max((len(line) for lab in [*row_labels, title] for line in lab.splitlines()), default=0)
    top = PAD * 2 + LINE * max((len(lab.splitlines()) for lab in [*col_labels, title]), default=0)
    ncols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (left + cw * ncols, top + ch * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.multiline_text((PAD, PAD), _latin(title), fill="black", spacing=0)
    for c, label in enumerate(col_labels):
        draw.multiline_text((left + c * cw + PAD, PAD), _latin(_clip(label, cw)), fill="black", spacing=0)
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        draw.multiline_text((PAD, top + r * ch + PAD), _latin(label), fill="black", spacing=0)
        for c, im in enumerate(row):
            if im is not None:
                sheet.paste(im.convert("RGB").resize((cw, ch)), (left + c * cw, top + r * ch))
    return sheet


def _clip(label: str, width: int) -> str:
    """Each line of a column label cut to what fits above its cell."""
    room = max(1, (width - PAD) // CHAR)
    return "\n".join(line if len(line) <= room else line[:room - 1] + "~" for line in label.splitlines())


def _latin(text: str) -> str:
    """What PIL's built-in bitmap font can draw (Latin-1; anything else becomes '?')."""
    return text.encode("latin-1", "replace").decode("latin-1")
