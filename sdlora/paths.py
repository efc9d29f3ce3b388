"""Where the shipped sample data lives: inside the installed package (a wheel ships `sample_data/` as
`sdlora/sample_data/`), or at the top of a source checkout (an editable install)."""

from pathlib import Path


def sample_data() -> Path:
    installed = Path(__file__).resolve().parent / "sample_data"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "sample_data"


def default_model_path() -> Path:
    """The built-in base model: the shapes-world pipeline that ships in sample_data/."""
    return sample_data() / "shapes-sd"
