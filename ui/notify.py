"""Toasts with their text shown as written: Gradio renders a toast's message as HTML, so `'<s1>'` would vanish."""

from __future__ import annotations

import html

import gradio as gr


def warn(text: str) -> None:
    gr.Warning(html.escape(text))


def info(text: str) -> None:
    gr.Info(html.escape(text))


def error(text: str) -> gr.Error:
    """An error to raise (for handlers whose outputs are untouched by it)."""
    return gr.Error(html.escape(text))
