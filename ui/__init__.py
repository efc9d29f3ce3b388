"""sdlora's web UI (Gradio): `build_app(manager)` lays out the tabs; `ui.jobs.JobManager` runs the training queue.

Start it with `sdlora ui`. The pages only lay out and call the library (the same functions as the CLI).
"""
