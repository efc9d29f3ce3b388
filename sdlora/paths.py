"""Where the shipped sample data lives."""

from pathlib import Path


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def sample_data() -> Path:
    return repo_root() / "sample_data"


def default_model_path() -> Path:
    """The built-in base model: the shapes-world pipeline that ships in sample_data/."""
    return sample_data() / "shapes-sd"
