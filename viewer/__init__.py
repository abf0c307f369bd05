"""Interactive reading in the browser: `python app.py` (a Gradio app on localhost). See docs/viewer.md.

`render` (pure image/table functions) and `session` (one tab's state → views and inference cases) need no Gradio;
`ui` is the page; `app` the command line.
"""
