"""Every page handler's exceptions as one line in the page: the UI's side of `sdlora.failures`.

Gradio shows a `gr.Error`'s text and turns any other exception into a bare "Error" (the traceback only in the
terminal). Wrapping each registered handler once, after the page is built, covers handlers added later too."""

from __future__ import annotations

import functools
import inspect

import gradio as gr

from sdlora.failures import describe


def guard_handlers(blocks: gr.Blocks) -> gr.Blocks:
    """Wrap every event handler of `blocks` (sync, async, generators alike) so what it raises reaches the page as
    one line: a gr.Error as it is, an input problem as its message, a bug as a pointer to its crash log."""
    for fn in blocks.fns.values():
        if fn.fn is not None and not getattr(fn.fn, "_sdlora_guarded", False):
            fn.fn = guarded(fn.fn)
    return blocks


def as_page_error(exc: Exception) -> gr.Error:
    return exc if isinstance(exc, gr.Error) else gr.Error(describe(exc)[0])


def guarded(handler):
    """`handler` with its exceptions turned into gr.Error (same signature, so Gradio injects what it asks for)."""
    if inspect.isasyncgenfunction(handler):
        async def wrapper(*args, **kwargs):
            try:
                async for item in handler(*args, **kwargs):
                    yield item
            except Exception as e:  # noqa: BLE001 - the page's boundary
                raise as_page_error(e) from None
    elif inspect.iscoroutinefunction(handler):
        async def wrapper(*args, **kwargs):
            try:
                return await handler(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - the page's boundary
                raise as_page_error(e) from None
    elif inspect.isgeneratorfunction(handler):
        def wrapper(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - the page's boundary
                raise as_page_error(e) from None
    else:
        def wrapper(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - the page's boundary
                raise as_page_error(e) from None
    wrapper = functools.wraps(handler)(wrapper)
    wrapper._sdlora_guarded = True
    return wrapper
